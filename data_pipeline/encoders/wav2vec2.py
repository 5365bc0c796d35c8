"""`wav2vec2`: wav2vec 2.0 speech features (transformers `Wav2Vec2Model`'s last hidden state) in JAX,
resampled to exactly one row per 25 fps video frame.

Pure jax functions over a parameter dict keyed by transformers' tensor names, loaded from a published
`model.safetensors` + `config.json` (a `Wav2Vec2Model`, or a `Wav2Vec2ForCTC` such as
facebook/wav2vec2-large-960h: its `wav2vec2.` prefix is stripped and the CTC head ignored). Both
architectures are implemented: `feat_extract_norm="group"` + post-LN encoder (large-960h, base) and
`"layer"` + `do_stable_layer_norm` (large-lv60 / XLS-R). The weight-normed positional conv is folded
to a plain weight at load (old `weight_g`/`weight_v` and new `parametrizations.weight.original0/1` names).

A clip's features (Mirage report: "wav2vec features, bilinearly interpolated to 25 fps, cropped to the
clip"): the clip's 16 kHz waveform (optionally zero-mean/unit-variance normalised, as the model's
feature extractor does with do_normalize=True) -> last hidden state at 50 Hz (frame j covers samples
[320 j, 320 j + 400)) -> linear interpolation in time to the centres of the clip's 25 fps frames: video
frame i (samples [640 i, 640 i + 640)) takes position (640 i + 320 - 200) / 320 = 2 i + 0.375 in the
50 Hz sequence, clamped to its ends. So `encode(wave, num_frames)` has exactly num_frames rows and
depends only on the clip's audio (the same in training and generation).
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

VERSION = "1"
DEFAULTS: dict[str, Any] = {
    "weights": "",  # folder with config.json + model.safetensors (Wav2Vec2Model or Wav2Vec2ForCTC)
    "normalize": True,  # zero-mean unit-variance per clip (the feature extractor's do_normalize)
    "sample_rate": 16000,
    "fps": 25,
}
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """The fields of transformers' Wav2Vec2Config that decide the computation."""

    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str) -> Wav2Vec2Config:
        for key in ("feat_extract_activation", "hidden_act"):
            if d.get(key, "gelu") != "gelu":
                raise ValueError(f"{source}: config.json {key}={d[key]!r}; only 'gelu' (wav2vec2's) is implemented")
        if d.get("adapter_attn_dim") is not None or d.get("add_adapter"):
            raise ValueError(f"{source}: config.json uses adapters (adapter_attn_dim/add_adapter); not implemented")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        cfg = cls(**kw)
        if cfg.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"{source}: config.json feat_extract_norm={cfg.feat_extract_norm!r}; 'group' or 'layer'")
        return cfg

    @property
    def hop(self) -> int:
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        r = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride), strict=True):
            r = (r - 1) * s + k
        return r

    def num_frames(self, samples: int) -> int:
        n = samples
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            n = (n - k) // s + 1
        return n


def expected_shapes(cfg: Wav2Vec2Config) -> dict[str, tuple[int, ...]]:
    """Tensor names of transformers' Wav2Vec2Model (positional conv already folded) with their shapes."""
    s: dict[str, tuple[int, ...]] = {}
    cin = 1
    for i, (c, k) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, strict=True)):
        s[f"feature_extractor.conv_layers.{i}.conv.weight"] = (c, cin, k)
        if cfg.conv_bias:
            s[f"feature_extractor.conv_layers.{i}.conv.bias"] = (c,)
        if cfg.feat_extract_norm == "layer" or i == 0:
            s[f"feature_extractor.conv_layers.{i}.layer_norm.weight"] = (c,)
            s[f"feature_extractor.conv_layers.{i}.layer_norm.bias"] = (c,)
        cin = c
    d, f = cfg.hidden_size, cfg.intermediate_size
    s["feature_projection.layer_norm.weight"] = (cin,)
    s["feature_projection.layer_norm.bias"] = (cin,)
    s["feature_projection.projection.weight"] = (d, cin)
    s["feature_projection.projection.bias"] = (d,)
    s["encoder.pos_conv_embed.conv.weight"] = (d, d // cfg.num_conv_pos_embedding_groups, cfg.num_conv_pos_embeddings)
    s["encoder.pos_conv_embed.conv.bias"] = (d,)
    s["encoder.layer_norm.weight"] = (d,)
    s["encoder.layer_norm.bias"] = (d,)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}.attention.{n}.weight"] = (d, d)
            s[f"{p}.attention.{n}.bias"] = (d,)
        for n in ("layer_norm", "final_layer_norm"):
            s[f"{p}.{n}.weight"] = (d,)
            s[f"{p}.{n}.bias"] = (d,)
        s[f"{p}.feed_forward.intermediate_dense.weight"] = (f, d)
        s[f"{p}.feed_forward.intermediate_dense.bias"] = (f,)
        s[f"{p}.feed_forward.output_dense.weight"] = (d, f)
        s[f"{p}.feed_forward.output_dense.bias"] = (d,)
    return s


def load_params(weights: str) -> tuple[Wav2Vec2Config, dict[str, jax.Array]]:
    """(config, params keyed by Wav2Vec2Model names) from a transformers folder or model.safetensors."""
    tensors, raw, source = load_weights(weights, ("model.safetensors",), "audio encoder wav2vec2")
    cfg = Wav2Vec2Config.from_json(raw, source)
    if any(k.startswith("wav2vec2.") for k in tensors):  # Wav2Vec2ForCTC / ForPreTraining checkpoints
        tensors = {k[len("wav2vec2.") :]: v for k, v in tensors.items() if k.startswith("wav2vec2.")}
    pos = "encoder.pos_conv_embed.conv"
    for g_name, v_name in (
        (f"{pos}.weight_g", f"{pos}.weight_v"),
        (f"{pos}.parametrizations.weight.original0", f"{pos}.parametrizations.weight.original1"),
    ):
        if g_name in tensors and v_name in tensors:  # weight norm over dim 2: w = g * v / ||v||_(0, 1)
            g, v = tensors[g_name].astype(np.float64), tensors[v_name].astype(np.float64)
            w = g * v / np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))
            tensors[f"{pos}.weight"] = w.astype(np.float32)
    params = {k: jnp.asarray(take(tensors, k, shape, source)) for k, shape in expected_shapes(cfg).items()}
    return cfg, params


def _layer_norm(x: jax.Array, p: dict[str, jax.Array], name: str, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _linear(x: jax.Array, p: dict[str, jax.Array], name: str) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, p[f"{name}.weight"], precision=_HI) + p[f"{name}.bias"]


def _conv1d(x: jax.Array, w: jax.Array, stride: int, padding: int = 0, groups: int = 1) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (stride,), [(padding, padding)], dimension_numbers=("NWC", "OIW", "NWC"),
        feature_group_count=groups, precision=_HI,
    )  # fmt: skip


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def forward(p: dict[str, jax.Array], cfg: Wav2Vec2Config, wave: jax.Array) -> jax.Array:
    """Waveform [B, N] (already normalised if the model expects it) -> last hidden state [B, frames, D]."""
    h = wave[..., None]
    for i, stride in enumerate(cfg.conv_stride):
        pre = f"feature_extractor.conv_layers.{i}"
        h = _conv1d(h, p[f"{pre}.conv.weight"], stride)
        if cfg.conv_bias:
            h = h + p[f"{pre}.conv.bias"]
        if cfg.feat_extract_norm == "layer":
            h = _layer_norm(h, p, f"{pre}.layer_norm", 1e-5)
        elif i == 0:  # GroupNorm with one group per channel: each channel normalised over time
            mean = h.mean(1, keepdims=True)
            var = jnp.square(h - mean).mean(1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * p[f"{pre}.layer_norm.weight"] + p[f"{pre}.layer_norm.bias"]
        h = _gelu(h)
    eps = cfg.layer_norm_eps
    h = _linear(_layer_norm(h, p, "feature_projection.layer_norm", eps), p, "feature_projection.projection")
    k = cfg.num_conv_pos_embeddings
    pos = _conv1d(h, p["encoder.pos_conv_embed.conv.weight"], 1, k // 2, cfg.num_conv_pos_embedding_groups)
    pos = pos + p["encoder.pos_conv_embed.conv.bias"]
    if k % 2 == 0:
        pos = pos[:, :-1]
    h = h + _gelu(pos)
    if not cfg.do_stable_layer_norm:
        h = _layer_norm(h, p, "encoder.layer_norm", eps)
    b, n, d = h.shape
    heads = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layers.{i}"
        x = _layer_norm(h, p, f"{pre}.layer_norm", eps) if cfg.do_stable_layer_norm else h
        q, kk, v = (
            _linear(x, p, f"{pre}.attention.{m}").reshape(b, n, heads, -1) for m in ("q_proj", "k_proj", "v_proj")
        )
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kk, precision=_HI) / math.sqrt(d // heads)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=_HI).reshape(b, n, d)
        h = h + _linear(a, p, f"{pre}.attention.out_proj")
        ff = f"{pre}.feed_forward"
        if cfg.do_stable_layer_norm:
            x = _layer_norm(h, p, f"{pre}.final_layer_norm", eps)
            h = h + _linear(_gelu(_linear(x, p, f"{ff}.intermediate_dense")), p, f"{ff}.output_dense")
        else:
            h = _layer_norm(h, p, f"{pre}.layer_norm", eps)
            h = h + _linear(_gelu(_linear(h, p, f"{ff}.intermediate_dense")), p, f"{ff}.output_dense")
            h = _layer_norm(h, p, f"{pre}.final_layer_norm", eps)
    if cfg.do_stable_layer_norm:
        h = _layer_norm(h, p, "encoder.layer_norm", eps)
    return h


_forward_jit = jax.jit(forward, static_argnames=("cfg",))


class Wav2Vec2:
    """Mono waveform float [N] at 16 kHz -> float32 [frames, hidden_size], one row per 25 fps frame."""

    name = "wav2vec2"
    version = VERSION

    def __init__(self, **params: Any):
        self.params = check_params("audio", self.name, params, DEFAULTS)
        self.cfg, self.weights = load_params(str(self.params["weights"]))
        self.sample_rate, self.fps = int(self.params["sample_rate"]), int(self.params["fps"])
        if self.sample_rate != 16000:
            raise ValueError(f"audio encoder wav2vec2: sample_rate={self.sample_rate}; wav2vec2 models take 16000")
        if self.sample_rate % self.fps:
            raise ValueError(
                f"audio encoder wav2vec2: sample_rate={self.sample_rate} is not a multiple of fps={self.fps}"
            )
        self.hop = self.sample_rate // self.fps

    @property
    def feature_dim(self) -> int:
        return self.cfg.hidden_size

    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.name, self.version, dict(self.params), "float32", (None, self.feature_dim))

    def hidden_states(self, waveform: np.ndarray) -> np.ndarray:
        """The model's last hidden state [frames at 50 Hz, D] for a (normalised if configured) waveform."""
        x = np.asarray(waveform, np.float64)
        if self.params["normalize"]:
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        return np.asarray(_forward_jit(self.weights, self.cfg, jnp.asarray(x[None], jnp.float32)))[0]

    def encode(self, waveform: np.ndarray, num_frames: int | None = None) -> np.ndarray:
        """Waveform [N] (or [N, channels], averaged) -> [num_frames, D]; default N // 640 frames."""
        x = np.asarray(waveform, dtype=np.float64)
        if x.ndim == 2:
            x = x.mean(axis=1)
        if x.ndim != 1:
            raise ValueError(f"audio encoder wav2vec2: expected a waveform [N] or [N, channels], got shape {x.shape}")
        n = x.shape[0] // self.hop if num_frames is None else int(num_frames)
        x = x[: n * self.hop]
        need = max(n * self.hop, self.cfg.receptive_field)
        if x.shape[0] < need:  # short input: silence after its end
            x = np.pad(x, (0, need - x.shape[0]))
        feats = self.hidden_states(x).astype(np.float64)
        half_rf, step = self.cfg.receptive_field / 2, self.cfg.hop
        pos = ((np.arange(n) + 0.5) * self.hop - half_rf) / step  # video frame centres in 50 Hz frame units
        pos = np.clip(pos, 0, feats.shape[0] - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, feats.shape[0] - 1)
        w = (pos - lo)[:, None]
        return ((1 - w) * feats[lo] + w * feats[hi]).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _cached(weights: str, normalize: bool, sample_rate: int, fps: int) -> Wav2Vec2:
    return Wav2Vec2(weights=weights, normalize=normalize, sample_rate=sample_rate, fps=fps)


def get(**params: Any) -> Wav2Vec2:
    """Registry factory: one loaded model per parameter set per process (weights load once per worker)."""
    p = check_params("audio", Wav2Vec2.name, params, DEFAULTS)
    return _cached(str(p["weights"]), bool(p["normalize"]), int(p["sample_rate"]), int(p["fps"]))
