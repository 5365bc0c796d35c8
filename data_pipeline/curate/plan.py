"""What curation knows about one source: its clips (kept or dropped, with the reason), cuts, face crop track,
audio shifts and per-clip measurements; `CurateConfig` holds every threshold (recorded in the manifest)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipeline.curate import NEEDS, STAGES
from data_pipeline.ingest import clips, geometry, media, sources
from mirage_base.errors import InputError


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    """The stages to run and their thresholds (all in the manifest's `curation.thresholds`).

    shots: `cut_threshold` is PySceneDetect ContentDetector's (mean HSV change, 0-255; its default 27);
    faces: detection on every `face_every`-th frame, linked at IoU > `track_iou`; the speaker's track must be
    seen in >= `min_visible` of the clip's sampled frames and span it, its median box height >= `min_face` of
    the frame height; other tracks count when seen in >= `other_visible` of them (one false detection does not)
    and supported by the cascade at least `other_support` as strongly as the speaker's (speaker.judge);
    crop: crop centre median-filtered (faces.SMOOTH frames) then averaged over `crop_smooth` frames;
    sync: |offset| <= `max_offset` frames is shifted, confidence (LSE-C) < `min_confidence` dropped;
    motion: camera pan faster than `max_pan` frame widths per second, or mean frame change < `min_change`
    (0-255, filters.static's measure) dropped.
    """

    stages: tuple[str, ...] = STAGES
    cut_threshold: float = 27.0
    face_every: int = 5
    track_iou: float = 0.3
    min_visible: float = 0.5
    other_visible: float = 0.3
    other_support: float = 0.4
    min_face: float = 0.1
    crop_smooth: int = 25
    syncnet_weights: str | None = None
    max_offset: int = 6
    min_confidence: float = 3.0
    max_pan: float = 0.25
    min_change: float = 0.25

    def on(self, stage: str) -> bool:
        return stage in self.stages and (stage != "sync" or bool(self.syncnet_weights))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        return d


def parse_stages(spec: str | None) -> tuple[str, ...]:
    """`--curate` -> the stages in STAGES order: '' or 'all' (a bare `--curate`) is every stage; else a comma
    list. InputError naming an unknown stage, or one whose input stage is missing (crop and sync need faces)."""
    if spec is None:
        return ()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names or names == ["all"]:
        return STAGES
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise InputError(f"--curate={spec}: unknown stage(s) {bad}; stages: {','.join(STAGES)} (or all)")
    for n in names:
        if n in NEEDS and NEEDS[n] not in names:
            raise InputError(f"--curate={spec}: stage {n!r} needs {NEEDS[n]!r} (its face track); add it")
    return tuple(s for s in STAGES if s in names)


@dataclasses.dataclass
class Clip:
    """Frames [start, start + length) at 25 fps; `drop` (reason) and `stage` set when a stage drops it;
    `ref_frame` as clips.ClipPlan; `values`: what stages measured (face box, sync offset, pan speed...);
    `track`: the face's detections."""

    start: int
    length: int
    ref_frame: int | None
    drop: str | None = None
    stage: str | None = None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    track: np.ndarray | None = None  # the faces stage: [n, 5] (frame, x1, y1, x2, y2) at display size

    @property
    def stop(self) -> int:
        return self.start + self.length

    def to_plan(self) -> clips.ClipPlan:
        return clips.ClipPlan(self.start, self.length, self.ref_frame)


@dataclasses.dataclass
class SourcePlan:
    """One source through curation. `width`/`height`: its display size; `scaled`: the cover-scaled size the
    training crop is taken from (None without --size); `crop_xy` [num_frames, 2] int: the crop's top-left per
    frame in the scaled frame (the crop stage; None: ingest's fixed crop); `shifts` {clip start: audio frames}
    (the sync stage: the clip's audio is read that many frames later); `spans`: dropped spans that are not
    clips (short shots, shot tails) as (start, stop, reason, stage); `ran`: the stages that ran; `thumbs`:
    {item start: the contact sheet's thumbnail}. A stage that fails on the source replaces the plan with an
    isolation.Failure (curate.stage)."""

    path: str
    source_id: str
    num_frames: int = 0
    width: int = 0
    height: int = 0
    scaled: tuple[int, int] | None = None
    target: tuple[int, int] | None = None
    clip_frames: int = 0
    min_frames: int = 0
    temporal_factor: int = 1
    seed: int = 0
    cuts: list[int] = dataclasses.field(default_factory=list)
    clips: list[Clip] = dataclasses.field(default_factory=list)
    spans: list[tuple[int, int, str, str]] = dataclasses.field(default_factory=list)
    crop_xy: np.ndarray | None = None
    shifts: dict[int, int] = dataclasses.field(default_factory=dict)
    ran: list[str] = dataclasses.field(default_factory=list)
    thumbs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)

    def live(self) -> Iterator[Clip]:
        """The clips no stage has dropped."""
        return (c for c in self.clips if c.drop is None)

    def kept_plans(self) -> list[clips.ClipPlan]:
        return [c.to_plan() for c in self.live()]


def start_plan(path: str, root: str, clip_frames: int, min_frames: int, temporal_factor: int, seed: int,
               target: tuple[int, int] | None) -> SourcePlan:
    """The plan before any stage: the source probed (ValueError naming it if unreadable) and cut into clips as
    plain prepare does (clips.plan_clips over the whole source, one shot)."""
    info = media.probe(path)
    sid = sources.source_id(path, root)
    p = SourcePlan(path, sid, info.num_frames, info.width, info.height, target=target, clip_frames=clip_frames,
                   min_frames=min_frames, temporal_factor=temporal_factor, seed=seed)
    if target is not None:
        p.scaled = geometry.cover_size((info.width, info.height), target)
    p.clips = [Clip(c.start, c.length, c.ref_frame)
               for c in clips.plan_clips(info.num_frames, clip_frames, min_frames, temporal_factor, sid, seed)]
    return p


def display_frames(path: str, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(25 fps frame index, uint8 RGB [H, W, 3] at display size) for every `every`-th frame of `path`."""
    info = media.probe(path)
    for k, rgb in media.iter_frames(info):
        if k % every == 0:
            yield k, rgb
