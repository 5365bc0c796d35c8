"""Cached guidance and step skipping (mirage_jax/diffusion/cache.py, mirage_jax/cache_schedule.py).

References: the sampler loop as it was before caching existed (`_reference_euler`, a verbatim copy of
diffusion/sampler.py's loop on main), closed forms (a velocity constant in t makes every reuse exact), and a
velocity with a jump at a known step (calibration must not skip it)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.diffusion.cache import (
    CachePlan,
    cached_euler_sample,
    cfg_mask,
    low_high_split,
    mag_skip_mask,
    magnitude_ratios,
    make_plan,
    velocity_norms,
)
from mirage_jax.diffusion.schedules import linear_quadratic_schedule

SHAPE = (2, 2, 5, 5, 3)
STEPS = 24


def _reference_euler(fn, noise, *, steps, threshold=0.025, cfg_text=1.0, cfg_audio=1.0, schedule="constant"):
    """diffusion/sampler.py's euler_sample + guided_velocity as on main before issue 33 (a frozen copy)."""

    def weight(t, scale):
        if schedule == "cosine":
            return 1.0 + (scale - 1.0) * 0.5 * (1.0 - jnp.cos(math.pi * t))
        return jnp.asarray(scale, jnp.float32)

    def guided(x, t):
        v_full = fn(x, t, True, True)
        if cfg_text == 1.0 and cfg_audio == 1.0:
            return v_full
        v_text = fn(x, t, True, False)
        v_none = fn(x, t, False, False) if cfg_text != 1.0 else v_text
        return v_none + weight(t, cfg_text) * (v_text - v_none) + weight(t, cfg_audio) * (v_full - v_text)

    levels = jnp.asarray(linear_quadratic_schedule(steps, threshold), jnp.float32)

    def body(i, carry):
        x, st = carry
        t, t_next = levels[i], levels[i + 1]
        v = guided(x, t)
        return x + (t - t_next) * v.astype(x.dtype), st

    x, _ = jax.lax.fori_loop(0, levels.shape[0] - 1, body, (noise.astype(jnp.float32), None))
    return x


def _consts():
    k = jax.random.split(jax.random.key(3), 3)
    return {(True, True): jax.random.normal(k[0], SHAPE), (True, False): jax.random.normal(k[1], SHAPE),
            (False, False): jax.random.normal(k[2], SHAPE)}


def _smooth_fn():
    """A velocity that depends on x and t (so caching is NOT exact on it)."""
    c = _consts()

    def fn(x, t, use_text, use_audio):
        return c[(use_text, use_audio)] * (1.0 + t) - 0.5 * x * t
    return fn


GUIDE = dict(cfg_text=2.0, cfg_audio=3.0, schedule="cosine")


def test_cache_off_is_bitwise_todays_sampler() -> None:
    """SamplingSettings(cache='none') takes euler_sample unchanged: bitwise equal to the frozen copy."""
    from mirage_jax.diffusion.sampler import euler_sample

    fn = _smooth_fn()
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    ours = jax.jit(lambda n: euler_sample(fn, n, steps=STEPS, **GUIDE))(noise)
    ref = jax.jit(lambda n: _reference_euler(fn, n, steps=STEPS, **GUIDE))(noise)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    assert make_plan("none", STEPS) is None


def test_all_compute_plan_equals_uncached() -> None:
    """A plan that runs everything computes the uncached sampler's numbers (same ops; XLA may fuse differently)."""
    fn = _smooth_fn()
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    plan = CachePlan(run_model=(True,) * STEPS, run_guidance=(True,) * STEPS)
    ours = jax.jit(lambda n: cached_euler_sample(fn, n, plan, **GUIDE))(noise)
    ref = jax.jit(lambda n: _reference_euler(fn, n, steps=STEPS, **GUIDE))(noise)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_constant_velocity_makes_every_reuse_exact() -> None:
    """v independent of x and t: reused guidance differences and skipped steps are the values a pass would give,
    so the most aggressive plan (only step 0 runs anything) equals the uncached run; the same plan on a velocity
    that varies does not (the test can fail)."""
    c = _consts()

    def const(x, t, use_text, use_audio):
        return c[(use_text, use_audio)] + 0.0 * x

    noise = jax.random.normal(jax.random.key(1), SHAPE)
    plan = CachePlan(run_model=(True,) + (False,) * (STEPS - 1), run_guidance=(True,) + (False,) * (STEPS - 1))
    plan_cfg = CachePlan(run_model=(True,) * STEPS, run_guidance=(True,) + (False,) * (STEPS - 1))
    ref = _reference_euler(const, noise, steps=STEPS, **GUIDE)
    for p in (plan, plan_cfg, make_plan("cfg", STEPS)):
        np.testing.assert_allclose(np.asarray(cached_euler_sample(const, noise, p, **GUIDE)), np.asarray(ref),
                                   rtol=1e-5, atol=1e-5)
    smooth = _smooth_fn()
    far = np.abs(np.asarray(cached_euler_sample(smooth, noise, plan, **GUIDE))
                 - np.asarray(_reference_euler(smooth, noise, steps=STEPS, **GUIDE))).max()
    assert far > 1e-2



def test_low_band_trend_is_extrapolated_exactly() -> None:
    """On a uniform grid, an audio guidance difference t * k with k spatially constant (all low band) changes
    linearly per step: the compensated reuse reproduces the uncached run; holding the cached difference
    (w_low = 0, plain reuse) does not."""
    import dataclasses

    from mirage_jax.diffusion.sampler import euler_sample

    c = _consts()
    k = jnp.full(SHAPE, 0.7)

    def fn(x, t, use_text, use_audio):
        base = c[(True, False)] if use_text else c[(False, False)]
        return base + (t * k if use_audio else 0.0) + 0.0 * x

    sigmas = jnp.linspace(1.0, 0.0, STEPS + 1)
    noise = jax.random.normal(jax.random.key(5), SHAPE)
    ref = euler_sample(fn, noise, steps=STEPS, sigmas=sigmas, **GUIDE)
    plan = make_plan("cfg", STEPS)
    ours = cached_euler_sample(fn, noise, plan, sigmas=sigmas, **GUIDE)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    held = cached_euler_sample(fn, noise, dataclasses.replace(plan, w_low=0.0), sigmas=sigmas, **GUIDE)
    assert np.abs(np.asarray(held) - np.asarray(ref)).max() > 1e-3

def test_lax_cond_skips_the_network_pass() -> None:
    """The skipped branch is not executed: a host callback inside the velocity counts the passes that ran."""
    calls = []

    def fn(x, t, use_text, use_audio):
        jax.debug.callback(lambda: calls.append((use_text, use_audio)))
        return -0.5 * x

    noise = jnp.ones(SHAPE)
    plan = make_plan("cfg+mag", STEPS, skip=mag_skip_mask([1.0] * STEPS, threshold=1.0, max_skips=2))
    jax.block_until_ready(jax.jit(lambda n: cached_euler_sample(fn, n, plan, **GUIDE))(noise))
    assert len(calls) == plan.forwards(3) < 3 * STEPS


def test_frequency_split_is_a_partition() -> None:
    d = jax.random.normal(jax.random.key(2), (1, 2, 10, 15, 3))
    lo, hi = low_high_split(d)
    np.testing.assert_allclose(np.asarray(lo + hi), np.asarray(d), atol=1e-6)
    # a constant (DC only) field is all low band; a checkerboard (Nyquist) is all high band
    np.testing.assert_allclose(np.asarray(low_high_split(jnp.ones((1, 1, 10, 10, 1)))[1]), 0, atol=1e-6)
    checker = jnp.asarray((np.indices((10, 10)).sum(0) % 2 * 2 - 1.0)[None, None, :, :, None])
    np.testing.assert_allclose(np.asarray(low_high_split(checker)[0]), 0, atol=1e-6)


def test_calibration_puts_no_skip_at_a_velocity_jump() -> None:
    """Constant-magnitude velocity: calibration skips some step k; the same velocity tripled from step k on
    (ratio 3 there) gets no skip at k."""
    levels = np.asarray(linear_quadratic_schedule(STEPS, 0.025))
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    c = _consts()[(True, True)]

    def steady(x, t, use_text, use_audio):
        return c + 0.0 * x

    _, norms = velocity_norms(steady, noise, steps=STEPS)
    skip_steady = mag_skip_mask(magnitude_ratios(np.asarray(norms)))
    k = skip_steady.index(True)
    t_k = float(levels[k])

    def jump(x, t, use_text, use_audio):
        return c * jnp.where(t <= t_k, 3.0, 1.0) + 0.0 * x

    _, norms = velocity_norms(jump, noise, steps=STEPS)
    ratios = magnitude_ratios(np.asarray(norms))
    assert ratios[k] == pytest.approx(3.0, rel=1e-5)
    skip_jump = mag_skip_mask(ratios)
    assert skip_steady[k] and not skip_jump[k]


def test_skip_mask_rules() -> None:
    ratios = [1.0] * 20
    skip = mag_skip_mask(ratios, threshold=0.5, max_skips=2, retention=0.25)
    assert not any(skip[:5])
    assert skip[5:11] == (True, True, False, True, True, False)  # at most 2 in a row
    drifting = [1.0] + [1.05] * 19  # accumulated error |1 - 1.05^n| grows: fewer skips at a tight threshold
    assert sum(mag_skip_mask(drifting, threshold=0.06, retention=0.0)) < sum(mag_skip_mask(ratios, 0.06, 2, 0.0))
    assert cfg_mask(10, warmup=0.2, interval=3) == (True, True, False, False, True, False, False, True, False, False)


# ------------------------------------------------------------------------------------- the schedule file
class _Run:
    def __init__(self, model, step, step_dir):
        self.model, self.step, self.step_dir, self.weights = model, step, step_dir, "params"


def _tiny_model(seed: int):
    from flax import nnx

    class M(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (300,)))

    return M(nnx.Rngs(seed))


def test_schedule_file_round_trips_and_is_refused_for_another_checkpoint(tmp_path) -> None:
    from etils import epath

    from mirage_jax.cache_schedule import (
        CacheSchedule,
        CacheScheduleError,
        checkpoint_identity,
        default_path,
        read_schedule,
    )

    run_a = _Run(_tiny_model(0), 100, epath.Path(tmp_path / "run" / "checkpoints" / "100"))
    run_b = _Run(_tiny_model(1), 100, epath.Path(tmp_path / "run" / "checkpoints" / "100"))
    assert default_path(run_a) == epath.Path(tmp_path / "run" / "cache_schedule.json")
    ratios = magnitude_ratios(np.ones((8, 1)))
    sched = CacheSchedule(steps=8, threshold=0.06, max_skips=2, retention=0.2, skip=mag_skip_mask(ratios),
                          ratios=tuple(ratios), checkpoint=checkpoint_identity(run_a),
                          calibration={"cfg_text": 1.0})
    path = default_path(run_a)
    sched.write(path)
    assert read_schedule(path, run_a, steps=8) == sched
    with pytest.raises(CacheScheduleError) as e:
        read_schedule(path, run_b, steps=8)
    msg = str(e.value)
    assert "\n" not in msg and msg.count("step 100") == 2
    assert checkpoint_identity(run_a)["params_sha256"][:12] in msg
    assert checkpoint_identity(run_b)["params_sha256"][:12] in msg
    with pytest.raises(CacheScheduleError, match="8 steps, not 64"):
        read_schedule(path, run_a, steps=64)
    with pytest.raises(CacheScheduleError, match="no such file"):
        read_schedule(tmp_path / "nope.json", run_a)


@pytest.mark.slow  # ~2 min on a loaded 2-core host: three compiles of a real DiT with its conditionals
def test_calibrated_run_samples_sharded_like_unsharded(tmp_path) -> None:
    """A real (small, random) MirageDiT: calibrate -> schedule file -> apply_cache -> sample_latents with
    cfg+mag, on the 8-device mesh equal to one device; the mask has the calibrated steps; 'none' stays the
    uncached sampler."""
    from etils import epath
    from flax import nnx

    from helpers import random_inputs, randomize, saved_config, small_config
    from mirage_base.batch_keys import CONDITION_KEYS
    from mirage_jax.cache_schedule import apply_cache, calibrate, default_path
    from mirage_jax.inference import LoadedRun
    from mirage_jax.model import MirageDiT
    from mirage_jax.sampling import SamplingSettings, generation_mesh, sample_latents

    cfg = small_config()
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    randomize(model, seed=3)
    run = LoadedRun(model=model, config=saved_config(), step=7,
                    step_dir=epath.Path(tmp_path / "run" / "checkpoints" / "7"), weights="params")
    x = random_inputs(cfg, b=2, t=3)
    cond = {k: np.concatenate([x[k]] * 4) for k in CONDITION_KEYS if k in x}
    cond["video_mask"] = np.ones((8, 3), bool)
    shape = (8,) + x["video"].shape[1:]
    settings = SamplingSettings(steps=6, cfg_audio=2.5, cfg_text=1.5, schedule="cosine", seed=1)
    sched = calibrate(run, {k: v[:1] for k, v in cond.items()}, (1,) + shape[1:], settings, threshold=0.5,
                      retention=0.0)
    sched.write(default_path(run))
    assert len(sched.skip) == 6 and sched.checkpoint["step"] == 7
    cached, path = apply_cache(run, settings, "cfg+mag", None)
    assert path == str(default_path(run)) and cached.skip == sched.skip and cached.cache == "cfg+mag"
    one = sample_latents(run, cond, shape, cached, progress=False)
    many = sample_latents(run, cond, shape, cached, mesh=generation_mesh(), progress=False)
    np.testing.assert_allclose(many, one, atol=2e-5, rtol=1e-5)
    plain = sample_latents(run, cond, shape, settings, progress=False)
    assert np.isfinite(one).all() and (sum(sched.skip) == 0 or np.abs(one - plain).max() > 0)
