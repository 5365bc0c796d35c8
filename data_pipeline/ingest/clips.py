"""Cutting a decoded source into fixed-length clips, and choosing each clip's reference frame.

Clips start at 0, L, 2L, ... (L = clip frames); a tail shorter than L is kept only if it has at least
`min_frames` frames (the loader pads it), and every clip length is a multiple of the video encoder's
temporal factor. Sources shorter than `min_frames` give no clip. The reference frame is drawn uniformly
from the source's frames OUTSIDE the clip (as Mirage samples it), by a hash of (clip id, seed), so reruns
pick the same frame; if the clip is the whole source there is none.
"""

from __future__ import annotations

import dataclasses
import hashlib


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    """Frames [start, start + length) of a source, and the reference frame index (None: no frame outside)."""

    start: int
    length: int
    ref_frame: int | None

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def ref_time(self) -> float:
        """Reference position in video frames relative to the clip start (NaN when there is no reference)."""
        return float("nan") if self.ref_frame is None else float(self.ref_frame - self.start)


def stable_uniform(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts` (BLAKE2b), the same on every machine and run."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def plan_clips(
    num_frames: int, clip_frames: int, min_frames: int, temporal_factor: int, key: str, seed: int = 0
) -> list[ClipPlan]:
    """Clips of a `num_frames` source (see module docstring); `key` names the source for the ref draw."""
    if clip_frames % temporal_factor or clip_frames <= 0:
        raise ValueError(
            f"clip length {clip_frames} frames is not a positive multiple of the video encoder's "
            f"temporal factor {temporal_factor}; change --clip-seconds"
        )
    plans = []
    for start in range(0, num_frames, clip_frames):
        length = min(clip_frames, num_frames - start)
        length -= length % temporal_factor
        if length < max(min_frames, temporal_factor):
            continue
        outside = num_frames - length
        ref = None
        if outside > 0:
            r = int(stable_uniform(key, start, seed) * outside)
            ref = r if r < start else r + length
        plans.append(ClipPlan(start, length, ref))
    return plans
