"""`hash`: a small deterministic caption encoder (hashed word and character-trigram embeddings).

Each token (lower-cased word or punctuation mark) embeds as the normalised sum of a word vector and the
mean of its character-trigram vectors, plus a fixed sinusoidal position code, in [L, D] with a mask for
real tokens. Vectors come from BLAKE2b of (seed, bucket), not from a numpy RNG stream, so the table is
the same on every platform and numpy version. It stands in for T5-XXL on CPU-sized experiments: similar
captions get similar embeddings, and word order is visible to the model.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np

from data_pipeline.encoders.base import EncoderSpec, check_params

VERSION = "1"
DEFAULTS = {"max_len": 32, "dim": 64, "buckets": 4096, "seed": 0, "position_scale": 0.1}
_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks, in order."""
    return _TOKEN.findall(text.lower())


@functools.lru_cache(maxsize=4)
def _table(buckets: int, dim: int, seed: int) -> np.ndarray:
    """[buckets, dim] float32 vectors with entries uniform in [-1, 1), from BLAKE2b(seed, bucket)."""
    rows = []
    for b in range(buckets):
        raw = hashlib.blake2b(f"{seed}:{b}".encode(), digest_size=64).digest()
        while len(raw) < 2 * dim:
            raw += hashlib.blake2b(raw, digest_size=64).digest()
        rows.append(np.frombuffer(raw[: 2 * dim], dtype="<u2"))
    table = np.stack(rows).astype(np.float64) / 32768.0 - 1.0
    return table.astype(np.float32)


def _bucket(s: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % buckets


class HashText:
    """Caption str -> (embeddings float32 [max_len, dim], mask uint8 [max_len])."""

    name = "hash"
    version = VERSION

    def __init__(self, **params: float):
        self.params = check_params("text", self.name, params, DEFAULTS)
        self.max_len, self.dim = int(self.params["max_len"]), int(self.params["dim"])
        self.buckets, self.seed = int(self.params["buckets"]), int(self.params["seed"])

    @property
    def feature_dim(self) -> int:
        return self.dim

    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.name, self.version, dict(self.params), "float32", (self.max_len, self.dim))

    def _positions(self) -> np.ndarray:
        pos = np.arange(self.max_len, dtype=np.float64)[:, None]
        freqs = 1.0 / (100.0 ** (np.arange(self.dim // 2, dtype=np.float64) / max(self.dim // 2, 1)))
        ang = pos * freqs[None, :]
        out = np.zeros((self.max_len, self.dim))
        out[:, 0 : 2 * (self.dim // 2) : 2] = np.sin(ang)
        out[:, 1 : 2 * (self.dim // 2) : 2] = np.cos(ang)
        return out

    def encode(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """Embed the first `max_len` tokens of `caption`; padding rows are zero with mask 0."""
        table = _table(self.buckets, self.dim, self.seed).astype(np.float64)
        tokens = tokenize(caption)[: self.max_len]
        emb = np.zeros((self.max_len, self.dim))
        mask = np.zeros((self.max_len,), np.uint8)
        pos = self._positions()
        for i, tok in enumerate(tokens):
            word = table[_bucket("w:" + tok, self.buckets)]
            padded = f"<{tok}>"
            grams = [padded[j : j + 3] for j in range(max(len(padded) - 2, 1))]
            chars = np.mean([table[_bucket("c:" + g, self.buckets)] for g in grams], axis=0)
            v = word + chars
            v = v / max(float(np.sqrt(np.mean(v * v))), 1e-6)
            emb[i] = v + float(self.params["position_scale"]) * pos[i]
            mask[i] = 1
        return emb.astype(np.float32), mask
