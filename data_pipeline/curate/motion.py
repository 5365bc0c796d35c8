"""Motion: camera pans and near-static clips, measured on frames downscaled to shots.ANALYSIS_WIDTH wide, in
curate.decode's one pass over the source (`MotionMeter`: every frame's tile shifts and frame difference; the
stage then reads the pairs and sums of the clips still kept, with the speaker box the faces stage found).

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

from data_pipeline.curate.plan import CurateConfig, SourcePlan
from data_pipeline.ingest import filters, media

STEP = 5  # frames between the two frames whose shift is measured
TILES = 4  # tiles per side


def background_tiles(shape: tuple[int, int], speaker: np.ndarray | None) -> list[tuple[int, int]]:
    """Top-left (y, x) of the TILES x TILES tiles of a [H, W] frame outside `speaker` (x1, y1, x2, y2; None:
    all tiles; all of them too when fewer than 3 are outside)."""
    th, tw = shape[0] // TILES, shape[1] // TILES
    tiles = tile_grid(shape)
    if speaker is None:
        return tiles
    x1, y1, x2, _ = speaker
    w, h = x2 - x1, speaker[3] - y1
    bx1, bx2, by1 = x1 - w / 2, x2 + w / 2, y1 - h / 4
    out = [(y, x) for y, x in tiles if x + tw <= bx1 or x >= bx2 or y + th <= by1]
    return out if len(out) >= 3 else tiles


def tile_grid(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left (y, x) of the TILES x TILES tiles of a [H, W] frame, row by row."""
    th, tw = shape[0] // TILES, shape[1] // TILES
    return [(y, x) for y in range(0, TILES * th, th) for x in range(0, TILES * tw, tw)]


class MotionMeter:
    """What the motion stage needs, measured on every frame of curate.decode's one pass (`push(k, small)`:
    small = shots.analysis_size(rgb), in order) while holding STEP + 1 frames:
    `shifts` [num_frames, TILES**2]: row k the phase-correlation shift (pixels) of each tile between frames
    k - STEP and k (NaN for k < STEP); `diffs` [num_frames] int64: row k the sum of |frame k - frame k-1| over
    pixels and channels (0 for k = 0); `frames`: how many frames were decoded; `shape`: the frames' [H, W]."""

    def __init__(self, num_frames: int):
        self.shifts = np.full((num_frames, TILES * TILES), np.nan)
        self.diffs = np.zeros(num_frames, np.int64)
        self.frames = 0
        self.shape: tuple[int, int] = (0, 0)
        self.gray: dict[int, np.ndarray] = {}
        self.prev: np.ndarray | None = None
        self.win: np.ndarray | None = None

    def push(self, k: int, small: np.ndarray) -> None:
        import cv2

        if k >= len(self.diffs):
            return
        self.frames, self.shape = k + 1, small.shape[:2]
        if self.prev is not None:
            self.diffs[k] = int(np.abs(small.astype(np.int16) - self.prev.astype(np.int16)).sum())
        self.prev = small
        g = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
        self.gray[k] = g
        self.gray.pop(k - STEP - 1, None)
        a = self.gray.get(k - STEP)
        if a is None:
            return
        th, tw = g.shape[0] // TILES, g.shape[1] // TILES
        if self.win is None:
            self.win = cv2.createHanningWindow((tw, th), cv2.CV_32F)
        self.shifts[k] = [np.hypot(*cv2.phaseCorrelate(np.ascontiguousarray(a[y:y + th, x:x + tw]),
                                                       np.ascontiguousarray(g[y:y + th, x:x + tw]), self.win)[0])
                          for y, x in tile_grid(g.shape)]

    def result(self) -> dict[str, object]:
        return {"shifts": self.shifts, "diffs": self.diffs, "frames": self.frames, "shape": self.shape}


def pan_speed(shifts: np.ndarray, start: int, stop: int, shape: tuple[int, int],
              speaker: np.ndarray | None = None) -> float:
    """Median camera translation over frames [start, stop) (MotionMeter's `shifts`, frames of `shape` [H, W]),
    in frame widths per second at 25 fps: per pair (start + i, start + i + STEP), i = 0, STEP, ... inside the
    clip, the median over the tiles outside `speaker` (a box in these frames' pixels; see background_tiles),
    then the median over the pairs."""
    if stop - start <= STEP:
        return 0.0
    grid = tile_grid(shape)
    where = [grid.index(t) for t in background_tiles(shape, speaker)]
    per_pair = [float(np.median(shifts[start + i + STEP, where])) for i in range(0, stop - start - STEP, STEP)]
    return float(np.median(per_pair)) / STEP * media.FPS / shape[1]


def apply(plan: SourcePlan, cfg: CurateConfig) -> None:
    m = plan.measured.pop("motion")
    shape = m["shape"]
    for c in list(plan.live()):
        if c.stop > m["frames"]:  # decoding stopped before the clip's end
            continue
        box = None
        if c.track is not None:  # the speaker's extent over the clip, in analysis pixels
            t = c.track[:, 1:] * (shape[1] / plan.width)
            box = np.array([t[:, 0].min(), t[:, 1].min(), t[:, 2].max(), t[:, 3].max()])
        pan = pan_speed(m["shifts"], c.start, c.stop, shape, box)
        c.values["pan_wps"] = round(pan, 4)
        # filters.static's measure (the mean over every pixel of every consecutive pair) from the exact sums
        n = (c.length - 1) * shape[0] * shape[1] * 3
        still = filters.static_verdict(float(m["diffs"][c.start + 1:c.stop].sum()) / n, cfg.min_change) \
            if c.length >= 2 else None
        if pan > cfg.max_pan:
            # 3 significant digits: a pan just over a small --max-pan never reads "0.02 > 0.02"
            c.drop, c.stage = f"camera pan {pan:.3g} frame widths/s > {cfg.max_pan:g}", "motion"
        elif still is not None:
            c.drop, c.stage = f"near-static: {still}", "motion"
