"""The frame-to-latent time contract of a video encoder: which latent frame covers each 25 fps frame.

A video encoder turns N frames into fewer latent frames; the audio stream has one token per 25 fps frame.
Mirage's joint attention needs an audio token and the latent frame that shows the same moment to share a
time coordinate, so the model takes every audio token's RoPE time from this map, the loader crops on its
latent boundaries, generate sizes and decodes latents with it, and prepare records it in manifest.json.
A map is named by a rule string (the `model.time_map` config field, the manifest's `time_map.rule`):

- ``uniform:K`` - K frames per latent (s2d with temporal_factor K, dct with K = 1): frame f -> f // K;
  N frames -> N // K latents.
- ``causal:K`` - a causal encoder over the whole clip (Mochi's VAE, K = 6): latent 0 covers frame 0 alone,
  latent j >= 1 covers frames 6j-5 .. 6j, so frame f -> ceil(f / K) and N frames -> 1 + (N - 1) // K
  latents (100 frames -> 17; the frames after 1 + K (L - 1) are covered by no latent and are dropped).
- ``causal:K/C`` - the same encoder over independent chunks of C frames (C - 1 a multiple of K; Mochi's
  25-frame chunks give 1 + 24/6 = 5 latents each): frame f -> 5 (f // 25) + ceil((f % 25) / 6);
  100 frames -> 20 latents. A last partial chunk is encoded causally on its own.

Source of the causal rule: diffusers' AutoencoderKLMochi (time down-sampling convs with stride 1, 2, 3 and
causal padding that replicates the first frame), which data_pipeline/encoders/mochi_vae.py ports exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ("uniform", "causal")


@dataclasses.dataclass(frozen=True)
class TimeMap:
    """A frame-to-latent map: `kind` 'uniform' or 'causal', `factor` K, `chunk` C (causal only; 0 = whole clip)."""

    kind: str
    factor: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"time map kind {self.kind!r} is not one of {KINDS}")
        if self.factor < 1:
            raise ValueError(f"time map {self.rule!r}: frames per latent must be >= 1")
        if self.chunk and (self.kind != "causal" or self.chunk < 1 or (self.chunk - 1) % self.factor):
            raise ValueError(
                f"time map {self.rule!r}: a chunk of C frames needs a causal map and C - 1 a multiple of "
                f"{self.factor} (Mochi: causal:6/25)"
            )

    # -------------------------------------------------------------------------------- names
    @property
    def rule(self) -> str:
        """The rule string, e.g. 'uniform:1', 'causal:6', 'causal:6/25' (inverse of `parse`)."""
        return f"{self.kind}:{self.factor}" + (f"/{self.chunk}" if self.chunk else "")

    @classmethod
    def parse(cls, rule: str, where: str = "time map") -> TimeMap:
        """A map from its rule string; a malformed rule raises ValueError naming `where`."""
        try:
            kind, rest = str(rule).split(":")
            factor, _, chunk = rest.partition("/")
            return cls(kind, int(factor), int(chunk) if chunk else 0)
        except ValueError as e:
            raise ValueError(
                f"{where}={rule!r} is not a time map rule: use 'uniform:K', 'causal:K' or 'causal:K/C' "
                f"(e.g. causal:6/25 for Mochi's VAE on 25-frame chunks) ({e})"
            ) from e

    # -------------------------------------------------------------------------------- counts
    def _causal_count(self, frames: int) -> int:
        return 0 if frames <= 0 else 1 + (frames - 1) // self.factor

    def _causal_frames(self, latents: int) -> int:
        return 0 if latents <= 0 else 1 + self.factor * (latents - 1)

    @property
    def chunk_latents(self) -> int:
        """Latent frames per chunk (causal:K/C only): 1 + (C - 1) / K."""
        return self._causal_count(self.chunk)

    def latent_count(self, frames: int) -> int:
        """Latent frames the encoder makes from a clip of `frames` 25 fps frames."""
        if self.kind == "uniform":
            return frames // self.factor
        if not self.chunk:
            return self._causal_count(frames)
        return (frames // self.chunk) * self.chunk_latents + self._causal_count(frames % self.chunk)

    def frames_for_latents(self, latents: int) -> int:
        """Frames that `latents` latent frames cover (the decoder's output length): the inverse of
        `latent_count` on whole lengths."""
        if self.kind == "uniform":
            return latents * self.factor
        if not self.chunk:
            return self._causal_frames(latents)
        q, r = divmod(latents, self.chunk_latents)
        return q * self.chunk + self._causal_frames(r)

    def latents_to_cover(self, frames: int) -> int:
        """The fewest latent frames whose decoded frames (`frames_for_latents`) reach `frames` (generate's
        size for `frames` frames of speech; the decoded tail past them is cropped)."""
        n = self.latent_count(frames)
        return n if self.frames_for_latents(n) >= frames else n + 1

    def covered_frames(self, frames: int) -> int:
        """Frames of a `frames`-frame clip that some latent covers (causal:6 on 50 frames: 49)."""
        return self.frames_for_latents(self.latent_count(frames))

    # -------------------------------------------------------------------------------- times
    def frame_latent(self, frames: int) -> np.ndarray:
        """int64 [frames]: for each frame f of a clip, the index of the latent frame covering it."""
        f = np.arange(frames, dtype=np.int64)
        k = self.factor
        if self.kind == "uniform":
            return f // k
        if not self.chunk:
            return -(-f // k)
        return (f // self.chunk) * self.chunk_latents + -(-(f % self.chunk) // k)

    def latent_time(self, frames: Any, xp: Any = np) -> Any:
        """Continuous latent time of (possibly fractional or negative) frame positions, for a reference
        frame sampled outside the clip: frame / K, and per chunk for causal:K/C; it equals `frame_latent` at
        each latent's last frame (6j for causal:6). `xp`: numpy, jax.numpy or torch."""
        k = self.factor
        if not self.chunk:
            return frames / k
        c = xp.floor(frames / self.chunk)
        return c * self.chunk_latents + (frames - c * self.chunk) / k

    # -------------------------------------------------------------------------------- crops
    def crop_offsets(self, record_latents: int, latents: int) -> list[tuple[int, int]]:
        """(latent offset, frame offset) of every window of `latents` latents inside a record of
        `record_latents` whose frame-to-latent map equals that of a fresh clip: any latent for uniform maps,
        chunk starts for causal:K/C, only the start for causal:K (latent j > 0 sees the frames before it)."""
        if self.kind == "uniform":
            step = (1, self.factor)
        elif self.chunk:
            step = (self.chunk_latents, self.chunk)
        else:
            return [(0, 0)]
        n = max(0, record_latents - latents) // step[0]
        return [(i * step[0], i * step[1]) for i in range(n + 1)]

    def to_json(self, clip_frames: int) -> dict[str, Any]:
        """manifest.json's `time_map` entry for clips of `clip_frames` frames."""
        latents = self.latent_count(clip_frames)
        return {
            "rule": self.rule,
            "clip_frames": int(clip_frames),
            "latent_frames": int(latents),
            "audio_frames": int(self.frames_for_latents(latents)),
            "frame_to_latent": self.frame_latent(self.frames_for_latents(latents)).tolist(),
        }


def of_manifest(manifest: dict[str, Any]) -> TimeMap:
    """The map a prepared dataset was encoded with (older manifests: uniform by the encoder's temporal_factor)."""
    tm = manifest.get("time_map")
    if tm:
        return TimeMap.parse(tm["rule"], "manifest.json time_map.rule")
    return TimeMap("uniform", int(manifest["encoders"]["video"]["params"].get("temporal_factor", 1)))
