"""The remat policies that keep more of each block (model/dit.py REMAT: save_splash_down / _mlp / _mlp_o / _dense,
offload_mlp / offload_dense) on one MirageBlock of the small config (video, audio and text streams, `xla`
attention, on CPU): (1) value and gradients equal those without remat (checkpoint names are identities and a
policy only chooses what the backward recomputes); (2) the matmuls the backward reruns, counted in the
gradient's jaxpr against the no-remat gradient, are exactly the ones the policy's names do not keep, worked
out by hand from the block's equations below; (3) the offload policies put their residuals in host memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import small_config
from mirage_jax.model.dit import REMAT, SAVES_SPLASH, MirageBlock, recomputes_attention

# Forward matmuls per stream: mod (adaLN), q, k, v, o, up, gate, down = 8; joint attention (xla): QK^T, PV = 2.
# The backward needs every one of them (norm inputs, swiglu's up/gate, each dense layer's input); a policy's
# saved names remove theirs and those only they feed: with the MLP's outputs saved, o is still rerun (the
# MLP's input comes from x + norm(o(...))); with o saved too only mod, q, k, v and attention are. splash's
# residuals name nothing under `xla`, so attention is always rerun here (aot.flops accounts for splash).
STREAMS, ATTN = 3, 2
RERUN = {  # policy -> matmuls per stream the backward reruns
    "full": 8, "save_splash": 8, "save_splash_down": 7, "save_splash_mlp": 5, "save_splash_mlp_o": 4,
    "offload_mlp": 1, "save_splash_dense": 0, "offload_dense": 0,
}
NEW = ["save_splash_down", "save_splash_mlp", "save_splash_mlp_o", "save_splash_dense", "offload_mlp",
       "offload_dense"]


@pytest.fixture(scope="module")
def block():
    cfg = small_config()
    graphdef, params = nnx.split(MirageBlock(cfg, last=False, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    lengths = {"video": 24, "audio": 6, "text": 7}
    dims = {"video": cfg.video_dim, "audio": cfg.audio_dim, "text": cfg.text_dim}
    xs = {n: jnp.asarray(rng.standard_normal((2, s, dims[n])), jnp.float32) for n, s in lengths.items()}
    c = jnp.asarray(rng.standard_normal((2, cfg.video_dim)), jnp.float32)
    mask = jnp.asarray(rng.random((2, sum(lengths.values()))) > 0.2)
    return graphdef, params, xs, c, mask


def _loss(block, policy: str | None):
    graphdef, _, _, c, mask = block

    def f(params, xs):
        out = nnx.merge(graphdef, params)(xs, c, {}, mask)
        return sum(jnp.sum(jnp.sin(v)) for v in out.values())

    return jax.checkpoint(f, policy=REMAT[policy]) if policy else f


def _dots(jaxpr) -> int:
    """dot_generals in `jaxpr` and every jaxpr nested in its equations (remat, custom-VJP bodies)."""
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == "dot_general"
        for p in e.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _dots(sub)
    return n


@pytest.fixture(scope="module")
def no_remat(block):
    """Loss and gradients without remat (computed once for every policy)."""
    _, params, xs, _, _ = block
    return jax.jit(jax.value_and_grad(_loss(block, None), argnums=(0, 1)))(params, xs)


@pytest.mark.parametrize("policy", NEW)
def test_policy_keeps_loss_and_gradients(block, no_remat, policy: str) -> None:
    _, params, xs, _, _ = block
    want, want_g = no_remat
    got, got_g = jax.jit(jax.value_and_grad(_loss(block, policy), argnums=(0, 1)))(params, xs)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_policies_rerun_what_they_do_not_keep(block) -> None:
    _, params, xs, _, _ = block
    count = {p: _dots(jax.make_jaxpr(jax.grad(_loss(block, p), argnums=(0, 1)))(params, xs).jaxpr)
             for p in [None, *RERUN]}
    assert {p: count[p] - count[None] for p in RERUN} == {p: STREAMS * k + ATTN for p, k in RERUN.items()}
    # under splash these keep the kernel's residuals: aot.flops adds no re-forward for them
    assert all(not recomputes_attention(p) for p in NEW) and set(NEW) <= SAVES_SPLASH


@pytest.mark.parametrize(("policy", "per_stream"), [("offload_mlp", 2), ("offload_dense", 8)])
def test_offload_policies_move_residuals_to_host(block, policy: str, per_stream: int, capsys) -> None:
    """The residuals the policy offloads are kept in host memory (jax prints their type as `f32<host>[...]`):
    offload_mlp the MLP's up and gate outputs (2 per stream), offload_dense every dense output (8 per stream);
    splash's residuals and everything save_splash_dense keeps stay on the device."""
    _, params, xs, _, _ = block
    hidden = {n: params[n]["mlp"]["up"]["kernel"].shape[1] for n in xs}

    def host(p: str) -> list[str]:
        jax.ad_checkpoint.print_saved_residuals(_loss(block, p), params, xs)
        return sorted(ln.split(" ")[0] for ln in capsys.readouterr().out.splitlines() if "<host>" in ln)

    got = host(policy)
    assert len(got) == per_stream * STREAMS
    if policy == "offload_mlp":
        assert got == sorted(f"f32<host>[2,{xs[n].shape[1]},{hidden[n]}]" for n in xs for _ in range(2))
    assert host("save_splash_dense") == []


def test_config_accepts_every_policy() -> None:
    """`model.remat_policy`'s allowed values (config.py, which cannot import the model) are the REMAT table's."""
    from mirage_jax.config import REMAT_POLICIES

    assert set(REMAT_POLICIES) == {"none", *REMAT}
