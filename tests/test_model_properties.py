"""Properties of MirageDiT that follow from its design, each checked against a second computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_inputs, randomize, small_config
from mirage_base.time_map import TimeMap
from mirage_jax.model import MirageDiT
from mirage_jax.model import rope as rope_lib
from mirage_jax.model.attention import attention


def _model(**overrides):
    cfg = small_config(**overrides)
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    randomize(model, seed=1)
    return cfg, model


_forward = nnx.jit(lambda m, *a, **k: m(*a, **k))


def _call(model, inp, **override):
    kw = {**inp, **override}
    args = [jnp.asarray(kw.pop(k)) for k in ("video", "timestep", "text", "text_mask")]
    kw = {k: (None if v is None else jnp.asarray(v)) for k, v in kw.items()}
    return np.asarray(_forward(model, *args, **kw))


def test_rope_depends_only_on_relative_position():
    key = jax.random.key(0)
    freqs = rope_lib.mixed_rope_init(key, 3, 2, 8) * 3.0
    q = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 2, 16))

    def score(pq, pk):
        cq, sq = rope_lib.rope_angles(freqs, jnp.asarray(pq, jnp.float32).reshape(1, 1, 3))
        ck, sk = rope_lib.rope_angles(freqs, jnp.asarray(pk, jnp.float32).reshape(1, 1, 3))
        return jnp.einsum("bnhd,bnhd->h", rope_lib.apply_rope(q, cq, sq), rope_lib.apply_rope(k, ck, sk))

    base = score([1.0, 2.0, -0.5], [3.0, -1.0, 0.25])
    shifted = score([1.0 + 7.3, 2.0 - 4.1, -0.5 + 2.0], [3.0 + 7.3, -1.0 - 4.1, 0.25 + 2.0])
    other = score([1.0, 2.0, -0.5], [4.0, -1.0, 0.25])
    np.testing.assert_allclose(base, shifted, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(base - other)).max() > 1e-3  # and it does depend on the relative position
    # rotation preserves norms: a second computation of |R q|
    c, s = rope_lib.rope_angles(freqs, jnp.ones((1, 1, 3)))
    np.testing.assert_allclose(jnp.linalg.norm(rope_lib.apply_rope(q, c, s)), jnp.linalg.norm(q), rtol=1e-5)


def test_audio_frame_shares_time_with_covering_latent_frame():
    pos = np.asarray(rope_lib.audio_positions(10, TimeMap.parse("uniform:5"), 1))[0, :, 0]
    np.testing.assert_array_equal(pos, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    vid = np.asarray(rope_lib.video_positions(jnp.arange(2.0)[None], 2, 2, 8, 8))[0, :, 0]
    np.testing.assert_array_equal(vid, [0, 0, 0, 0, 1, 1, 1, 1])


def test_audio_time_frequencies_start_equal_to_video_time_frequencies():
    """Then a video query at time t and an audio key at time s interact through t - s alone (for a fixed
    spatial position): rotate both by t + d and s + d, the score is unchanged."""
    cfg = small_config(time_map="uniform:1")
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model.audio_pos_frequencies[...]),
                                  np.asarray(model.pos_frequencies[...][0:1]))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, cfg.num_heads, cfg.head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, cfg.num_heads, cfg.head_dim)), jnp.float32)

    def score(t, s):
        pv = jnp.asarray([[[t, 0.3, -0.2]]], jnp.float32)
        pa = jnp.asarray([[[s]]], jnp.float32)
        cq, sq = rope_lib.rope_angles(model.pos_frequencies[...], pv)
        ck, sk = rope_lib.rope_angles(model.audio_pos_frequencies[...], pa)
        return jnp.sum(rope_lib.apply_rope(q, cq, sq) * rope_lib.apply_rope(k, ck, sk), axis=-1)

    np.testing.assert_allclose(score(3.0, 1.0), score(10.0, 8.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_rope_theta_sets_initial_frequency_magnitudes(theta):
    """Each (head, pair) starts at 1 / theta^(f / half) along a random unit direction over (t, h, w)."""
    cfg = small_config(rope_theta=theta)
    freqs = np.asarray(MirageDiT(cfg, rngs=nnx.Rngs(0)).pos_frequencies[...])
    half = cfg.head_dim // 2
    expected = np.broadcast_to(theta ** (-np.arange(half) / half), (cfg.num_heads, half))
    np.testing.assert_allclose(np.linalg.norm(freqs, axis=0), expected, rtol=1e-5)


def test_axial_rope_init_puts_every_pair_on_one_axis():
    """head_dim 16 -> 8 pairs: 4 time (1, 100^-1/4, 100^-2/4, 100^-3/4), 2 height, 2 width (1, 100^-1/2), in
    every head; the audio time frequencies start equal to the video time row, as with the mixed init."""
    cfg = small_config(rope_theta=100.0, rope_init="axial", time_map="uniform:1")
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    freqs = np.asarray(model.pos_frequencies[...])
    ladder = lambda n: 100.0 ** (-np.arange(n) / n)  # noqa: E731
    expected = np.zeros((3, 8), np.float32)
    expected[0, :4], expected[1, 4:6], expected[2, 6:] = ladder(4), ladder(2), ladder(2)
    for head in range(cfg.num_heads):
        np.testing.assert_allclose(freqs[:, head], expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.audio_pos_frequencies[...]), freqs[0:1])


def test_rope_init_fields_are_checked():
    from mirage_jax.config import ConfigError
    with pytest.raises(ConfigError, match="model.rope_theta"):
        small_config(rope_theta=1.0).validate()
    with pytest.raises(ConfigError, match="model.rope_init"):
        small_config(rope_init="axis").validate()


def test_masked_tokens_cannot_change_unmasked_outputs():
    cfg, model = _model()
    inp = random_inputs(cfg)
    base = _call(model, inp)
    text = inp["text"].copy()
    text[0, ~inp["text_mask"][0]] = 1e3  # garbage in padded text positions
    audio_mask = np.ones_like(inp["audio_mask"])
    audio_mask[:, 4:] = False
    with_mask = _call(model, inp, audio_mask=audio_mask)
    audio = inp["audio"].copy()
    audio[:, 4:] = -50.0
    np.testing.assert_allclose(_call(model, inp, text=text), base, atol=1e-5)
    np.testing.assert_allclose(_call(model, inp, audio_mask=audio_mask, audio=audio), with_mask, atol=1e-5)
    assert np.abs(with_mask - base).max() > 1e-3  # masking does change the result


def test_dropping_a_modality_equals_running_without_it():
    cfg, model = _model()
    inp = random_inputs(cfg)
    no_audio = _call(model, inp, audio=None, audio_mask=None)
    masked_audio = _call(model, inp, audio_mask=np.zeros_like(inp["audio_mask"]))
    np.testing.assert_allclose(masked_audio, no_audio, atol=1e-5)
    no_ref = _call(model, inp, ref=None, ref_time=None, ref_mask=None)
    masked_ref = _call(model, inp, ref_mask=np.zeros_like(inp["ref_mask"]))
    np.testing.assert_allclose(masked_ref, no_ref, atol=1e-5)
    assert np.abs(no_ref - _call(model, inp)).max() > 1e-3


def test_audio_moves_the_output_only_through_attention_at_its_time():
    """Reference tokens at a time coordinate change the result, and the ref time matters (RoPE)."""
    cfg, model = _model()
    inp = random_inputs(cfg)
    a = _call(model, inp)
    b = _call(model, inp, ref_time=inp["ref_time"] + 8.0)
    assert np.abs(a - b).max() > 1e-4


def test_bf16_matches_fp32():
    cfg, model = _model()
    cfg16 = small_config(compute_dtype="bfloat16")
    model16 = MirageDiT(cfg16, rngs=nnx.Rngs(0))
    nnx.update(model16, nnx.state(model, nnx.Param))
    inp = random_inputs(cfg)
    want, got = _call(model, inp), _call(model16, inp)
    assert got.dtype == np.float32
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 5e-2, err
    assert err > 0  # bf16 really ran


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_does_not_change_gradients(policy):
    cfg, model = _model()
    cfg_r = small_config(remat_policy=policy)
    model_r = MirageDiT(cfg_r, rngs=nnx.Rngs(0))
    nnx.update(model_r, nnx.state(model, nnx.Param))
    inp = {k: jnp.asarray(v) for k, v in random_inputs(cfg).items()}

    def loss(m):
        out = m(inp["video"], inp["timestep"], inp["text"], inp["text_mask"], audio=inp["audio"], ref=inp["ref"],
                ref_time=inp["ref_time"])
        return jnp.mean(out**2)

    g1 = nnx.jit(nnx.grad(loss))(model)
    g2 = nnx.jit(nnx.grad(loss))(model_r)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


BACKENDS = ["dot_product", "splash"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backends_match_reference(backend):
    rng = np.random.default_rng(0)
    b, s, h, d = 2, 40, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    mask = np.ones((b, s), bool)
    mask[0, 25:] = False
    mask[1, 3:9] = False
    mask = jnp.asarray(mask)
    want = attention(q, k, v, mask, "xla")
    if backend == "splash":  # skipped only when this jax build has no Pallas splash kernel
        pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention",
                            reason="this jax build has no Pallas splash attention")
    got = attention(q, k, v, mask, backend, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # masked query rows are exactly zero; the reference is checked against a numpy softmax too
    assert np.all(np.asarray(got)[0, 25:] == 0)
    logits = np.einsum("qhd,khd->hqk", np.asarray(q[1]), np.asarray(k[1])) / np.sqrt(d)
    logits[:, :, ~np.asarray(mask[1])] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("hqk,khd->qhd", p, np.asarray(v[1])) * np.asarray(mask[1])[:, None, None]
    np.testing.assert_allclose(np.asarray(want[1]), ref, atol=2e-5)


def test_splash_under_a_mesh_runs_per_device_and_matches_reference():
    """Splash is a Mosaic kernel XLA cannot partition: under a mesh it runs in shard_map on the Ulysses
    layout (heads sharded). Interpret mode on 8 CPU devices, forward and gradients vs the xla backend."""
    from flax.core import spmd as core_spmd
    from jax.sharding import AxisType, Mesh

    from mirage_jax.parallel.sharding import constrain
    from mirage_jax.run_config import ACTIVATION_RULES

    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 2, 2), ("data", "fsdp", "sequence", "tensor"),
                axis_types=(AxisType.Auto,) * 4)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, (2, 200, 4, 16)) for x in keys[:3])
    mask = jax.random.uniform(keys[3], (2, 200)) > 0.2

    def f(q, k, v, mask):
        with core_spmd.logical_axis_rules(ACTIVATION_RULES):
            q, k, v = (constrain(t, ("batch", None, "act_heads", None)) for t in (q, k, v))
            return attention(q, k, v, mask, "splash", interpret=True)

    with jax.set_mesh(mesh):
        out = jax.jit(f)(q, k, v, mask)
        grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v, mask)
    want = attention(q, k, v, mask, "xla")
    want_grads = jax.grad(lambda *a: attention(*a, mask, "xla").sum(), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
    for a, b in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
