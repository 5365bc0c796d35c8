"""The name/shape table from diffusers' `MochiTransformer3DModel` to MirageDiT, as data, with its transforms.

Each row: (source name relative to the model or to `transformer_blocks.{i}.`, target path in the nnx
parameter tree relative to the model or to a block, Transform, which blocks). Scanned blocks
(0..L-2) are stacked on a leading `layers` axis under `blocks`; block L-1 is `last_block`.
A Transform holds everything about one layout change: `forward` (warm start, whole tensor), `shape` and
`read_slice` (warm start, one device's block without reading the rest) and `inverse` (export).
Genmo's original single-file layout fuses qkv and swaps scale/shift (more than names): it is not read;
the warm start refuses it and points to diffusers' conversion script.

Public API besides the table: `convert_mochi_state(tensors, cfg)` converts a whole in-memory diffusers state
dict to {target path: array} (the warm start reads slice by slice instead) and `assign_params(model, values)`
writes such a dict into a live model; with them a diffusers or exported model's weights are loaded into a
MirageDiT in a notebook, and the parity tests load the PyTorch peer's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mirage_jax.config import ModelConfig

Path = tuple[str, ...]
Reader = Callable[[tuple[slice, ...]], np.ndarray]  # source index -> source[index]


def unit_slice(s: slice, n: int) -> slice:
    """`s` over an axis of length `n` as slice(start, stop); ValueError if strided (shards never are)."""
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("strided shards are not supported")
    return slice(start, stop)


class Transform:
    """Identity: the torch tensor (source) is the nnx leaf (target). Subclasses change the layout.

    `parts` > 1: one source tensor holds that many targets stacked on its rows (SwiGLU's fused projection:
    value then gate); this transform yields target number `part`, and `inverse` gives its block of rows.
    """

    name = "id"
    parts, part = 1, 0

    def forward(self, w: np.ndarray) -> np.ndarray:
        """The target from the whole source tensor."""
        return w

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The target's shape from the source's, without reading it."""
        return tuple(shape)

    def inverse(self, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """The source tensor (its rows for `part` if parts > 1) from the target."""
        return value

    def read_slice(self, read: Reader, shape: Sequence[int], index: Sequence[slice]) -> np.ndarray:
        """forward(source)[index] for a source of `shape`, reading through `read` only what that block needs."""
        idx = tuple(unit_slice(s, n) for s, n in zip(index, self.shape(shape), strict=True))
        return self._read(read, tuple(shape), idx)

    def _read(self, read: Reader, shape: tuple[int, ...], idx: tuple[slice, ...]) -> np.ndarray:
        return read(idx)

    def __repr__(self) -> str:
        return self.name


class Transpose(Transform):
    """torch Linear weight (out, in) <-> kernel (in, out)."""

    name = "T"

    def forward(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w.T)

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(reversed(shape))

    def inverse(self, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return value.T

    def _read(self, read: Reader, shape: tuple[int, ...], idx: tuple[slice, ...]) -> np.ndarray:
        return np.ascontiguousarray(read(tuple(reversed(idx))).T)


class ConvPatch(Transform):
    """torch Conv2d (D, C, p, p) <-> dense kernel (p*p*C, D) over patch vectors ordered (ph, pw, c)."""

    name = "conv_patch"

    def forward(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]))

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        d, c, p1, p2 = shape
        return (p1 * p2 * c, d)

    def inverse(self, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        p = cfg.patch_size
        return value.reshape(p, p, -1, value.shape[-1]).transpose(3, 2, 0, 1)

    def _read(self, read: Reader, shape: tuple[int, ...], idx: tuple[slice, ...]) -> np.ndarray:
        # rows mix (ph, pw, c): read the needed output channels whole (a small tensor)
        full = self.forward(read((idx[1], slice(None), slice(None), slice(None))))
        return np.ascontiguousarray(full[idx[0]])


class SwiGLUHalf(Transform):
    """SwiGLU's fused torch projection (2*hidden, dim): rows [0, hidden) are the value (`up`, part 0),
    rows [hidden, 2*hidden) the gate (part 1); each target is its half transposed, (dim, hidden)."""

    parts = 2

    def __init__(self, part: int):
        self.part, self.name = part, f"T_half{part}"

    def forward(self, w: np.ndarray) -> np.ndarray:
        n = w.shape[0] // 2
        return np.ascontiguousarray(w[self.part * n:(self.part + 1) * n].T)

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (shape[1], shape[0] // 2)

    def inverse(self, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return value.T

    def _read(self, read: Reader, shape: tuple[int, ...], idx: tuple[slice, ...]) -> np.ndarray:
        off = self.part * (shape[0] // 2)
        rows = slice(idx[1].start + off, idx[1].stop + off)
        return np.ascontiguousarray(read((rows, idx[0])).T)


ID, T, CONV_PATCH, UP, GATE = Transform(), Transpose(), ConvPatch(), SwiGLUHalf(0), SwiGLUHalf(1)

GLOBAL_TABLE: list[tuple[str, Path, Transform]] = [
    ("pos_frequencies", ("pos_frequencies",), ID),
    ("patch_embed.proj.weight", ("patch_embed", "kernel"), CONV_PATCH),
    ("patch_embed.proj.bias", ("patch_embed", "bias"), ID),
    ("time_embed.timestep_embedder.linear_1.weight", ("time_embed", "linear_1", "kernel"), T),
    ("time_embed.timestep_embedder.linear_1.bias", ("time_embed", "linear_1", "bias"), ID),
    ("time_embed.timestep_embedder.linear_2.weight", ("time_embed", "linear_2", "kernel"), T),
    ("time_embed.timestep_embedder.linear_2.bias", ("time_embed", "linear_2", "bias"), ID),
    ("time_embed.pooler.to_kv.weight", ("text_pool", "to_kv", "kernel"), T),
    ("time_embed.pooler.to_kv.bias", ("text_pool", "to_kv", "bias"), ID),
    ("time_embed.pooler.to_q.weight", ("text_pool", "to_q", "kernel"), T),
    ("time_embed.pooler.to_q.bias", ("text_pool", "to_q", "bias"), ID),
    ("time_embed.pooler.to_out.weight", ("text_pool", "to_out", "kernel"), T),
    ("time_embed.pooler.to_out.bias", ("text_pool", "to_out", "bias"), ID),
    ("time_embed.caption_proj.weight", ("caption_proj", "kernel"), T),
    ("time_embed.caption_proj.bias", ("caption_proj", "bias"), ID),
    ("norm_out.linear.weight", ("norm_out", "kernel"), T),
    ("norm_out.linear.bias", ("norm_out", "bias"), ID),
    ("proj_out.weight", ("proj_out", "kernel"), T),
    ("proj_out.bias", ("proj_out", "bias"), ID),
]

# which: "all" blocks, "full" = every block but the last (context pre-only) one, "last" = the last only
BLOCK_TABLE: list[tuple[str, Path, Transform, str]] = [
    ("norm1.linear.weight", ("video", "mod", "kernel"), T, "all"),
    ("norm1.linear.bias", ("video", "mod", "bias"), ID, "all"),
    ("norm1_context.linear.weight", ("text", "mod", "kernel"), T, "full"),
    ("norm1_context.linear.bias", ("text", "mod", "bias"), ID, "full"),
    ("norm1_context.linear_1.weight", ("text", "mod", "kernel"), T, "last"),
    ("norm1_context.linear_1.bias", ("text", "mod", "bias"), ID, "last"),
    ("attn1.to_q.weight", ("video", "q", "kernel"), T, "all"),
    ("attn1.to_k.weight", ("video", "k", "kernel"), T, "all"),
    ("attn1.to_v.weight", ("video", "v", "kernel"), T, "all"),
    ("attn1.norm_q.weight", ("video", "q_norm"), ID, "all"),
    ("attn1.norm_k.weight", ("video", "k_norm"), ID, "all"),
    ("attn1.add_q_proj.weight", ("text", "q", "kernel"), T, "all"),
    ("attn1.add_k_proj.weight", ("text", "k", "kernel"), T, "all"),
    ("attn1.add_v_proj.weight", ("text", "v", "kernel"), T, "all"),
    ("attn1.norm_added_q.weight", ("text", "q_norm"), ID, "all"),
    ("attn1.norm_added_k.weight", ("text", "k_norm"), ID, "all"),
    ("attn1.to_out.0.weight", ("video", "o", "kernel"), T, "all"),
    ("attn1.to_out.0.bias", ("video", "o", "bias"), ID, "all"),
    ("attn1.to_add_out.weight", ("text", "o", "kernel"), T, "full"),
    ("attn1.to_add_out.bias", ("text", "o", "bias"), ID, "full"),
    ("ff.net.0.proj.weight", ("video", "mlp", "up", "kernel"), UP, "all"),
    ("ff.net.0.proj.weight", ("video", "mlp", "gate", "kernel"), GATE, "all"),
    ("ff.net.2.weight", ("video", "mlp", "down", "kernel"), T, "all"),
    ("ff_context.net.0.proj.weight", ("text", "mlp", "up", "kernel"), UP, "full"),
    ("ff_context.net.0.proj.weight", ("text", "mlp", "gate", "kernel"), GATE, "full"),
    ("ff_context.net.2.weight", ("text", "mlp", "down", "kernel"), T, "full"),
]


# Mirage's audio stream in the same (diffusers-style) naming, used by export and by warm starts from a
# Mirage export; a Mochi source has none of these and warm_start initialises them.
AUDIO_GLOBAL_TABLE: list[tuple[str, Path, Transform]] = [
    ("audio_proj.weight", ("audio_proj", "kernel"), T),
    ("audio_proj.bias", ("audio_proj", "bias"), ID),
    ("audio_pos_frequencies", ("audio_pos_frequencies",), ID),
]

AUDIO_BLOCK_TABLE: list[tuple[str, Path, Transform, str]] = [
    ("norm1_audio.linear.weight", ("audio", "mod", "kernel"), T, "full"),
    ("norm1_audio.linear.bias", ("audio", "mod", "bias"), ID, "full"),
    ("norm1_audio.linear_1.weight", ("audio", "mod", "kernel"), T, "last"),
    ("norm1_audio.linear_1.bias", ("audio", "mod", "bias"), ID, "last"),
    ("attn1.add_audio_q_proj.weight", ("audio", "q", "kernel"), T, "all"),
    ("attn1.add_audio_k_proj.weight", ("audio", "k", "kernel"), T, "all"),
    ("attn1.add_audio_v_proj.weight", ("audio", "v", "kernel"), T, "all"),
    ("attn1.norm_audio_q.weight", ("audio", "q_norm"), ID, "all"),
    ("attn1.norm_audio_k.weight", ("audio", "k_norm"), ID, "all"),
    ("attn1.to_audio_out.weight", ("audio", "o", "kernel"), T, "full"),
    ("attn1.to_audio_out.bias", ("audio", "o", "bias"), ID, "full"),
    ("ff_audio.net.0.proj.weight", ("audio", "mlp", "up", "kernel"), UP, "full"),
    ("ff_audio.net.0.proj.weight", ("audio", "mlp", "gate", "kernel"), GATE, "full"),
    ("ff_audio.net.2.weight", ("audio", "mlp", "down", "kernel"), T, "full"),
]


def block_rows(i: int, num_layers: int, table: list[tuple[str, Path, Transform, str]] | None = None
               ) -> list[tuple[str, Path, Transform]]:
    """Rows of a block table (default BLOCK_TABLE) for block i, with full source names and target paths."""
    last = i == num_layers - 1
    rows = []
    for src, dst, fn, which in BLOCK_TABLE if table is None else table:
        if (which == "full" and last) or (which == "last" and not last):
            continue
        rows.append((f"transformer_blocks.{i}.{src}", (("last_block",) if last else ("blocks",)) + dst, fn))
    return rows


def mochi_rows(num_layers: int, *, audio: bool = False) -> list[tuple[str, Path, Transform, int | None]]:
    """Every (source, target, transform, layer index or None for unstacked) row for a model of this depth;
    `audio=True` adds the audio stream's rows (Mirage's own naming)."""
    rows: list[tuple[str, Path, Transform, int | None]] = [(s, d, f, None) for s, d, f in GLOBAL_TABLE]
    if audio:
        rows += [(s, d, f, None) for s, d, f in AUDIO_GLOBAL_TABLE]
    for i in range(num_layers):
        stacked = i < num_layers - 1
        rows += [(s, d, f, i if stacked else None) for s, d, f in block_rows(i, num_layers)]
        if audio:
            rows += [(s, d, f, i if stacked else None) for s, d, f in block_rows(i, num_layers, AUDIO_BLOCK_TABLE)]
    return rows


# ModelConfig fields whose value diffusers' `MochiTransformer3DModel` fixes in its code, not in config.json
# (diffusers/models/transformers/transformer_mochi.py, embeddings.py): field -> (value, where diffusers fixes it).
# A head count or a RoPE base changes no tensor shape, so the warm start's shape check cannot see them; a Mirage
# config that differs computes something other than Mochi and is refused by name (warm_start.core).
# The rest of Mochi's fixed numerics are Mirage constants, not fields, and are the same by construction (tested
# against diffusers in tests/test_warm_start.py): block norms eps 1e-6 and q/k RMSNorm eps 1e-5 (model/dit.py
# NORM_EPS, QK_EPS; the `qk_norm` config key is read by no diffusers layer: MochiAttention always builds
# MochiRMSNorm), the timestep sinusoid `Timesteps(time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)`
# with max period 10000 (model/embeddings.py), SwiGLU feed-forwards (`activation_fn`, checked below), the masked-
# mean query of MochiAttentionPool, RMSNormZero's (scale_msa, gate_msa, scale_mlp, gate_mlp) modulation layout,
# the last block's context_pre_only and the layer-norm AdaLayerNormContinuous output. `rope_theta` and
# `rope_init` only initialize the learned `pos_frequencies`, which the warm start copies, so they are not checked.
MOCHI_FIXED_FIELDS: dict[str, tuple[object, str]] = {
    "pool_heads": (8, "MochiCombinedTimestepCaptionEmbedding(num_attention_heads=8)"),
    "rope_base_height": (192, "MochiRoPE() with base_height=192"),
    "rope_base_width": (192, "MochiRoPE() with base_width=192"),
    "mlp_ratio_video": (4.0, "MochiTransformerBlock's ff_inner_dim = (4 * dim * 2) // 3"),
    "mlp_ratio_text": (4.0, "MochiTransformerBlock's ff_context_inner_dim = (4 * pooled_projection_dim * 2) // 3"),
}
# config.json keys diffusers reads whose other values MirageDiT cannot compute: key -> (allowed values, default)
MOCHI_REQUIRED_KEYS: dict[str, tuple[tuple[object, ...], object]] = {"activation_fn": (("swiglu",), "swiglu")}


def mochi_config_to_model(src: Mapping[str, object]) -> dict[str, object]:
    """ModelConfig fields implied by a diffusers Mochi `config.json` (the rest keep Mirage defaults; the fields
    diffusers fixes in code are `MOCHI_FIXED_FIELDS`). ValueError names a config.json key MirageDiT cannot follow.
    """
    heads, hd = int(src.get("num_attention_heads", 24)), int(src.get("attention_head_dim", 128))
    out_ch = src.get("out_channels")
    in_ch = int(src.get("in_channels", 12))
    if out_ch not in (None, in_ch):
        raise ValueError(f"config.json: out_channels={out_ch} != in_channels={in_ch} is not supported")
    for key, (allowed, default) in MOCHI_REQUIRED_KEYS.items():
        if src.get(key, default) not in allowed:
            raise ValueError(f"config.json: {key}={src.get(key)!r} is not supported (MirageDiT computes "
                             f"{' or '.join(map(repr, allowed))})")
    return {
        "patch_size": int(src.get("patch_size", 2)),
        "num_heads": heads,
        "head_dim": hd,
        "num_layers": int(src.get("num_layers", 48)),
        "video_dim": heads * hd,
        "text_dim": int(src.get("pooled_projection_dim", 1536)),
        "latent_channels": in_ch,
        "text_embed_dim": int(src.get("text_embed_dim", 4096)),
        "time_embed_dim": int(src.get("time_embed_dim", 256)),
        "max_text_len": int(src.get("max_sequence_length", 256)),
    }


def convert_mochi_state(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, *, audio: bool = False
                        ) -> dict[Path, np.ndarray]:
    """Whole-tensor conversion of a Mochi state dict into {target path: array} (stacked blocks stacked).

    The streaming, sharded warm start reads the same rows slice by slice; this in-memory form serves
    tests and small models.
    """
    out: dict[Path, np.ndarray] = {}
    stacks: dict[Path, dict[int, np.ndarray]] = {}
    for src, dst, fn, layer in mochi_rows(cfg.num_layers, audio=audio):
        if src not in tensors:
            raise KeyError(f"source tensor {src!r} is missing")
        value = fn.forward(np.asarray(tensors[src]))
        if layer is None:
            out[dst] = value
        else:
            stacks.setdefault(dst, {})[layer] = value
    for dst, layers in stacks.items():
        out[dst] = np.stack([layers[i] for i in range(len(layers))])
    return out


def assign_params(model: object, values: Mapping[Path, np.ndarray]) -> None:
    """Write {path: array} into the model's nnx.Param leaves in place; every path must exist with its shape."""
    import jax.numpy as jnp
    from flax import nnx

    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, value in values.items():
        if path not in flat:
            raise KeyError(f"target parameter {'.'.join(path)} does not exist in MirageDiT")
        var = flat[path]
        if tuple(var.shape) != tuple(value.shape):
            raise ValueError(f"target parameter {'.'.join(path)}: shape {tuple(var.shape)} != {tuple(value.shape)}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
