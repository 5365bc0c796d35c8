"""Motion: camera pans and near-static clips, measured on frames downscaled to shots.ANALYSIS_WIDTH wide.

- pan: the translation between frames `STEP` apart by phase correlation (cv2.phaseCorrelate, Hann window) in
  each tile of a TILES x TILES grid; the camera's is the median over the background's tiles, then the median
  over the clip, in frame widths per second; above `max_pan` the clip is dropped (`camera pan`). The
  background is every tile outside the speaker (the faces stage's box over the clip, widened by half its
  width each side and by a quarter of its height above, down to the frame's bottom: head and body), or every
  tile when there is no track or fewer than 3 tiles remain: a talking head fills much of the frame, and its
  own motion is not the camera's.
- near-static: filters.static's measure (mean absolute frame-to-frame difference, 0-255) below `min_change`
  drops it (`near-static`).

The pan speed is recorded per clip (`pan_wps`).
"""

from __future__ import annotations

import numpy as np

from data_pipeline.curate.plan import CurateConfig, SourcePlan, display_frames
from data_pipeline.curate.shots import ANALYSIS_WIDTH
from data_pipeline.ingest import filters, media

STEP = 5  # frames between the two frames whose shift is measured
TILES = 4  # tiles per side


def background_tiles(shape: tuple[int, int], speaker: np.ndarray | None) -> list[tuple[int, int]]:
    """Top-left (y, x) of the TILES x TILES tiles of a [H, W] frame outside `speaker` (x1, y1, x2, y2; None:
    all tiles; all of them too when fewer than 3 are outside)."""
    th, tw = shape[0] // TILES, shape[1] // TILES
    tiles = [(y, x) for y in range(0, TILES * th, th) for x in range(0, TILES * tw, tw)]
    if speaker is None:
        return tiles
    x1, y1, x2, _ = speaker
    w, h = x2 - x1, speaker[3] - y1
    bx1, bx2, by1 = x1 - w / 2, x2 + w / 2, y1 - h / 4
    out = [(y, x) for y, x in tiles if x + tw <= bx1 or x >= bx2 or y + th <= by1]
    return out if len(out) >= 3 else tiles


def pan_speed(gray: np.ndarray, speaker: np.ndarray | None = None) -> float:
    """Median camera translation of float32 frames [T, H, W], in frame widths per second at 25 fps, measured
    outside `speaker` (a box in these frames' pixels; see background_tiles)."""
    import cv2

    if len(gray) <= STEP:
        return 0.0
    th, tw = gray.shape[1] // TILES, gray.shape[2] // TILES
    win = cv2.createHanningWindow((tw, th), cv2.CV_32F)
    where = background_tiles(gray.shape[1:], speaker)
    shifts = []
    for i in range(0, len(gray) - STEP, STEP):
        a, b = gray[i], gray[i + STEP]
        tiles = [np.hypot(*cv2.phaseCorrelate(np.ascontiguousarray(a[y:y + th, x:x + tw]),
                                              np.ascontiguousarray(b[y:y + th, x:x + tw]), win)[0])
                 for y, x in where]
        shifts.append(float(np.median(tiles)))
    return float(np.median(shifts)) / STEP * media.FPS / gray.shape[2]


def apply(plan: SourcePlan, cfg: CurateConfig) -> None:
    import cv2

    live = {c.start: c for c in plan.live()}
    owner = {k: c.start for c in live.values() for k in range(c.start, c.stop)}
    held: dict[int, list[np.ndarray]] = {}
    for k, rgb in display_frames(plan.path):
        if k not in owner:
            continue
        h, w = rgb.shape[:2]
        if w > ANALYSIS_WIDTH:
            rgb = cv2.resize(rgb, (ANALYSIS_WIDTH, max(2, round(h * ANALYSIS_WIDTH / w))), interpolation=cv2.INTER_AREA)
        held.setdefault(owner[k], []).append(rgb)
        c = live[owner[k]]
        if k + 1 < c.stop:
            continue
        frames = np.stack(held.pop(c.start))
        gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
        box = None
        if c.track is not None:  # the speaker's extent over the clip, in analysis pixels
            t = c.track[:, 1:] * (gray.shape[2] / plan.width)
            box = np.array([t[:, 0].min(), t[:, 1].min(), t[:, 2].max(), t[:, 3].max()])
        pan = pan_speed(gray, box)
        c.values["pan_wps"] = round(pan, 4)
        still = filters.static(filters.ClipData(frames, np.zeros(0, np.float32), plan.path, c.start), cfg.min_change)
        if pan > cfg.max_pan:
            # 3 significant digits: a pan just over a small --max-pan never reads "0.02 > 0.02"
            c.drop, c.stage = f"camera pan {pan:.3g} frame widths/s > {cfg.max_pan:g}", "motion"
        elif still is not None:
            c.drop, c.stage = f"near-static: {still}", "motion"
