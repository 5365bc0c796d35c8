"""The one decode of a source that the shots, faces and motion stages share (`prepare --curate`'s first stage
after the probe, `Curate:decode`).

Each of those stages used to decode the whole source itself (up to three passes, four with ingest). Here the
source's display frames are decoded once (media.iter_frames, one frame held at a time) and each frame is handed
to the measuring object of every stage that is on: shots.CutFinder (ContentDetector, on frames downscaled to
shots.ANALYSIS_WIDTH), speaker.FaceFinder (the Haar cascade on every `face_every`-th full frame) and
motion.MotionMeter (tile shifts and frame differences on the downscaled frames). What they measured travels in
`plan.measured` {stage: ...} to the stages themselves, which decide in STAGES order as before (each pops its
entry), so the graph stays one element stream with no side input, and the decisions are the same.

Decodes per source in one `prepare --curate` run: this pass, the sync stage's own pass when it is on (it crops
faces at full resolution around tracks known only after the faces stage), the thumbnails' seeks (a frame per
clip), and ingest's pass (scaled frames, the product). tests/test_curation.py counts them.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.curate import motion, shots, speaker
from data_pipeline.curate.plan import CurateConfig, SourcePlan, display_frames

MEASURED = ("shots", "faces", "motion")  # the stages that read this pass's frames


def setup() -> None:
    """Loads the face detector once per worker process (curate.stage.DecodePass.setup)."""
    speaker.setup()


def needed(cfg: CurateConfig) -> bool:
    """Whether any stage that reads this pass is on."""
    return any(cfg.on(s) for s in MEASURED)


def apply(plan: SourcePlan, cfg: CurateConfig) -> None:
    """Decode `plan.path` once and fill `plan.measured` for every stage of MEASURED that `cfg` turns on."""
    finder = shots.CutFinder(cfg.cut_threshold) if cfg.on("shots") else None
    faces = speaker.FaceFinder(cfg.face_every) if cfg.on("faces") else None
    meter = motion.MotionMeter(plan.num_frames) if cfg.on("motion") else None
    for k, rgb in display_frames(plan.path):
        if faces is not None:
            faces.push(k, rgb)
        if finder is None and meter is None:
            continue
        small = shots.analysis_size(rgb)
        if finder is not None:
            finder.push(k, small)
        if meter is not None:
            meter.push(k, small)
    got: dict[str, Any] = {}
    if finder is not None:
        got["shots"] = finder.cuts()
    if faces is not None:
        got["faces"] = faces.detections
    if meter is not None:
        got["motion"] = meter.result()
    plan.measured.update(got)
