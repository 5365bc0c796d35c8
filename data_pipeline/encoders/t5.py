"""`t5`: the T5 v1.1 encoder (transformers `T5EncoderModel`, Mochi's google/t5-v1_1-xxl text encoder) in JAX.

Pure jax functions over a parameter dict keyed by transformers' tensor names, loaded from `model.safetensors`
(or sharded `model-0000N-of-0000M.safetensors` + index) and `config.json`. It computes what Mochi's pipeline
computes: tokens (padded to `max_len` = 256, truncated, `</s>` appended) -> embeddings -> blocks of
[RMSNorm -> self-attention with T5's bucketed relative position bias (first layer's table, shared; no 1/sqrt(d)
scaling; padded keys masked) -> RMSNorm -> gated-GELU (tanh) or ReLU MLP] -> final RMSNorm. Rows of padding
tokens are set to zero (the DiT masks them anyway; zeros compress well); the mask marks real tokens.

Tokenization uses the `tokenizers` library on the fast tokenizer's `tokenizer.json` (no pickle, no
sentencepiece); a folder with only `spiece.model` needs a one-time `T5TokenizerFast.from_pretrained(folder)
.save_pretrained(folder)` (docs/encoders.md). `dtype="bfloat16"` keeps the weights in bf16 (T5-XXL: 9.5 GB
instead of 19 GB) with norms and softmax in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.encoders.base import EncoderSpec, check_params
from data_pipeline.encoders.weights import load_weights, take

VERSION = "1"
DEFAULTS: dict[str, Any] = {
    "weights": "",  # folder with config.json + model*.safetensors (T5EncoderModel or full T5)
    "tokenizer": "",  # folder with tokenizer.json (default: the weights folder, then ../tokenizer)
    "max_len": 256,
    "dtype": "float32",
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of transformers' T5Config that decide the encoder's computation."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str) -> T5Config:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        cfg = cls(**kw)
        if cfg.feed_forward_proj not in ("gated-gelu", "relu"):
            raise ValueError(f"{source}: config.json feed_forward_proj={cfg.feed_forward_proj!r}; gated-gelu or relu")
        return cfg

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"


def expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Tensor names of T5EncoderModel's state dict with their shapes."""
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    s: dict[str, tuple[int, ...]] = {"shared.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer"
        for n in ("q", "k", "v"):
            s[f"{p}.0.SelfAttention.{n}.weight"] = (inner, d)
        s[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
        s[f"{p}.0.layer_norm.weight"] = (d,)
        if cfg.gated:
            s[f"{p}.1.DenseReluDense.wi_0.weight"] = (cfg.d_ff, d)
            s[f"{p}.1.DenseReluDense.wi_1.weight"] = (cfg.d_ff, d)
        else:
            s[f"{p}.1.DenseReluDense.wi.weight"] = (cfg.d_ff, d)
        s[f"{p}.1.DenseReluDense.wo.weight"] = (d, cfg.d_ff)
        s[f"{p}.1.layer_norm.weight"] = (d,)
    s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        cfg.relative_attention_num_buckets,
        cfg.num_heads,
    )
    s["encoder.final_layer_norm.weight"] = (d,)
    return s


def load_params(weights: str, dtype: str = "float32") -> tuple[T5Config, dict[str, jax.Array]]:
    """(config, params keyed by T5EncoderModel names) from a transformers folder; `dtype` of the weights."""
    tensors, raw, source = load_weights(weights, ("model.safetensors",), "text encoder t5")
    cfg = T5Config.from_json(raw, source)
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:  # tied, saved once
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    dt = jnp.dtype(dtype)
    params = {k: jnp.asarray(take(tensors, k, shape, source), dt) for k, shape in expected_shapes(cfg).items()}
    return cfg, params


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional relative position buckets [q, k] (as transformers computes them, fp32 log)."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # memory - query
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    n = np.abs(rel)
    max_exact = half // 2
    large = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))  # used only where n >= max_exact
    large = large / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (large * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return out + np.where(n < max_exact, n, large)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(w.dtype)


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x.astype(w.dtype), w, precision=jax.lax.Precision.HIGHEST)


def forward(p: dict[str, jax.Array], cfg: T5Config, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Token ids [B, L] int32 and mask [B, L] (1 = real) -> last hidden state [B, L, d_model] float32."""
    b, n = ids.shape
    h = p["shared.weight"][ids]
    buckets = relative_buckets(n, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    table = p["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].astype(jnp.float32)
    bias = table[jnp.asarray(buckets)].transpose(2, 0, 1)[None]  # [1, heads, q, k]
    bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    eps, heads = cfg.layer_norm_epsilon, cfg.num_heads
    for i in range(cfg.num_layers):
        pre = f"encoder.block.{i}.layer"
        x = _rms_norm(h, p[f"{pre}.0.layer_norm.weight"], eps)
        q, k, v = (_dense(x, p[f"{pre}.0.SelfAttention.{m}.weight"]).reshape(b, n, heads, -1) for m in "qkv")
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v).reshape(b, n, -1)
        h = h + _dense(a, p[f"{pre}.0.SelfAttention.o.weight"]).astype(h.dtype)
        x = _rms_norm(h, p[f"{pre}.1.layer_norm.weight"], eps)
        ff = f"{pre}.1.DenseReluDense"
        if cfg.gated:
            y = jax.nn.gelu(_dense(x, p[f"{ff}.wi_0.weight"]), approximate=True) * _dense(x, p[f"{ff}.wi_1.weight"])
        else:
            y = jax.nn.relu(_dense(x, p[f"{ff}.wi.weight"]))
        h = h + _dense(y, p[f"{ff}.wo.weight"]).astype(h.dtype)
    return _rms_norm(h, p["encoder.final_layer_norm.weight"], eps).astype(jnp.float32)


_forward_jit = jax.jit(forward, static_argnames=("cfg",))


def _tokenizer_file(tokenizer: str, weights: str) -> str:
    candidates = (
        [tokenizer] if tokenizer else [weights, os.path.join(os.path.dirname(weights.rstrip("/")), "tokenizer")]
    )
    for c in candidates:
        for path in (c, os.path.join(c, "tokenizer.json")):
            if os.path.isfile(path) and path.endswith(".json"):
                return path
    raise FileNotFoundError(
        f"text encoder t5: no tokenizer.json in {candidates}; pass tokenizer=<folder with tokenizer.json>. A folder "
        "with only spiece.model: run once `T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)`"
    )


class T5:
    """Caption str -> (embeddings float32 [max_len, d_model], mask uint8 [max_len])."""

    name = "t5"
    version = VERSION

    def __init__(self, **params: Any):
        from tokenizers import Tokenizer

        self.params = check_params("text", self.name, params, DEFAULTS)
        weights = os.path.expanduser(str(self.params["weights"]))
        self.cfg, self.weights = load_params(weights, str(self.params["dtype"]))
        self.max_len = int(self.params["max_len"])
        self.tokenizer = Tokenizer.from_file(_tokenizer_file(str(self.params["tokenizer"]), weights))
        self.tokenizer.enable_truncation(self.max_len)
        pad_id = self.tokenizer.token_to_id("<pad>")
        self.tokenizer.enable_padding(length=self.max_len, pad_id=0 if pad_id is None else pad_id, pad_token="<pad>")

    @property
    def feature_dim(self) -> int:
        return self.cfg.d_model

    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.name, self.version, dict(self.params), "float32", (self.max_len, self.feature_dim))

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Token ids [B, L] and mask [B, L] -> hidden states [B, L, d_model] float32 (padding rows as computed)."""
        return np.asarray(_forward_jit(self.weights, self.cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))

    def encode(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """Embed `caption` (truncated to max_len tokens incl. </s>); padding rows are zero with mask 0."""
        enc = self.tokenizer.encode(caption)
        ids = np.asarray(enc.ids, np.int32)[None]
        mask = np.asarray(enc.attention_mask, np.uint8)
        out = self.encode_ids(ids, mask[None])[0]
        return (out * mask[:, None]).astype(np.float32), mask


@functools.lru_cache(maxsize=2)
def _cached(weights: str, tokenizer: str, max_len: int, dtype: str) -> T5:
    return T5(weights=weights, tokenizer=tokenizer, max_len=max_len, dtype=dtype)


def get(**params: Any) -> T5:
    """Registry factory: one loaded model per parameter set per process."""
    p = check_params("text", T5.name, params, DEFAULTS)
    return _cached(str(p["weights"]), str(p["tokenizer"]), int(p["max_len"]), str(p["dtype"]))
