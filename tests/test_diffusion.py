"""Flow matching and the sampler, against closed forms and diffusers' reference schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_inputs, small_config
from mirage_jax.config import DiffusionConfig
from mirage_jax.diffusion import (
    euler_sample,
    flow_matching_loss,
    linear_quadratic_schedule,
    sample,
    sample_timesteps,
)
from mirage_jax.model import MirageDiT


@pytest.mark.parametrize("steps,thr", [(64, 0.025), (10, 0.1), (7, 0.025)])
def test_linear_quadratic_schedule_closed_form(steps, thr):
    """Linear to the threshold over the first half, then the quadratic through (half, thr) with the same
    slope that reaches noise 0 at the last step (Mochi's definition, solved independently here)."""
    got = linear_quadratic_schedule(steps, thr)
    half = steps // 2
    np.testing.assert_allclose(got[: half + 1], 1 - thr * np.arange(half + 1) / half, atol=1e-12)
    # quadratic q(i) = a (i - half)^2 + slope (i - half) + thr with q(steps) = 1
    slope, n = thr / half, steps - half
    a = (1 - thr - slope * n) / n**2
    i = np.arange(half, steps + 1)
    np.testing.assert_allclose(got[half:], 1 - (a * (i - half) ** 2 + slope * (i - half) + thr), atol=1e-12)
    assert got[0] == 1.0 and got[-1] == 0.0 and np.all(np.diff(got) < 0)


def _gaussian_velocity(mu, s):
    """Exact v(x, t) = E[x0 - eps | x_t = x] for x0 ~ N(mu, s^2), eps ~ N(0, 1), x_t = (1-t) x0 + t eps."""

    def fn(x, t, use_text, use_audio):
        var = (1 - t) ** 2 * s**2 + t**2
        return mu + ((1 - t) * s**2 - t) / var * (x - (1 - t) * mu)

    return fn


def test_sampler_with_exact_velocity_reproduces_the_data_distribution():
    mu, s = 1.5, 0.4
    noise = jax.random.normal(jax.random.key(0), (200_000,))
    errors = []
    for steps in (16, 64, 256, 1024):
        x = euler_sample(_gaussian_velocity(mu, s), noise, steps=steps)
        assert abs(float(x.mean()) - mu) < 0.01
        errors.append(abs(float(x.std()) - s) / s)
    assert errors[-1] < 0.015  # Euler on the linear-quadratic grid converges to N(mu, s^2) ...
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))  # ... monotonically in the steps
    assert errors[0] > 0.1  # and with few steps the error is visible: the check can fail


def test_per_step_callback_runs_once_per_step_jitted_on_a_mesh_and_changes_nothing():
    """`on_step` (generate's progress bar): steps 0..N-1 once each, in order, when the sampler is one jitted loop
    over 8 devices; the latents equal an eager run without it."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    noise = jax.device_put(jax.random.normal(jax.random.key(1), (8, 64)),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    seen = []
    fn = _gaussian_velocity(0.5, 0.7)
    x = jax.jit(lambda n: euler_sample(fn, n, steps=6, on_step=seen.append))(noise)
    jax.block_until_ready(x)
    assert seen == list(range(6))
    np.testing.assert_allclose(np.asarray(x), np.asarray(euler_sample(fn, noise, steps=6)), rtol=1e-6, atol=1e-6)


def test_guidance_composes_per_modality():
    """v = v_none + s_t (v_text - v_none) + s_a (v_full - v_text), checked with constant fields."""
    from mirage_jax.diffusion import guided_velocity

    def fn(x, t, use_text, use_audio):
        return x * 0 + (1.0 * use_text + 10.0 * use_audio)

    v = guided_velocity(fn, jnp.zeros(3), jnp.float32(0.5), cfg_text=2.0, cfg_audio=3.0, schedule="constant")
    np.testing.assert_allclose(v, 0 + 2.0 * 1.0 + 3.0 * 10.0)
    v = guided_velocity(fn, jnp.zeros(3), jnp.float32(0.0), cfg_text=2.0, cfg_audio=3.0, schedule="cosine")
    np.testing.assert_allclose(v, 11.0)  # cosine anneals guidance away at t = 0


@pytest.mark.parametrize("sampler", ["uniform", "logit_normal", "linear_quadratic"])
def test_timestep_samplers(sampler):
    cfg = DiffusionConfig(timestep_sampler=sampler)
    t = np.asarray(sample_timesteps(jax.random.key(0), 100_000, cfg))
    assert t.min() > 0 and t.max() < 1
    if sampler == "uniform":
        assert abs(t.mean() - 0.5) < 0.01
    elif sampler == "logit_normal":
        assert abs(np.median(t) - 0.5) < 0.01 and np.mean(t < 0.1) < 0.05
    else:  # half of the schedule's steps sit above 1 - threshold: half the mass is there
        assert abs(np.mean(t > 1 - cfg.lq_threshold - 1e-6) - 0.5) < 0.01


def test_loss_equals_direct_computation_and_ignores_padded_frames():
    cfg = small_config()
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    dcfg = DiffusionConfig(drop_text=0.0, drop_audio=0.0, drop_ref=0.0)
    inp = {k: jnp.asarray(v) for k, v in random_inputs(cfg).items()}
    batch = {k: inp[k] for k in ("video", "text", "text_mask", "audio", "audio_mask", "ref", "ref_time", "ref_mask")}
    batch["video_mask"] = jnp.asarray([[True, True, False], [True, True, True]])
    rng = jax.random.key(3)
    loss, aux = nnx.jit(lambda m, b, r: flow_matching_loss(m, b, r, dcfg))(model, batch, rng)
    # second code path: recompute with the same randomness by hand
    k_t, k_noise, _ = jax.random.split(rng, 3)
    t = sample_timesteps(k_t, 2, dcfg)
    noise = jax.random.normal(k_noise, batch["video"].shape)
    tb = t[:, None, None, None, None]
    xt = (1 - tb) * batch["video"] + tb * noise
    forward = nnx.jit(lambda m, *a, **k: m(*a, **k))
    pred = forward(model, xt, 1000 * (1 - t), batch["text"], batch["text_mask"], audio=batch["audio"],
                 audio_mask=batch["audio_mask"], ref=batch["ref"], ref_time=batch["ref_time"],
                 ref_mask=batch["ref_mask"], video_mask=batch["video_mask"])
    err = np.asarray((pred - (batch["video"] - noise)) ** 2)
    want = (err[0, :2].sum() + err[1].sum()) / (err[0, :2].size + err[1].size)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(aux["bucket_counts"].sum()) == 2


def test_model_sampler_is_deterministic_and_uses_guidance():
    cfg = small_config(num_layers=1)
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    inp = {k: jnp.asarray(v) for k, v in random_inputs(cfg).items()}
    cond = {k: inp[k] for k in ("text", "text_mask", "audio", "audio_mask")}
    shape = inp["video"].shape
    run = nnx.jit(lambda m, c, r: sample(m, c, shape, r, steps=4), static_argnums=())
    a, b = run(model, cond, jax.random.key(1)), run(model, cond, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = run(model, cond, jax.random.key(2))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.all(np.isfinite(np.asarray(a)))


def test_model_inputs_are_the_models_keyword_arguments():
    """The batch keys the loss and the sampler pass by name are exactly MirageDiT's optional inputs."""
    import inspect

    from mirage_jax.diffusion import model_inputs

    params = inspect.signature(MirageDiT.__call__).parameters
    optional = [n for n, p in params.items() if p.default is None]
    assert sorted(model_inputs({})) == sorted(optional)
