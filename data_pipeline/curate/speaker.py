"""One tracked speaker per clip: faces detected on every `face_every`-th frame of curate.decode's one pass over
the source (data_pipeline.ingest.faces: OpenCV's bundled frontal-face Haar cascade), linked into tracks by IoU
inside each shot (faces.link, the reference's track_shot, its 25-frame gap counted in sampled frames; IoU >
`track_iou`, 0.3 by default rather than the reference's 0.5 per frame, since sampled frames are further apart),
then per clip:

- a track is *present* when seen in >= `other_visible` of the clip's sampled frames (a lone false detection
  is not a second person);
- no present track: dropped (`no face`), or, when the clip's detections together are seen in >= `other_visible`
  of its sampled frames, as a face that comes and goes (`face visible in i of n sampled frames, in k pieces`:
  gone for longer than the tracker bridges); two or more: dropped (`N faces`, a two-shot or split screen), where
  a track other than the speaker's (the one seen most) counts only if its median support (faces.detect_scored:
  the cascade's neighbour count per scale step) is >= `other_support` (0.4) of the speaker's: the cascade's
  false faces (the astronaut's suit at some scales) are supported 5-10x less than any real face measured, a
  real face half the speaker's size about as much (its count is recorded as `weak_faces`);
- the one track must span the clip (its first and last detection within one sample of the clip's first and
  last sampled frame; the tracker bridges misses of up to 25 frames) and be seen in >= `min_visible` of the
  sampled frames (0.5 by default: the Haar cascade misses a frontal face now and then): else dropped (`face
  visible in i of n sampled frames`: it comes and goes, or enters or leaves the frame);
- its median box height must be >= `min_face` of the frame height: else dropped (`face too small`).

A kept clip records its face box (median, display pixels) and keeps the detections for the crop and sync
stages.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.curate.plan import Clip, CurateConfig, SourcePlan
from data_pipeline.curate.shots import shots_of
from data_pipeline.ingest import faces


def setup() -> None:
    """Loads the face detector once per worker process (curate.stage.CurateStage.setup)."""
    faces.cascade()


class FaceFinder:
    """Face detections on every `every`-th frame of curate.decode's one pass (`push(k, rgb)`, display size);
    `detections` {frame: [K, 5] boxes (x1, y1, x2, y2) at display size and their support
    (faces.detect_scored)}."""

    def __init__(self, every: int):
        self.every = every
        self.detections: dict[int, np.ndarray] = {}

    def push(self, k: int, rgb: np.ndarray) -> None:
        if k % self.every == 0:
            boxes, support = faces.detect_scored(np.ascontiguousarray(rgb[..., ::-1]))
            self.detections[k] = np.concatenate([boxes, support[:, None]], axis=1)


def tracks(dets: dict[int, np.ndarray], shots: list[tuple[int, int]], every: int,
           track_iou: float = faces.IOU_THRESHOLD) -> list[np.ndarray]:
    """Face tracks, never across a cut: each [n, 6] (frame, x1, y1, x2, y2, support) from FaceFinder's
    detections."""
    out = []
    for a, b in shots:
        ks = sorted(k for k in dets if a <= k < b)
        for t in faces.link([dets[k] for k in ks], max_gap=max(1, faces.MAX_GAP // every), threshold=track_iou):
            out.append(np.asarray([[ks[i], *box] for i, box in t], np.float64))
    return out


def judge(clip: Clip, found: list[np.ndarray], every: int, height: int, cfg: CurateConfig) -> str | None:
    """The reason to drop `clip` given every track `found` (see the module docstring), or None (keep; then
    `clip.track` and `clip.values['face_box']` are set)."""
    samples = [k for k in range(clip.start, clip.stop) if k % every == 0]
    n = len(samples)
    seen, pieces = [], []  # present tracks; detections per track inside the clip
    for t in found:
        inside = t[(t[:, 0] >= clip.start) & (t[:, 0] < clip.stop)]
        if len(inside):
            pieces.append(len(inside))
        if len(inside) and len(inside) >= cfg.other_visible * n:
            seen.append(inside)
    if not seen:
        if sum(pieces) and sum(pieces) >= cfg.other_visible * n:  # one face, in pieces the tracker cannot bridge
            return (f"face visible in {sum(pieces)} of {n} sampled frames, in {len(pieces)} pieces more than "
                    f"{faces.MAX_GAP} frames apart: it comes and goes")
        return "no face"
    # the speaker: the track seen most often (then the best supported); another present track is a second
    # person only if the cascade supports it at least `other_support` as strongly (its false faces on clothes
    # or texture are supported 5-10x less than a real face of any size: faces.detect_scored)
    seen.sort(key=lambda t: (-len(t), -float(np.median(t[:, 5]))))
    main = float(np.median(seen[0][:, 5]))
    weak = [t for t in seen[1:] if float(np.median(t[:, 5])) < cfg.other_support * main]
    seen = [t for t in seen if not any(t is w for w in weak)]
    if len(seen) > 1:
        return f"{len(seen)} faces (one speaker wanted)"
    t = seen[0][:, :5]
    if weak:
        clip.values["weak_faces"] = len(weak)
    covers = t[0, 0] - samples[0] <= every and samples[-1] - t[-1, 0] <= every
    if not covers:  # the reason says which rule: a user tunes --min-visible only for the second
        return (f"face seen only in frames {int(t[0, 0])}-{int(t[-1, 0])} of the clip's {clip.start}-"
                f"{clip.stop - 1} ({len(t)} of {n} sampled frames): it comes and goes (enters, leaves, or is "
                "missed at an end)")
    if len(t) < cfg.min_visible * n:
        return (f"face visible in {len(t)} of {n} sampled frames (< --min-visible {cfg.min_visible:g}): it comes "
                "and goes")
    box = np.median(t[:, 1:5], axis=0)
    if box[3] - box[1] < cfg.min_face * height:
        return f"face too small ({box[3] - box[1]:.0f} px < {cfg.min_face:g} x {height} px frame height)"
    clip.track = t
    clip.values["face_box"] = [round(float(v), 1) for v in box]
    return None


def apply(plan: SourcePlan, cfg: CurateConfig) -> None:
    dets = plan.measured.pop("faces")
    found = tracks(dets, shots_of(plan.num_frames, plan.cuts), cfg.face_every, cfg.track_iou)
    for c in plan.live():
        why = judge(c, found, cfg.face_every, plan.height, cfg)
        if why is not None:
            c.drop, c.stage = why, "faces"
