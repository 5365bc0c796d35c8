"""The custom VJPs of model/layers.py (modulated RMSNorm, SwiGLU, the dense layers' matmul) against JAX autodiff
of their plain formulas (a second code path), for every scale shape the model uses and in bfloat16. The whole
chain is also checked against PyTorch autograd of diffusers' Mochi in tests/test_warm_start.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_jax.model.dit import REMAT
from mirage_jax.model.layers import dense, linear, modulated_rms_norm, rms_norm, swiglu


def _compare(f, ref, args, dtype, atol):
    keys = jax.random.split(jax.random.key(0), len(args) + 1)
    xs = [jax.random.normal(k, s).astype(dtype) * 2 for k, s in zip(keys, args, strict=False)]
    out, vjp = jax.vjp(f, *xs)
    ref_out, ref_vjp = jax.vjp(ref, *xs)
    g = jax.random.normal(keys[-1], out.shape).astype(out.dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=atol)
    for a, b in zip(vjp(g), ref_vjp(g), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-1)])
@pytest.mark.parametrize("scale_shape", [(2, 1, 24), (24,), (2, 5, 24)])
def test_modulated_rms_norm_matches_autodiff(dtype, atol, scale_shape):
    def ref(x, scale):
        return (rms_norm(x, 1e-6) * scale.astype(jnp.float32)).astype(x.dtype)

    _compare(lambda x, s: modulated_rms_norm(x, s, 1e-6), ref, [(2, 5, 24), scale_shape], dtype, atol)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-1)])
def test_swiglu_matches_autodiff(dtype, atol):
    _compare(swiglu, lambda u, g: u * jax.nn.silu(g), [(2, 5, 24), (2, 5, 24)], dtype, atol)


def test_custom_vjps_keep_only_their_inputs():
    x = jnp.ones((2, 5, 24))
    _, vjp = jax.vjp(lambda x, s: modulated_rms_norm(x, s, 1e-6), x, jnp.ones((24,)))
    assert sorted(a.shape for a in jax.tree.leaves(vjp)) == [(2, 5, 24), (24,)]
    _, vjp = jax.vjp(swiglu, x, x)
    assert [a.shape for a in jax.tree.leaves(vjp)] == [(2, 5, 24)] * 2


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-1)])
@pytest.mark.parametrize("x_shape", [(7, 24), (2, 5, 24), (2, 3, 5, 24)])
def test_linear_matches_autodiff(dtype, atol, x_shape):
    _compare(linear, lambda x, w: x @ w, [x_shape, (24, 40)], dtype, atol)


def test_dense_layers_use_linear_and_keep_remat_dot_policies(capsys):
    """nnx.Linear built by `dense` runs `linear` (same values as lax.dot_general); under the remat policies that
    save matmul outputs, a chain of dense layers keeps the same residuals as plain matmuls under JAX's own dot
    policies (a dot inside a custom VJP is invisible to those: `DENSE_NAME` makes it visible)."""
    layer = dense(24, 40, (None, None), rngs=nnx.Rngs(0), bias=True)
    x = jax.random.normal(jax.random.key(1), (2, 5, 24))
    kernel, bias = layer.kernel[...], layer.bias[...]
    np.testing.assert_allclose(layer(x), x @ kernel + bias, rtol=1e-6, atol=1e-6)

    def chain(f):
        return lambda x: jnp.sum(jnp.tanh(f(jnp.tanh(f(x) @ kernel.T))) ** 2)

    def saved(f, policy):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(chain(f), policy=policy), x)
        return sorted(line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if "argument" not in line
                      and "constant" not in line)

    plain = jax.checkpoint_policies
    for ours, reference in (("dots", plain.checkpoint_dots), ("dots_no_batch", plain.dots_with_no_batch_dims_saveable),
                            ("full", plain.nothing_saveable)):
        assert saved(layer, REMAT[ours]) == saved(lambda x: x @ kernel + bias, reference), ours
