"""Conditioning embeddings: sinusoidal timestep MLP and Mochi's attention pool over text."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax.model.layers import dense


def timestep_sinusoid(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin] of t * freqs."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding (diffusers `TimestepEmbedding`)."""

    def __init__(self, freq_dim: int, dim: int, *, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        self.linear_1 = dense(freq_dim, dim, ("vocab", "embed"), rngs=rngs, bias=True)
        self.linear_2 = dense(dim, dim, ("embed", None), rngs=rngs, bias=True)

    def __call__(self, timestep: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(timestep_sinusoid(timestep, self.freq_dim))))


class AttentionPool(nnx.Module):
    """Mochi's text pooler: the masked mean token queries all valid tokens (plus itself)."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.to_kv = dense(in_dim, 2 * in_dim, ("vocab", "heads"), rngs=rngs, bias=True)
        self.to_q = dense(in_dim, in_dim, ("vocab", "heads"), rngs=rngs, bias=True)
        self.to_out = dense(in_dim, out_dim, ("heads", "embed"), rngs=rngs, bias=True)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        m = mask.astype(jnp.float32)[:, :, None]
        pooled = jnp.sum(x.astype(jnp.float32) * (m / jnp.maximum(m.sum(1, keepdims=True), 1.0)), axis=1)
        seq = jnp.concatenate([pooled[:, None, :].astype(x.dtype), x], axis=1)  # (B, 1+L, D)
        keep = jnp.concatenate([jnp.ones((b, 1), bool), mask.astype(bool)], axis=1)
        kv = self.to_kv(seq).reshape(b, n + 1, 2, self.heads, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]  # (B, 1+L, H, hd)
        q = self.to_q(seq[:, 0]).reshape(b, self.heads, hd)
        logits = jnp.einsum("bhd,bkhd->bhk", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
        logits = jnp.where(keep[:, None, :], logits, -jnp.inf)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhk,bkhd->bhd", w, v).reshape(b, d)
        return self.to_out(out)
