"""Learned 3D rotary position embeddings (Mochi's mixed RoPE) and token coordinates.

Frequencies are parameters of shape (axes, heads, head_dim/2): the rotation angle of pair f of head h
for a token at position p is sum_d p[d] * freqs[d, h, f]. Video and reference tokens use (t, h, w);
audio has its own learned (t) frequencies and shares the video time axis: audio frame a sits at the
time of the latent frame that covers it, by the video encoder's frame-to-latent map
(mirage_base/time_map.py; Mochi's VAE on 25-frame chunks: frames 0, 1-6, 7-12, ... -> 0, 1, 2, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mirage_base.time_map import TimeMap


def mixed_rope_init(key: jax.Array, n_axes: int, heads: int, half: int, theta: float = 10000.0) -> jax.Array:
    """RoPE-Mixed initial frequencies: per (head, pair) a random unit direction times 1/theta^(f/half)."""
    base = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    direction = jax.random.normal(key, (n_axes, heads, half), jnp.float32)
    direction = direction / jnp.linalg.norm(direction, axis=0, keepdims=True)
    return direction * base[None, None, :]


def axial_rope_init(n_axes: int, heads: int, half: int, theta: float = 10000.0) -> jax.Array:
    """Axial initial frequencies (as CogVideoX / Wan fix them): every pair rotates along ONE axis. Time gets
    the first half - (n_axes - 1) * (half // (2 * (n_axes - 1))) pairs (half of them for 3 axes), the other
    axes split the rest; each axis has its own ladder 1/theta^(k/n) over its n pairs. Every head then has time-only
    pairs from step 0, whatever the seed; training mixes the axes from there (the frequencies are learned)."""
    per_other = half // (2 * (n_axes - 1)) if n_axes > 1 else 0
    counts = [half - per_other * (n_axes - 1)] + [per_other] * (n_axes - 1)
    freqs = np.zeros((n_axes, half), np.float32)
    start = 0
    for axis, n in enumerate(counts):
        freqs[axis, start:start + n] = 1.0 / theta ** (np.arange(n, dtype=np.float32) / max(n, 1))
        start += n
    return jnp.asarray(np.repeat(freqs[:, None, :], heads, axis=1))


def _centers(start: float, stop: float, num: int) -> np.ndarray:
    edges = np.linspace(start, stop, num + 1, dtype=np.float32)
    return (edges[:-1] + edges[1:]) / 2


def spatial_grid(height: int, width: int, base_height: int, base_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centered, area-normalized (h, w) coordinates of a patch grid, as diffusers' MochiRoPE."""
    scale = (base_height * base_width / (height * width)) ** 0.5
    h = _centers(-height * scale / 2, height * scale / 2, height)
    w = _centers(-width * scale / 2, width * scale / 2, width)
    return h, w


def video_positions(
    times: jax.Array, height: int, width: int, base_height: int, base_width: int
) -> jax.Array:
    """(B, T*height*width, 3) coordinates for latent frames at `times` (B, T), tokens in (t, h, w) order."""
    h, w = spatial_grid(height, width, base_height, base_width)
    b, t = times.shape
    gh, gw = np.meshgrid(h, w, indexing="ij")
    hw = jnp.asarray(np.stack([gh, gw], -1).reshape(1, 1, height * width, 2))
    tt = jnp.broadcast_to(times.astype(jnp.float32)[:, :, None, None], (b, t, height * width, 1))
    pos = jnp.concatenate([tt, jnp.broadcast_to(hw, (b, t, height * width, 2))], axis=-1)
    return pos.reshape(b, t * height * width, 3)


def audio_positions(num_audio: int, time_map: TimeMap, batch: int) -> jax.Array:
    """(B, A, 1) time coordinate of each 25 fps audio frame: the index of the latent frame covering it
    (`time_map.frame_latent`, e.g. causal:6/25 gives 0, 1 x6, 2 x6, 3 x6, 4 x6, 5, 6 x6, ...)."""
    t = jnp.asarray(time_map.frame_latent(num_audio), jnp.float32)
    return jnp.broadcast_to(t[None, :, None], (batch, num_audio, 1))


def rope_angles(freqs: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (B, N, heads, head_dim/2), always computed in float32."""
    ang = jnp.einsum("bnd,dhf->bnhf", pos.astype(jnp.float32), freqs.astype(jnp.float32))
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2f], x[2f+1]) of x (B, N, heads, head_dim) by the given angles."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    xe, xo = xf[..., 0], xf[..., 1]
    out = jnp.stack([xe * cos - xo * sin, xe * sin + xo * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
