"""The `xla` attention backend's custom VJP (model/attention.softmax_attention) against PyTorch's
scaled_dot_product_attention and its autograd (an independent implementation), forward and gradients on a
masked batch; in bfloat16 against jax.nn.dot_product_attention's autodiff; and its residuals: no (B, H, S, S)
array is kept for the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.model.attention import attention

B, S, H, D = 2, 48, 3, 16


def _inputs():
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(4))
    mask = np.ones((B, S), bool)
    mask[0, 30:] = False  # padding at the end
    mask[1, 5:12] = False  # a dropped span in the middle
    return q, k, v, g, mask


def _jax_value_and_grads(q, k, v, g, mask, backend, dtype=jnp.float32):
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]

    def f(q, k, v):
        return attention(q, k, v, jnp.asarray(mask), backend)

    out, vjp = jax.vjp(f, *args)
    grads = vjp(jnp.asarray(g, out.dtype))
    return np.asarray(out, np.float32), [np.asarray(x, np.float32) for x in grads]


def test_forward_and_gradients_match_pytorch_sdpa():
    torch = pytest.importorskip("torch")
    q, k, v, g, mask = _inputs()
    out, grads = _jax_value_and_grads(q, k, v, g, mask, "xla")

    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))  # (B, H, S, D)
    keep = torch.tensor(mask)
    t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=keep[:, None, None, :])
    t_out = t_out.transpose(1, 2) * keep[:, :, None, None]  # (B, S, H, D); masked query rows are zero
    t_out.backward(torch.tensor(g))
    np.testing.assert_allclose(out, t_out.detach().numpy(), atol=2e-5)
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad), strict=True):
        np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 1, 3), atol=5e-5)
    # a masked key receives no gradient; a masked query row neither
    assert np.all(grads[1][0, 30:] == 0) and np.all(grads[2][1, 5:12] == 0)
    assert np.all(grads[0][0, 30:] == 0)


def test_bfloat16_matches_dot_product_attention_autodiff():
    q, k, v, g, mask = _inputs()
    out, grads = _jax_value_and_grads(q, k, v, g, mask, "xla", jnp.bfloat16)
    ref_out, ref_grads = _jax_value_and_grads(q, k, v, g, mask, "dot_product", jnp.bfloat16)
    np.testing.assert_allclose(out, ref_out, atol=3e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=6e-2, rtol=5e-2)


def test_backward_keeps_no_square_residual():
    q, k, v, _, mask = _inputs()

    def f(q, k, v):
        return attention(q, k, v, jnp.asarray(mask), "xla")

    _, vjp = jax.vjp(f, *(jnp.asarray(x) for x in (q, k, v)))
    shapes = [x.shape for x in jax.tree.leaves(vjp)]
    assert (B, S, H, D) in shapes  # q, k, v, output are kept...
    assert not [s for s in shapes if s[-2:] == (S, S)], shapes  # ...the softmax is not
    # the autodiff reference does keep it
    _, ref_vjp = jax.vjp(lambda q, k, v: attention(q, k, v, jnp.asarray(mask), "dot_product"),
                         *(jnp.asarray(x) for x in (q, k, v)))
    assert [x.shape for x in jax.tree.leaves(ref_vjp) if x.shape[-2:] == (S, S)]
