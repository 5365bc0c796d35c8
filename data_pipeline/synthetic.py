"""In-memory random batches with exactly the loader's keys, shapes and dtypes - no files needed.

For unit tests and as the trainer's fallback source. Batch n is a pure function of (seed, n), and the
iterator checkpoints like the Grain one (`get_state` / `set_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class SyntheticBatches(Iterator[dict[str, np.ndarray]]):
    """Random batches shaped like `make_loader`'s (see `synthetic_batches`)."""

    def __init__(
        self,
        batch_size: int,
        clip_frames: int,
        height: int,
        width: int,
        spatial_factor: int,
        temporal_factor: int,
        audio_dim: int,
        text_len: int,
        text_dim: int,
        seed: int,
        num_batches: int | None,
    ):
        if clip_frames % temporal_factor or height % spatial_factor or width % spatial_factor:
            raise ValueError(
                f"clip_frames={clip_frames}, height={height}, width={width} must divide by "
                f"temporal_factor={temporal_factor} / spatial_factor={spatial_factor}"
            )
        self.b, self.a, self.t = batch_size, clip_frames, clip_frames // temporal_factor
        self.hw = (height // spatial_factor, width // spatial_factor)
        self.c = temporal_factor * spatial_factor * spatial_factor * 3
        self.audio_dim, self.text_len, self.text_dim = audio_dim, text_len, text_dim
        self.seed, self.num_batches, self.step = seed, num_batches, 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.step >= self.num_batches:
            raise StopIteration
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        b, t, a, (h, w) = self.b, self.t, self.a, self.hw
        text_len = rng.integers(1, self.text_len + 1, size=b)
        text_mask = np.arange(self.text_len)[None, :] < text_len[:, None]
        return {
            "video": rng.uniform(-1, 1, (b, t, h, w, self.c)).astype(np.float32),
            "video_mask": np.ones((b, t), bool),
            "audio": rng.standard_normal((b, a, self.audio_dim)).astype(np.float32),
            "audio_mask": np.ones((b, a), bool),
            "text": (rng.standard_normal((b, self.text_len, self.text_dim)) * text_mask[..., None]).astype(
                np.float32
            ),
            "text_mask": text_mask,
            "ref": rng.uniform(-1, 1, (b, 1, h, w, self.c)).astype(np.float32),
            # a frame before the clip (negative) or after its end (>= A), as prepare picks them
            "ref_time": np.where(
                rng.random(b) < 0.5, -rng.integers(1, 50, size=b), a + rng.integers(0, 50, size=b)
            ).astype(np.float32),
            "ref_mask": np.ones((b,), bool),
            "mouth": rng.uniform(0, 1, (b, a)).astype(np.float32),
            "mouth_valid": np.ones((b,), bool),
        }

    def get_state(self) -> dict[str, Any]:
        return {"kind": "synthetic_batches", "step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != "synthetic_batches":
            raise ValueError(f"state {str(state)[:80]!r} was not written by synthetic_batches")
        self.step = int(state["step"])


def synthetic_batches(
    *,
    batch_size: int,
    clip_frames: int = 50,
    height: int = 64,
    width: int = 64,
    spatial_factor: int = 8,
    temporal_factor: int = 1,
    audio_dim: int = 80,
    text_len: int = 32,
    text_dim: int = 64,
    seed: int = 0,
    num_batches: int | None = None,
) -> SyntheticBatches:
    """Iterator of random batches with the loader's keys: video [b,T,h,w,c], video_mask [b,T], audio [b,A,D],
    audio_mask [b,A], text [b,L,Dt], text_mask [b,L], ref [b,1,h,w,c], ref_time [b], ref_mask [b],
    mouth [b,A], mouth_valid [b]. Defaults match prepare's CPU defaults (64x64 px, s2d 8, 2 s clips)."""
    return SyntheticBatches(
        batch_size,
        clip_frames,
        height,
        width,
        spatial_factor,
        temporal_factor,
        audio_dim,
        text_len,
        text_dim,
        seed,
        num_batches,
    )
