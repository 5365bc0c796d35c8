"""Shot boundaries with PySceneDetect's ContentDetector, fed the frames prepare decodes (PyAV), so a clip never
spans a cut: the source's clips are re-planned inside each shot (clips.plan_clips per shot, the reference frame
drawn from the same shot), and a shot shorter than the minimum clip, or a shot's tail, is a dropped span.

ContentDetector scores each frame by the mean change of hue, saturation and luminance (0-255) from the frame
before, on frames downscaled to at most ANALYSIS_WIDTH wide (its own default downscale does the same for
speed); a score >= `CurateConfig.cut_threshold` starts a shot (its `min_scene_len` = 1 frame here: the
minimum clip rule is ours). Frames are BGR, as PySceneDetect reads them from OpenCV.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from data_pipeline.curate.plan import Clip, CurateConfig, SourcePlan, display_frames
from data_pipeline.ingest import clips, media

ANALYSIS_WIDTH = 256


def detect_cuts(frames: Iterable[tuple[int, np.ndarray]], threshold: float = 27.0) -> list[int]:
    """Frame indices where a new shot starts (0 excluded), from (index, uint8 RGB [H, W, 3]) in order."""
    import cv2
    from scenedetect.common import FrameTimecode
    from scenedetect.detectors import ContentDetector

    det = ContentDetector(threshold=threshold, min_scene_len=1)
    cuts: list[int] = []
    last = 0
    for k, rgb in frames:
        h, w = rgb.shape[:2]
        if w > ANALYSIS_WIDTH:
            rgb = cv2.resize(rgb, (ANALYSIS_WIDTH, max(2, round(h * ANALYSIS_WIDTH / w))), interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        cuts += [tc.frame_num for tc in det.process_frame(FrameTimecode(k, fps=float(media.FPS)), bgr)]
        last = k
    cuts += [tc.frame_num for tc in det.post_process(FrameTimecode(last, fps=float(media.FPS)))]
    return sorted({c for c in cuts if 0 < c <= last})


def shots_of(num_frames: int, cuts: list[int]) -> list[tuple[int, int]]:
    """[start, stop) of each shot."""
    edges = [0, *cuts, num_frames]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def plan_in_shots(plan: SourcePlan, clip_frames: int, min_frames: int, temporal_factor: int, seed: int) -> None:
    """Re-plan `plan.clips` inside the shots of `plan.cuts`; short shots and shot tails become dropped spans."""
    plan.clips, spans = [], []
    for a, b in shots_of(plan.num_frames, plan.cuts):
        got = clips.plan_clips(b - a, clip_frames, min_frames, temporal_factor, f"{plan.source_id}#{a}", seed)
        if not got:
            spans.append((a, b, f"shot of {(b - a) / media.FPS:.2f} s is shorter than the minimum clip "
                                f"({min_frames / media.FPS:.2f} s)", "shots"))
            continue
        for c in got:
            plan.clips.append(Clip(a + c.start, c.length, None if c.ref_frame is None else a + c.ref_frame))
        end = a + got[-1].start + got[-1].length
        if end < b:
            spans.append((end, b, f"shot tail of {(b - end) / media.FPS:.2f} s is shorter than the minimum clip "
                                  f"({min_frames / media.FPS:.2f} s)", "shots"))
    plan.spans.extend(spans)


def apply(plan: SourcePlan, cfg: CurateConfig) -> None:
    """Find the cuts of `plan.path` and re-plan its clips inside the shots (clip settings from its first plan)."""
    plan.cuts = detect_cuts(display_frames(plan.path), cfg.cut_threshold)
    plan_in_shots(plan, plan.clip_frames, plan.min_frames, plan.temporal_factor, plan.seed)
