"""Splash attention under remat (model/attention.py, model/dit.py REMAT): the kernel's output and logsumexp
carry a checkpoint name inside its custom VJP, so `save_splash*` policies keep them and the backward does
not rerun the forward kernel. Pallas interpret mode on CPU, against the `xla` backend without remat (a
second code path): forward and gradients on a masked batch; and the number of forward kernels whose
results the gradient actually uses (2 under full remat, 1 when the residuals are saved). The same with the
kernel's fused backward (`model.splash_fused_bwd`), and the matmuls inside each kernel's jaxpr against the
per-forward backward costs `aot.flops` adds for it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from mirage_jax.aot.flops import SPLASH_BWD_PER_FWD, SPLASH_FUSED_BWD_PER_FWD
from mirage_jax.model.attention import attention
from mirage_jax.model.dit import QKV_NAME, REMAT, recomputes_attention

# skipped only when this jax build has no Pallas splash kernel (the import attention.py makes)
pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention",
                    reason="this jax build has no Pallas splash attention")

B, S, E, H, D = 2, 40, 32, 2, 16


def _inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, S, E)).astype(np.float32)
    w = (rng.standard_normal((E, 3 * H * D)) / np.sqrt(E)).astype(np.float32)
    mask = np.ones((B, S), bool)
    mask[0, 25:] = False  # padding at the end
    mask[1, 3:9] = False  # a dropped span in the middle
    return jnp.asarray(w), jnp.asarray(x), jnp.asarray(mask)


def _loss(backend: str, policy: str | None, fused_bwd: bool = False):
    """Projections -> attention -> a nonlinear scalar, optionally under jax.checkpoint(policy)."""

    def f(w, x, mask):
        q, k, v = (t.reshape(B, S, H, D) for t in jnp.split(x @ w, 3, axis=-1))
        q, k, v = (checkpoint_name(t, QKV_NAME) for t in (q, k, v))
        return jnp.sum(jnp.sin(attention(q, k, v, mask, backend, interpret=True, splash_fused_bwd=fused_bwd)))

    return jax.checkpoint(f, policy=REMAT[policy]) if policy else f


@pytest.mark.parametrize(("policy", "fused_bwd"), [("save_splash", False), ("save_splash_qkv", False),
                                                   ("full", False), ("save_splash", True), ("full", True)])
def test_splash_remat_matches_xla(policy: str, fused_bwd: bool) -> None:
    w, x, mask = _inputs()
    want, want_g = jax.value_and_grad(_loss("xla", None), argnums=(0, 1))(w, x, mask)
    got, got_g = jax.jit(jax.value_and_grad(_loss("splash", policy, fused_bwd), argnums=(0, 1)))(w, x, mask)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)


def _live_forward_kernels(jaxpr) -> int:
    """Splash forward pallas_calls with at least one output used, in `jaxpr` and the jaxprs nested in it."""
    used = {id(v) for e in jaxpr.eqns for v in e.invars} | {id(v) for v in jaxpr.outvars}
    n = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            n += "_fwd" in str(e.params.get("name", "")) and any(id(v) in used for v in e.outvars)
            continue
        n += sum(_live_forward_kernels(sub) for sub in _subjaxprs(e))
    return n


def _subjaxprs(eqn) -> list:
    """The jaxprs nested in an equation's parameters (scan/cond/remat bodies, a kernel's body)."""
    return [getattr(sub, "jaxpr", sub) for p in eqn.params.values()
            for sub in (p if isinstance(p, tuple | list) else (p,)) if hasattr(getattr(sub, "jaxpr", sub), "eqns")]


def _kernel_matmuls(jaxpr, out: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """{splash kernel kind ('fwd', 'dq', 'dkv'): [dot_generals in its body, per pallas_call]} of `jaxpr`,
    nested jaxprs included (the kernel body's matmuls, as Mosaic will run them)."""
    out = {} if out is None else out
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            kind = next(k for k in ("fwd", "dkv", "dq") if f"_{k}_" in str(e.params.get("name", "")))
            out.setdefault(kind, []).append(_count_dots(e.params["jaxpr"]))
            continue
        for sub in _subjaxprs(e):
            _kernel_matmuls(sub, out)
    return out


def _count_dots(jaxpr) -> int:
    return sum(e.primitive.name == "dot_general" for e in jaxpr.eqns) + sum(
        _count_dots(sub) for e in jaxpr.eqns for sub in _subjaxprs(e))


@pytest.mark.parametrize(("fused_bwd", "kernels", "per_fwd"), [
    (False, {"fwd": [2], "dq": [3], "dkv": [4]}, SPLASH_BWD_PER_FWD),
    (True, {"fwd": [2], "dkv": [5]}, SPLASH_FUSED_BWD_PER_FWD)])
def test_backward_kernels_and_their_matmuls(fused_bwd: bool, kernels: dict, per_fwd: float) -> None:
    """The backward kernels the gradient runs (fused: one kernel, no dq kernel) and their matmuls (QK^T, PV
    forward; dq: QK^T, dO V^T, dS K; dkv: QK^T, dO V^T, P^T dO, dS^T Q, + dS K when fused), counted in the
    kernels' own jaxprs: the backward / forward ratio is the constant aot_flops' correction adds."""
    w, x, mask = _inputs()
    closed = jax.make_jaxpr(jax.grad(_loss("splash", None, fused_bwd), argnums=(0, 1)))(w, x, mask)
    got = _kernel_matmuls(closed.jaxpr)
    assert got == kernels
    assert (sum(got.get("dq", [])) + sum(got["dkv"])) / sum(got["fwd"]) == per_fwd


@pytest.mark.parametrize(("policy", "forwards"), [("full", 2), ("save_attention", 2), ("save_splash", 1),
                                                  ("save_splash_qkv", 1)])
def test_named_residuals_stop_the_forward_rerun(policy: str, forwards: int, capsys) -> None:
    w, x, mask = _inputs()
    closed = jax.make_jaxpr(jax.grad(_loss("splash", policy), argnums=(0, 1)))(w, x, mask)
    assert _live_forward_kernels(closed.jaxpr) == forwards
    assert recomputes_attention(policy) == (forwards == 2)
    jax.ad_checkpoint.print_saved_residuals(_loss("splash", policy), w, x, mask)
    saved = capsys.readouterr().out.splitlines()
    # the kernel's logsumexp, (B, H, padded S), is kept only when its checkpoint name is saved
    assert any(line.startswith(f"f32[{B},{H},128] ") for line in saved) == (forwards == 1)
    assert any(f"named '{QKV_NAME}'" in line for line in saved) == (policy == "save_splash_qkv")


def test_model_scan_keeps_the_residuals() -> None:
    """The same through MirageDiT (nnx.remat inside nnx.scan over the blocks, plus the last block): the
    gradient uses 2 forward kernels per block under full remat, 1 under save_splash; with
    `model.splash_fused_bwd` the blocks run the fused backward kernel and no dq kernel. Traced, not run."""
    from flax import nnx

    from helpers import random_inputs, small_config
    from mirage_jax.model import MirageDiT

    counts, backward = {}, {}
    for policy, fused in (("full", False), ("save_splash", False), ("save_splash", True)):
        cfg = small_config(attention_backend="splash", remat_policy=policy, num_layers=3, scan_layers=True,
                           splash_fused_bwd=fused)
        model = MirageDiT(cfg, rngs=nnx.Rngs(0))
        inp = {k: jnp.asarray(v) for k, v in random_inputs(cfg).items()}

        def loss(m, inp=inp):
            return jnp.mean(m(inp["video"], inp["timestep"], inp["text"], inp["text_mask"], audio=inp["audio"])**2)

        graphdef, params = nnx.split(model)
        closed = jax.make_jaxpr(jax.grad(lambda p, g=graphdef: loss(nnx.merge(g, p))))(params)
        counts[policy, fused] = _live_forward_kernels(closed.jaxpr)
        backward[policy, fused] = {k: len(v) for k, v in _kernel_matmuls(closed.jaxpr).items() if k != "fwd"}
    # scan body + last block: 2 kernel sites, each run once forward and (full remat) once more in the backward
    assert counts == {("full", False): 4, ("save_splash", False): 2, ("save_splash", True): 2}
    assert backward[("save_splash", False)] == {"dq": 2, "dkv": 2}
    assert backward[("save_splash", True)] == {"dkv": 2}
