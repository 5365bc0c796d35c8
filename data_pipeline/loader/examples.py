"""One training example from one record: decode the record's bytes, crop (at a random latent offset) or pad the
time axis to the loader's clip length, with masks; a corrupt record is counted against the loader's budget.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from data_pipeline.dataset.records import RecordError, decode_record
from data_pipeline.loader.shards import ShardSource
from mirage_base.errors import MirageError
from mirage_base.time_map import TimeMap

log = logging.getLogger(__name__)


class CorruptRecordError(MirageError, RuntimeError):
    """More corrupt records than the loader's budget; names the shard and record index at fault."""


class DecodeCrop(grain.transforms.RandomMap):
    """Record bytes -> one example with the time axis cropped (random offset) or padded to `clip_frames`."""

    def __init__(
        self,
        source: ShardSource,
        clip_frames: int,
        time_map: TimeMap,
        corrupt_budget: int,
        random_crop: bool = True,
    ):
        self.source, self.clip_frames, self.time_map = source, int(clip_frames), time_map
        self.corrupt_budget, self.random_crop = int(corrupt_budget), random_crop
        self.bad: set[int] = set()  # distinct corrupt records (each epoch meets them again)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def _corrupt(self, i: int, why: str) -> None:
        shard, idx = self.source.locate(i)
        new = i not in self.bad
        self.bad.add(i)
        if self.skipped > self.corrupt_budget:  # every meeting raises once over budget (reader threads race)
            raise CorruptRecordError(
                f"{shard} record {idx}: {why}. {self.skipped} corrupt records in this process (budget "
                f"corrupt_budget={self.corrupt_budget}); re-run data_pipeline.prepare to rewrite the shard "
                "or raise the budget"
            )
        if not new:
            return
        log.warning(
            "skipping corrupt record %d of %s (%d/%d skipped): %s",
            idx,
            shard,
            self.skipped,
            self.corrupt_budget,
            why,
        )

    def random_map(
        self, element: tuple[int, bytes | None, str], rng: np.random.Generator
    ) -> dict[str, Any] | None:
        i, data, err = element
        if data is None:
            self._corrupt(i, err or "unreadable")
            return None
        try:
            t, _ = decode_record(data)
        except RecordError as e:
            self._corrupt(i, str(e))
            return None
        return crop_or_pad(t, self.clip_frames, self.time_map, rng if self.random_crop else None)


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((n - x.shape[0], *x.shape[1:]), x.dtype)]) if x.shape[0] < n else x


def crop_or_pad(
    t: dict[str, np.ndarray], clip_frames: int, time_map: TimeMap, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """One record's tensors -> a loader example of `clip_frames` (25 fps) audio frames and the
    `time_map.latent_count(clip_frames)` latent frames covering them, with masks (keys: `batch_keys.LOADER_KEYS`).

    A longer record is cropped at a (random) latent offset from `time_map.crop_offsets` (a window whose
    frame-to-latent map is that of a fresh clip, so audio frame a still belongs to latent frame_latent[a]);
    a shorter one is padded (masks False). `clip_frames` must be a whole length of the map
    (`covered_frames(clip_frames) == clip_frames`)."""
    target = time_map.latent_count(clip_frames)
    video, audio, mouth = t["video"], t["audio"], t["mouth"]
    offsets = time_map.crop_offsets(video.shape[0], target)
    lat_off, off = offsets[0] if rng is None else offsets[int(rng.integers(0, len(offsets)))]
    video = video[lat_off : lat_off + target]
    # a record's audio may run past the frames its latents cover (causal: 50 frames -> 9 latents cover 49)
    n_audio = min(clip_frames, time_map.frames_for_latents(video.shape[0]))
    audio = audio[off : off + n_audio]
    mouth = mouth[off : off + n_audio]
    vmask = np.zeros(target, bool)
    vmask[: video.shape[0]] = True
    amask = np.zeros(clip_frames, bool)
    amask[: audio.shape[0]] = True
    video, audio, mouth = _pad_to(video, target), _pad_to(audio, clip_frames), _pad_to(mouth, clip_frames)
    ref_time = float(t["ref_time"].reshape(-1)[0])
    has_ref = bool(np.isfinite(ref_time))
    return {
        "video": video,
        "video_mask": vmask,
        "audio": audio,
        "audio_mask": amask,
        "text": t["text"],
        "text_mask": t["text_mask"].astype(bool),
        "ref": t["ref"],
        "ref_time": np.float32(ref_time - off if has_ref else 0.0),
        "ref_mask": np.bool_(has_ref),
        "mouth": mouth,
        "mouth_valid": np.bool_(t["mouth_valid"].reshape(-1)[0] > 0),
    }
