"""`--crop=face`: each kept clip's crop window (the training size `--size`, taken from the frame scaled to
cover it, as the centre crop is) follows its face track, smoothed over time and clamped to the frame.

Per clip: the face detections (display pixels, every `face_every`-th frame) are linearly interpolated to every
frame and scaled to the cover-scaled frame; their centre is median-filtered as the SyncNet crop does
(faces.smooth_boxes: 13 frames) and then averaged over `crop_smooth` frames (a centred moving average, ends
held), so the window glides instead of jittering; the window is centred there and clamped inside the frame.
Frames outside kept clips (reference frames) use the window of the nearest kept frame in the same shot, else
the centre crop. The result is `plan.crop_xy` [num_frames, 2] (top-left x, y), which ingest applies per frame.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.curate.plan import Clip, CurateConfig, SourcePlan
from data_pipeline.curate.shots import shots_of
from data_pipeline.ingest import faces


def moving_average(v: np.ndarray, n: int) -> np.ndarray:
    """Centred mean over `n` samples (n made odd and <= len(v)), the ends padded with their edge values."""
    n = max(1, min(n, len(v)))
    n -= 1 - n % 2
    if n <= 1:
        return v.astype(np.float64)
    p = np.pad(v.astype(np.float64), n // 2, mode="edge")
    return np.convolve(p, np.ones(n) / n, mode="valid")


def clip_window(clip: Clip, scale: tuple[float, float], scaled: tuple[int, int], target: tuple[int, int],
                smooth: int) -> np.ndarray:
    """[clip.length, 2] int top-left (x, y) of the `target` window in the `scaled` frame, per clip frame."""
    assert clip.track is not None
    t = clip.track
    ks = np.arange(clip.start, clip.stop)
    boxes = np.stack([np.interp(ks, t[:, 0], t[:, j]) for j in range(1, 5)], axis=1)
    boxes = boxes * np.array([scale[0], scale[1], scale[0], scale[1]])
    _, cx, cy = faces.smooth_boxes(boxes)
    cx, cy = moving_average(cx, smooth), moving_average(cy, smooth)
    x = np.clip(np.round(cx - target[0] / 2), 0, scaled[0] - target[0])
    y = np.clip(np.round(cy - target[1] / 2), 0, scaled[1] - target[1])
    return np.stack([x, y], axis=1).astype(np.int64)


def apply(plan: SourcePlan, cfg: CurateConfig) -> None:
    if plan.scaled is None or plan.target is None:
        raise ValueError("the face crop needs --size=WxH (the crop's size)")
    sw, sh = plan.scaled
    tw, th = plan.target
    xy = np.full((plan.num_frames, 2), -1, np.int64)
    for c in plan.live():
        xy[c.start:c.stop] = clip_window(c, (sw / plan.width, sh / plan.height), plan.scaled, plan.target,
                                         cfg.crop_smooth)
        c.values["crop_xy"] = [int(v) for v in np.round(xy[c.start:c.stop].mean(axis=0))]
    centre = np.array([(sw - tw) // 2, (sh - th) // 2])
    for a, b in shots_of(plan.num_frames, plan.cuts):
        have = np.flatnonzero(xy[a:b, 0] >= 0)
        if not len(have):
            xy[a:b] = centre
            continue
        near = have[np.abs(np.arange(b - a)[:, None] - have[None]).argmin(axis=1)]
        xy[a:b] = xy[a:b][near]
    plan.crop_xy = xy
