"""`mochi_vae`: Mochi 1's causal video VAE (diffusers `AutoencoderKLMochi`) in JAX, encoder and decoder.

Pure jax functions over a flat parameter dict keyed by diffusers' own tensor names (so the published
`vae/diffusion_pytorch_model.safetensors` loads with no renaming table), channels-last `[B, T, H, W, C]`.
What it computes, exactly as diffusers 0.42.1 does (tests/test_encoders_mochi_vae.py asserts it):

- encode: pixels in [-1, 1] -> Fourier features (x, sin, cos of 2^6, 2^7 cycles) -> linear -> blocks of
  [per-frame GroupNorm(32) + SiLU + causal 3x3x3 conv] residual units, causal (per spatial position,
  over time) attention with L2-normalised q/k, and kernel = stride down-sampling convs (1, 2, 3 in time,
  2 in space) -> the posterior mean (first `latent_channels` of the output; the VAE mode, as pipelines
  encode). Causal convs pad time by repeating the first frame ("replicate") and space by edge values.
  T frames give 1 + (T - 1) // 6 latent frames: latent 0 sees frame 0 only, latent j frames <= 6 j.
- decode: 1x1x1 conv -> residual blocks -> per up block a linear to (6, 2, 2)-fold channels and
  depth-to-space -> linear to RGB; the first 5 of the 6 T' frames are dropped (the causal first frame),
  so T' latents give 6 (T' - 1) + 1 frames.
- Two time maps (mirage_base/time_map.py; `chunk_frames`): the whole clip causally (rule
  causal:6, 100 frames -> 17 latents), or independent 25-frame chunks each encoded and decoded on its own
  (rule causal:6/25, 5 latents per chunk, 100 frames -> 20: the report's 20 x 160 x 90 latents for 4 s).
- Latents are normalised as diffusers' Mochi pipeline does: z_n = (z - latents_mean) * scaling_factor /
  latents_std on encode, the inverse before decoding.

Bounded memory (numbers in docs/encoders.md):
- Space: overlapping tiles blended exactly like diffusers' `enable_tiling()` (tile `tile` px, stride
  `tile_stride` px); per-frame GroupNorm makes tiled output differ slightly from untiled (as in diffusers),
  so tiled output is tested against diffusers' own tiled output. Tiles bound memory in H and W.
- Time: everything in both networks is causal, so clips can be processed in chunks of
  `decode_chunk_latents` / `encode_chunk_latents` latent frames carrying state: the last 2 input frames of
  every 3-tap causal conv and, in the encoder, the keys/values of every attention layer (a fixed-size cache
  with a position counter, so only two programs compile: the first chunk and the steady chunk). Chunked
  output equals unchunked output (tested). The decoder has no attention, so its memory per chunk is
  independent of the clip length; the encoder's causal attention needs all past keys/values, so its memory
  stays O(T) per tile and encoding whole tiles (the default) is cheaper at clip lengths up to ~10 s.
- Devices: tiles of one shape run together, one per local device (batch axis sharded over a 1-D mesh of
  the local devices, weights replicated); the output equals tile by tile (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.encoders.base import EncoderSpec, check_params
from data_pipeline.encoders.weights import load_weights, take
from mirage_base.safetensors_reader import SINGLE_NAME
from mirage_base.time_map import TimeMap

VERSION = "1"
DEFAULTS: dict[str, Any] = {
    "weights": "",  # diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors) or the file
    "tile": 256,  # spatial tile in pixels (0: no spatial tiling)
    "tile_stride": 192,  # distance between tile starts in pixels (overlap = tile - stride, blended)
    "encode_chunk_latents": 0,  # latent frames per encoder chunk (0: whole clip per tile; see docs/encoders.md)
    "decode_chunk_latents": 4,  # latent frames per decoder chunk (0: whole clip per tile)
    # time: 0 encodes the whole clip causally (100 frames -> 17 latents); C > 0 encodes independent chunks of
    # C frames (C - 1 a multiple of 6; the report's 25-frame chunks: 100 frames -> 4 x 5 = 20 latents) and
    # decodes each chunk's latents on their own (mirage_base/time_map.py)
    "chunk_frames": 0,
}
_HI = jax.lax.Precision.HIGHEST
_WEIGHT_FILES = (SINGLE_NAME, f"vae/{SINGLE_NAME}")


@dataclasses.dataclass(frozen=True)
class MochiVAEConfig:
    """The fields of diffusers' AutoencoderKLMochi config.json that decide the computation."""

    in_channels: int = 15
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 128, 256, 384)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 768)
    latent_channels: int = 12
    layers_per_block: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    add_attention_block: tuple[bool, ...] = (False, True, True, True, True)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str) -> MochiVAEConfig:
        act = d.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: config.json act_fn={act!r}; only silu/swish (Mochi's) is implemented")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        cfg = cls(**kw)
        n = len(cfg.temporal_expansions)
        if not (
            len(cfg.spatial_expansions) == n
            and len(cfg.encoder_block_out_channels) == n + 1
            and len(cfg.decoder_block_out_channels) == n + 1
            and len(cfg.layers_per_block) == n + 2
            and len(cfg.add_attention_block) == n + 2
        ):
            raise ValueError(f"{source}: config.json block lists have inconsistent lengths: {cfg}")
        if cfg.in_channels != 3 + 3 * 2 * 2:
            raise ValueError(f"{source}: config.json in_channels={cfg.in_channels}; Mochi's Fourier features need 15")
        return cfg

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.temporal_expansions)

    @property
    def spatial_factor(self) -> int:
        return math.prod(self.spatial_expansions)


# ---------------------------------------------------------------------------------------------- shapes


def _resnet_shapes(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    s = {}
    for n in ("norm1", "norm2"):
        s[f"{prefix}.{n}.norm_layer.weight"] = (c,)
        s[f"{prefix}.{n}.norm_layer.bias"] = (c,)
    for n in ("conv1", "conv2"):
        s[f"{prefix}.{n}.conv.weight"] = (c, c, 3, 3, 3)
        s[f"{prefix}.{n}.conv.bias"] = (c,)
    return s


def _mid_shapes(prefix: str, c: int, layers: int, attention: bool) -> dict[str, tuple[int, ...]]:
    s = {}
    for i in range(layers):
        s.update(_resnet_shapes(f"{prefix}.resnets.{i}", c))
        if attention:
            s[f"{prefix}.norms.{i}.norm_layer.weight"] = (c,)
            s[f"{prefix}.norms.{i}.norm_layer.bias"] = (c,)
            for n in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{prefix}.attentions.{i}.{n}.weight"] = (c, c)
            s[f"{prefix}.attentions.{i}.to_out.0.bias"] = (c,)
    return s


def expected_shapes(cfg: MochiVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of diffusers' AutoencoderKLMochi state dict with its shape, for `cfg`."""
    s: dict[str, tuple[int, ...]] = {}
    ec, lpb, att = cfg.encoder_block_out_channels, cfg.layers_per_block, cfg.add_attention_block
    s["encoder.proj_in.weight"] = (ec[0], cfg.in_channels)
    s["encoder.proj_in.bias"] = (ec[0],)
    s.update(_mid_shapes("encoder.block_in", ec[0], lpb[0], att[0]))
    for i, (te, se) in enumerate(zip(cfg.temporal_expansions, cfg.spatial_expansions, strict=True)):
        p = f"encoder.down_blocks.{i}"
        s[f"{p}.conv_in.conv.weight"] = (ec[i + 1], ec[i], te, se, se)
        s[f"{p}.conv_in.conv.bias"] = (ec[i + 1],)
        s.update(_mid_shapes(p, ec[i + 1], lpb[i + 1], att[i + 1]))
    s.update(_mid_shapes("encoder.block_out", ec[-1], lpb[-1], att[-1]))
    s["encoder.norm_out.norm_layer.weight"] = (ec[-1],)
    s["encoder.norm_out.norm_layer.bias"] = (ec[-1],)
    s["encoder.proj_out.weight"] = (2 * cfg.latent_channels, ec[-1])
    dc = cfg.decoder_block_out_channels
    s["decoder.conv_in.weight"] = (dc[-1], cfg.latent_channels, 1, 1, 1)
    s["decoder.conv_in.bias"] = (dc[-1],)
    s.update(_mid_shapes("decoder.block_in", dc[-1], lpb[-1], False))
    n = len(cfg.temporal_expansions)
    for i in range(n):
        p = f"decoder.up_blocks.{i}"
        cin, cout = dc[-i - 1], dc[-i - 2]
        te, se = cfg.temporal_expansions[-i - 1], cfg.spatial_expansions[-i - 1]
        s.update(_mid_shapes(p, cin, lpb[-i - 2], False))
        s[f"{p}.proj.weight"] = (cout * te * se * se, cin)
        s[f"{p}.proj.bias"] = (cout * te * se * se,)
    s.update(_mid_shapes("decoder.block_out", dc[0], lpb[0], False))
    s["decoder.proj_out.weight"] = (cfg.out_channels, dc[0])
    s["decoder.proj_out.bias"] = (cfg.out_channels,)
    return s


def load_params(weights: str) -> tuple[MochiVAEConfig, dict[str, jax.Array], dict[str, Any]]:
    """(config, params keyed by diffusers names, raw config.json) from a diffusers VAE folder or file."""
    tensors, raw, source = load_weights(weights, _WEIGHT_FILES, "video encoder mochi_vae")
    cfg = MochiVAEConfig.from_json(raw, source)
    params = {k: jnp.asarray(take(tensors, k, shape, source)) for k, shape in expected_shapes(cfg).items()}
    return cfg, params, raw


# ---------------------------------------------------------------------------------------------- layers


def _linear(x: jax.Array, p: dict[str, jax.Array], name: str, bias: bool = True) -> jax.Array:
    y = jnp.einsum("...i,oi->...o", x, p[f"{name}.weight"], precision=_HI)
    return y + p[f"{name}.bias"] if bias else y


def _group_norm(x: jax.Array, p: dict[str, jax.Array], name: str, groups: int = 32, eps: float = 1e-5) -> jax.Array:
    """Per-frame GroupNorm (MochiChunkedGroupNorm3D): statistics over (H, W, C / groups) of each frame."""
    b, t, h, w, c = x.shape
    xg = x.reshape(b, t, h, w, groups, c // groups)
    mean = xg.mean(axis=(2, 3, 5), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(2, 3, 5), keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + eps)
    return xg.reshape(b, t, h, w, c) * p[f"{name}.norm_layer.weight"] + p[f"{name}.norm_layer.bias"]


def _conv3d(x: jax.Array, w: jax.Array, b: jax.Array, stride: tuple[int, int, int]) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, w, stride, "VALID", dimension_numbers=("NDHWC", "OIDHW", "NDHWC"), precision=_HI
    )
    return y + b


class _State:
    """Per-call carry for temporal chunking: conv caches and attention KV caches, keyed by layer name.

    `prev` is None for the first chunk (causal padding replicates the first frame); `kv_len` is the total
    per-level sequence length the KV caches must hold (None: one-shot, no caches are produced).
    """

    def __init__(self, prev: dict[str, Any] | None, kv_len: int | None):
        self.prev, self.kv_len, self.new = prev, kv_len, {}

    @property
    def first(self) -> bool:
        return self.prev is None


def _causal_conv(
    x: jax.Array, p: dict[str, jax.Array], name: str, stride: tuple[int, int, int], st: _State
) -> jax.Array:
    """CogVideoXCausalConv3d with pad_mode='replicate' (diffusers' default for Mochi), chunkable in time."""
    w, b = p[f"{name}.conv.weight"], p[f"{name}.conv.bias"]
    kt, kh, kw = w.shape[2:]
    if kt > 1:
        if stride[0] == 1:
            front = jnp.repeat(x[:, :1], kt - 1, axis=1) if st.first else st.prev[name]
            x = jnp.concatenate([front, x], axis=1)
            if st.kv_len is not None:
                st.new[name] = x[:, -(kt - 1) :]
        elif stride[0] == kt:  # down-sampling: aligned chunks need no history
            if st.first:
                x = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
        else:
            raise ValueError(f"mochi_vae: {name} has time kernel {kt} and stride {stride[0]}; not supported")
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)), mode="edge")
    return _conv3d(x, w, b, stride)


def _resnet(x: jax.Array, p: dict[str, jax.Array], name: str, st: _State) -> jax.Array:
    h = jax.nn.silu(_group_norm(x, p, f"{name}.norm1"))
    h = _causal_conv(h, p, f"{name}.conv1", (1, 1, 1), st)
    h = jax.nn.silu(_group_norm(h, p, f"{name}.norm2"))
    h = _causal_conv(h, p, f"{name}.conv2", (1, 1, 1), st)
    return h + x


def _attention(x: jax.Array, p: dict[str, jax.Array], name: str, st: _State, kv_total: int | None) -> jax.Array:
    """Causal self-attention over time at every spatial position (MochiVaeAttnProcessor2_0), 32-d heads,
    L2-normalised q and k (eps 1e-5). With chunking, keys/values of earlier chunks come from a fixed-size
    cache of `kv_total` frames and a position counter."""
    b, t, h, w, c = x.shape
    heads, d = c // 32, 32
    seq = x.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
    q, k, v = (_linear(seq, p, f"{name}.{n}", bias=False).reshape(-1, t, heads, d) for n in ("to_q", "to_k", "to_v"))
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-5)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-5)
    if kv_total is None:
        keys, vals, pos = k, v, 0
    else:
        if st.first:
            kc = jnp.zeros((k.shape[0], kv_total, heads, d), k.dtype)
            vc, pos = kc, jnp.int32(0)
        else:
            kc, vc, pos = st.prev[name]
        keys = jax.lax.dynamic_update_slice(kc, k, (0, pos, 0, 0))
        vals = jax.lax.dynamic_update_slice(vc, v, (0, pos, 0, 0))
        st.new[name] = (keys, vals, pos + t)
    s = jnp.einsum("nqhd,nkhd->nhqk", q, keys, precision=_HI) / math.sqrt(d)
    mask = jnp.arange(keys.shape[1])[None, :] <= pos + jnp.arange(t)[:, None]
    s = jnp.where(mask, s, -jnp.inf)
    o = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(s, axis=-1), vals, precision=_HI).reshape(-1, t, c)
    o = _linear(o, p, f"{name}.to_out.0")
    return o.reshape(b, h, w, t, c).transpose(0, 3, 1, 2, 4)


def _mid(x: jax.Array, p: dict[str, jax.Array], prefix: str, st: _State, kv_total: int | None) -> jax.Array:
    i = 0
    while f"{prefix}.resnets.{i}.conv1.conv.weight" in p:
        x = _resnet(x, p, f"{prefix}.resnets.{i}", st)
        if f"{prefix}.attentions.{i}.to_q.weight" in p:
            x = x + _attention(_group_norm(x, p, f"{prefix}.norms.{i}"), p, f"{prefix}.attentions.{i}", st, kv_total)
        i += 1
    return x


def _fourier(x: jax.Array) -> jax.Array:
    """[..., C] -> [..., C + 2 * 2 C]: x, sin and cos of 2 pi 2^f x for f in (6, 7), channel-major."""
    w = (2.0 ** jnp.arange(6, 8, dtype=jnp.float32)) * (2 * jnp.pi)
    h = (x[..., :, None] * w).reshape(*x.shape[:-1], -1)
    return jnp.concatenate([x, jnp.sin(h), jnp.cos(h)], axis=-1)


def _level_lengths(cfg: MochiVAEConfig, frames: int) -> list[int]:
    out, t = [frames], frames
    for te in cfg.temporal_expansions:
        t = (t - 1) // te + 1
        out.append(t)
    return out


def encoder_forward(
    p: dict[str, jax.Array], cfg: MochiVAEConfig, x: jax.Array, prev: Any = None, total_frames: int | None = None
) -> tuple[jax.Array, Any]:
    """Pixels [B, T, H, W, 3] in [-1, 1] -> (raw posterior mean [B, T', h, w, latent_channels], state).

    One-shot: prev=None, total_frames=None. Chunked: the first chunk (1 + 6 k frames) with prev=None and
    total_frames = the (padded) clip length, then chunks of 6 k frames with the returned state.
    """
    st = _State(prev, total_frames)
    lens = None if total_frames is None else _level_lengths(cfg, total_frames)
    h = _linear(_fourier(x), p, "encoder.proj_in")
    h = _mid(h, p, "encoder.block_in", st, None if lens is None else lens[0])
    for i, (te, se) in enumerate(zip(cfg.temporal_expansions, cfg.spatial_expansions, strict=True)):
        pre = f"encoder.down_blocks.{i}"
        h = _causal_conv(h, p, f"{pre}.conv_in", (te, se, se), st)
        h = _mid(h, p, pre, st, None if lens is None else lens[i + 1])
    h = _mid(h, p, "encoder.block_out", st, None if lens is None else lens[-1])
    h = jax.nn.silu(_group_norm(h, p, "encoder.norm_out"))
    h = _linear(h, p, "encoder.proj_out", bias=False)
    return h[..., : cfg.latent_channels], (st.new if total_frames is not None else None)


def decoder_forward(
    p: dict[str, jax.Array], cfg: MochiVAEConfig, z: jax.Array, prev: Any = None, stateful: bool = False
) -> tuple[jax.Array, Any]:
    """Raw latents [B, T', h, w, C] -> (pixels [B, 6 T', H, W, 3] before the causal frame drop, state).

    Chunks of latent frames decode exactly when each call gets the previous call's state (`stateful`)."""
    st = _State(prev, 0 if stateful else None)
    h = _conv3d(z, p["decoder.conv_in.weight"], p["decoder.conv_in.bias"], (1, 1, 1))
    h = _mid(h, p, "decoder.block_in", st, None)
    for i in range(len(cfg.temporal_expansions)):
        pre = f"decoder.up_blocks.{i}"
        te, se = cfg.temporal_expansions[-i - 1], cfg.spatial_expansions[-i - 1]
        h = _mid(h, p, pre, st, None)
        h = _linear(h, p, f"{pre}.proj")
        b, t, hh, ww, c = h.shape
        h = h.reshape(b, t, hh, ww, c // (te * se * se), te, se, se).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        h = h.reshape(b, t * te, hh * se, ww * se, -1)
    h = _mid(h, p, "decoder.block_out", st, None)
    h = _linear(jax.nn.silu(h), p, "decoder.proj_out")
    return h, (st.new if stateful else None)


# the carried state (KV caches, conv caches) is donated: each chunk updates it in place
_encoder_jit = jax.jit(encoder_forward, static_argnames=("cfg", "total_frames"), donate_argnames=("prev",))
_decoder_jit = jax.jit(decoder_forward, static_argnames=("cfg", "stateful"), donate_argnames=("prev",))


# ---------------------------------------------------------------------------------------------- tiling


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """diffusers' blend_v on channels-last arrays ([B, T, H, W, C]; blends along H)."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y] = a[:, :, -extent + y] * (1 - y / extent) + b[:, :, y] * (y / extent)
    return b


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def _tiled(
    fn: Any, x: np.ndarray, in_tile: int, in_stride: int, out_tile: int, out_stride: int, out_hw: tuple,
    batch_fn: Any = None,
) -> np.ndarray:
    """diffusers' tiled_encode / tiled_decode: tiles of `in_tile` every `in_stride` along H and W, each
    through `fn`, blended over `out_tile - out_stride` rows/columns, cropped to `out_hw`.

    `batch_fn(list of same-shape tiles) -> list of outputs` (optional) runs several tiles in one call (the
    local devices each take one); tiles are independent, so the result is the same as tile by tile."""
    _, _, height, width, _ = x.shape
    coords = [(i, j) for i in range(0, height, in_stride) for j in range(0, width, in_stride)]
    tiles = {c: x[:, :, c[0] : c[0] + in_tile, c[1] : c[1] + in_tile] for c in coords}
    run = batch_fn or (lambda group: [np.array(fn(t)) for t in group])
    by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for c in coords:
        by_shape.setdefault(tiles[c].shape, []).append(c)
    done: dict[tuple[int, int], np.ndarray] = {}
    for group in by_shape.values():
        done.update(zip(group, run([tiles[c] for c in group]), strict=True))
    rows = [[done[(i, j)] for j in range(0, width, in_stride)] for i in range(0, height, in_stride)]
    blend = out_tile - out_stride
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, blend)
            parts.append(tile[:, :, :out_stride, :out_stride])
        out_rows.append(np.concatenate(parts, axis=3))
    return np.concatenate(out_rows, axis=2)[:, :, : out_hw[0], : out_hw[1]]


class _TileSharding:
    """Runs a list of same-shape tiles on the local devices at once: tiles are stacked on the batch axis,
    which is sharded over a 1-D mesh of `k = min(devices, tiles)` local devices (one tile per device per
    call, so per-device memory is that of one tile); the weights are replicated once per mesh. The last
    group is padded by repeating its last tile (its output is dropped)."""

    def __init__(self, weights: dict[str, jax.Array], max_devices: int):
        self.weights = weights
        self.devices = jax.local_devices()[: max(1, max_devices)]
        self._replicated: dict[int, tuple[Any, dict[str, jax.Array]]] = {}

    def _mesh(self, k: int) -> tuple[Any, dict[str, jax.Array]]:
        if k not in self._replicated:
            mesh = jax.sharding.Mesh(np.array(self.devices[:k]), ("tiles",))
            rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._replicated[k] = (mesh, jax.device_put(self.weights, rep))
        return self._replicated[k]

    def run(self, fn: Any, tiles: list[np.ndarray]) -> list[np.ndarray]:
        """`fn(x [k*B, ...], weights, put)` for groups of k tiles -> per-tile outputs (numpy)."""
        k = min(len(self.devices), len(tiles))
        if k <= 1:
            return [np.array(fn(t, self.weights, jnp.asarray)) for t in tiles]
        mesh, weights = self._mesh(k)
        sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tiles"))
        b = tiles[0].shape[0]
        outs: list[np.ndarray] = []
        for s in range(0, len(tiles), k):
            group = tiles[s : s + k]
            group = group + [group[-1]] * (k - len(group))
            y = np.asarray(fn(np.concatenate(group, axis=0), weights, lambda a: jax.device_put(a, sharded)))
            outs.extend(np.array(y[g * b : (g + 1) * b]) for g in range(min(k, len(tiles) - s)))  # writable
        return outs


# ---------------------------------------------------------------------------------------------- encoder


class MochiVAE:
    """Mochi's VAE as a frozen video encoder: `encode(frames [T, H, W, 3]) -> latents [L, H/8, W/8, 12]`
    (normalised) and `decode(latents) -> pixels [time_map.frames_for_latents(L), H, W, 3]` in [-1, 1], where
    L = time_map.latent_count(T): 1 + (T-1)//6 for the whole clip, 5 per 25-frame chunk with chunk_frames=25."""

    name = "mochi_vae"
    version = VERSION

    def __init__(self, **params: Any):
        self.params = check_params("video", self.name, params, DEFAULTS)
        self.cfg, self.weights, raw = load_params(str(self.params["weights"]))
        self.tile, self.tile_stride = int(self.params["tile"]), int(self.params["tile_stride"])
        self.encode_chunk = int(self.params["encode_chunk_latents"])
        self.decode_chunk = int(self.params["decode_chunk_latents"])
        try:
            self.time_map = TimeMap("causal", self.cfg.temporal_factor, int(self.params["chunk_frames"]))
        except ValueError as e:
            raise ValueError(f"video encoder mochi_vae: chunk_frames={self.params['chunk_frames']}: {e}") from e
        # tiles of one shape run together, one per local device (output unchanged; 1 = tile by tile)
        self.tile_devices = len(jax.local_devices())
        self._sharding: _TileSharding | None = None
        f = self.cfg.spatial_factor
        if self.tile and (self.tile % f or self.tile_stride % f or not 0 < self.tile_stride <= self.tile):
            raise ValueError(
                f"video encoder mochi_vae: tile={self.tile}, tile_stride={self.tile_stride} must be multiples of "
                f"the spatial factor {f} with 0 < tile_stride <= tile (or tile=0 for no tiling)"
            )
        c = self.cfg.latent_channels
        mean, std = raw.get("latents_mean"), raw.get("latents_std")
        self.scaling = float(raw.get("scaling_factor", 1.0))
        if mean is None or std is None:  # diffusers' pipeline then only divides by scaling_factor
            mean, std = [0.0] * c, [1.0] * c
        if len(mean) != c or len(std) != c:
            raise ValueError(f"video encoder mochi_vae: config.json latents_mean/std must have {c} entries")
        self.latents_mean = np.asarray(mean, np.float32)
        self.latents_std = np.asarray(std, np.float32)

    @property
    def spatial_factor(self) -> int:
        return self.cfg.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.cfg.temporal_factor

    @property
    def frame_multiple(self) -> int:
        """Clip lengths need not be multiples of anything (T -> 1 + (T-1)//6); 6k+1 wastes no frame."""
        return 1

    @property
    def channels(self) -> int:
        return self.cfg.latent_channels

    def latent_frames(self, frames: int) -> int:
        """Latent frames for `frames` frames under this encoder's time map (whole clip: 1 + (T - 1) // 6)."""
        return self.time_map.latent_count(frames)

    def spec(self, height: int | None = None, width: int | None = None) -> EncoderSpec:
        f = self.spatial_factor
        h = None if height is None else height // f
        w = None if width is None else width // f
        return EncoderSpec(self.name, self.version, dict(self.params), "float32", (None, h, w, self.channels))

    # -- raw (unnormalised) networks on [B, T, H, W, C] arrays, chunked in time, tiled in space --

    def encode_raw(self, x: np.ndarray) -> np.ndarray:
        """Pixels [B, T, H, W, 3] in [-1, 1] -> raw posterior mean [B, time_map.latent_count(T), H/8, W/8, C]:
        the whole clip causally, or each chunk of `chunk_frames` frames on its own, concatenated in time."""
        c = self.time_map.chunk
        if c and x.shape[1] > c:
            return np.concatenate([self._encode_clip(x[:, s : s + c]) for s in range(0, x.shape[1], c)], axis=1)
        return self._encode_clip(x)

    def _encode_clip(self, x: np.ndarray) -> np.ndarray:
        f = self.spatial_factor
        _, _, height, width, _ = x.shape
        if self.tile and (height > self.tile or width > self.tile):
            return _tiled(
                self._encode_time,
                x,
                self.tile,
                self.tile_stride,
                self.tile // f,
                self.tile_stride // f,
                (height // f, width // f),
                batch_fn=self._batch_fn(self._encode_time),
            )
        return self._encode_time(x)

    def _batch_fn(self, fn: Any) -> Any:
        if self.tile_devices <= 1:
            return None
        if self._sharding is None or len(self._sharding.devices) != self.tile_devices:
            self._sharding = _TileSharding(self.weights, self.tile_devices)
        return functools.partial(self._sharding.run, fn)

    def _encode_time(self, x: np.ndarray, weights: Any = None, put: Any = jnp.asarray) -> np.ndarray:
        cfg, k, tt = self.cfg, self.encode_chunk, self.temporal_factor
        weights = self.weights if weights is None else weights
        t = x.shape[1]
        first = 1 + tt * (k - 1)
        if k <= 0 or t <= first:
            return np.asarray(_encoder_jit(weights, cfg, put(x))[0])
        step = tt * k
        total = first + step * math.ceil((t - first) / step)
        x = np.concatenate([x, np.repeat(x[:, -1:], total - t, axis=1)], axis=1)  # causal: never read back
        out, state = _encoder_jit(weights, cfg, put(x[:, :first]), None, total)
        outs = [np.asarray(out)]
        for s in range(first, total, step):
            out, state = _encoder_jit(weights, cfg, put(x[:, s : s + step]), state, total)
            outs.append(np.asarray(out))
        return np.concatenate(outs, axis=1)[:, : (t - 1) // tt + 1]

    def decode_raw(self, z: np.ndarray) -> np.ndarray:
        """Raw latents [B, T', h, w, C] -> pixels [B, time_map.frames_for_latents(T'), 8 h, 8 w, 3] (unclipped,
        as diffusers): each chunk's latents decode on their own when `chunk_frames` is set."""
        k = self.time_map.chunk_latents if self.time_map.chunk else 0
        if k and z.shape[1] > k:
            return np.concatenate([self._decode_clip(z[:, s : s + k]) for s in range(0, z.shape[1], k)], axis=1)
        return self._decode_clip(z)

    def _decode_clip(self, z: np.ndarray) -> np.ndarray:
        f = self.spatial_factor
        _, _, h, w, _ = z.shape
        if self.tile and (h > self.tile // f or w > self.tile // f):
            return _tiled(
                self._decode_time, z, self.tile // f, self.tile_stride // f, self.tile, self.tile_stride,
                (h * f, w * f), batch_fn=self._batch_fn(self._decode_time),
            )
        return self._decode_time(z)

    def _decode_time(self, z: np.ndarray, weights: Any = None, put: Any = jnp.asarray) -> np.ndarray:
        cfg, k, tt = self.cfg, self.decode_chunk, self.temporal_factor
        weights = self.weights if weights is None else weights
        t = z.shape[1]
        if k <= 0 or t <= k:
            out = np.asarray(_decoder_jit(weights, cfg, put(z))[0])
        else:
            total = k * math.ceil(t / k)
            z = np.concatenate([z, np.repeat(z[:, -1:], total - t, axis=1)], axis=1)  # causal: never read back
            outs, state = [], None
            for s in range(0, total, k):
                o, state = _decoder_jit(weights, cfg, put(z[:, s : s + k]), state, True)
                outs.append(np.asarray(o))
            out = np.concatenate(outs, axis=1)[:, : t * tt]
        return out[:, tt - 1 :] if out.shape[1] >= tt else out

    # -- the encoder interface (one clip, channels-last, normalised latents) --

    def normalize(self, z: np.ndarray) -> np.ndarray:
        return ((z - self.latents_mean) * (self.scaling / self.latents_std)).astype(np.float32)

    def denormalize(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, np.float32) * (self.latents_std / self.scaling) + self.latents_mean).astype(np.float32)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Pixels [T, H, W, 3] (uint8, or float in [-1, 1]) -> normalised latents [latent_frames(T), H/8, W/8, 12]."""
        x = np.asarray(frames)
        f = self.spatial_factor
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"video encoder mochi_vae: expected frames [T, H, W, 3], got shape {x.shape}")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"video encoder mochi_vae: frames {x.shape[1]}x{x.shape[2]} (H x W) are not multiples of {f}; "
                "resize them (--size=WxH)"
            )
        x = x.astype(np.float32) / np.float32(127.5) - np.float32(1.0) if x.dtype == np.uint8 else x.astype(np.float32)
        return self.normalize(self.encode_raw(x[None])[0])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Normalised latents [T', h, w, 12] -> pixels [time_map.frames_for_latents(T'), 8 h, 8 w, 3] float32
        clipped to [-1, 1] (whole clip: 6 (T'-1) + 1 frames)."""
        z = np.asarray(latents, np.float32)
        if z.ndim != 4 or z.shape[-1] != self.channels:
            raise ValueError(
                f"video encoder mochi_vae: expected latents [T, h, w, {self.channels}], got shape {z.shape}"
            )
        return np.clip(self.decode_raw(self.denormalize(z)[None])[0], -1.0, 1.0).astype(np.float32)

    @staticmethod
    def to_uint8(pixels: np.ndarray) -> np.ndarray:
        """Pixels in [-1, 1] -> uint8 (rounded, clipped)."""
        return np.clip(np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _cached(params: tuple[tuple[str, Any], ...]) -> MochiVAE:
    return MochiVAE(**dict(params))


def get(**params: Any) -> MochiVAE:
    """Registry factory: one loaded VAE per parameter set per process (weights load once per worker)."""
    p = check_params("video", MochiVAE.name, params, DEFAULTS)
    return _cached(tuple(sorted(p.items())))
