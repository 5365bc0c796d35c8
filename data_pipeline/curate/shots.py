"""Shot boundaries with PySceneDetect's ContentDetector, fed the frames prepare decodes (PyAV), so a clip never
spans a cut: the source's clips are re-planned inside each shot (clips.plan_clips per shot, the reference frame
drawn from the same shot), and a shot shorter than the minimum clip, or a shot's tail, is a dropped span.

ContentDetector scores each frame by the mean change of hue, saturation and luminance (0-255) from the frame
before, on frames downscaled to at most ANALYSIS_WIDTH wide (its own default downscale does the same for
speed); a score >= `CurateConfig.cut_threshold` starts a shot (its `min_scene_len` = 1 frame here: the
minimum clip rule is ours). Frames are BGR, as PySceneDetect reads them from OpenCV. The frames come from
curate.decode's one pass over the source (`CutFinder`), shared with the faces and motion stages.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.curate.plan import Clip, CurateConfig, SourcePlan
from data_pipeline.ingest import clips, media

ANALYSIS_WIDTH = 256


def analysis_size(rgb: np.ndarray) -> np.ndarray:
    """`rgb` [H, W, 3] downscaled (area) to at most ANALYSIS_WIDTH wide, aspect kept (the shots and motion
    stages' frames)."""
    import cv2

    h, w = rgb.shape[:2]
    if w > ANALYSIS_WIDTH:
        rgb = cv2.resize(rgb, (ANALYSIS_WIDTH, max(2, round(h * ANALYSIS_WIDTH / w))), interpolation=cv2.INTER_AREA)
    return rgb


class CutFinder:
    """PySceneDetect's ContentDetector fed one frame at a time (`push(k, small)`: small = analysis_size(rgb),
    in order); `cuts()` once after the last frame: where a new shot starts (0 excluded)."""

    def __init__(self, threshold: float = 27.0):
        from scenedetect.detectors import ContentDetector

        self.det = ContentDetector(threshold=threshold, min_scene_len=1)
        self.found: list[int] = []
        self.last = 0

    def push(self, k: int, small: np.ndarray) -> None:
        from scenedetect.common import FrameTimecode

        bgr = np.ascontiguousarray(small[..., ::-1])
        self.found += [tc.frame_num for tc in self.det.process_frame(FrameTimecode(k, fps=float(media.FPS)), bgr)]
        self.last = k

    def cuts(self) -> list[int]:
        from scenedetect.common import FrameTimecode

        found = self.found + [tc.frame_num for tc in self.det.post_process(FrameTimecode(self.last,
                                                                                       fps=float(media.FPS)))]
        return sorted({c for c in found if 0 < c <= self.last})


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
    """Re-plan `plan.clips` inside the shots of the cuts curate.decode measured (clip settings from its first
    plan)."""
    plan.cuts = plan.measured.pop("shots")
    plan_in_shots(plan, plan.clip_frames, plan.min_frames, plan.temporal_factor, plan.seed)
