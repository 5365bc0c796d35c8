"""Face crops for SyncNet from ordinary footage: detect, track, smooth, crop to 224 x 224.

Used by `mirage_jax.eval` (LSE scoring) and by prepare's curation (data_pipeline.curate.speaker, .sync), so it
lives in data_pipeline (which never imports mirage_jax).

Detector: OpenCV's frontal-face Haar cascade (`haarcascade_frontalface_default.xml`), whose model file ships
inside the opencv-python-headless wheel (`cv2.data.haarcascades`), so nothing is downloaded. The reference
pipeline (joonson/syncnet_python run_pipeline.py) uses S3FD instead; the tracking and the crop below follow
its `track_shot` and `crop_video`:

- tracking: a detection joins the track whose last box it overlaps with IoU > 0.5 within 25 frames
  (`num_failed_det`), boxes are linearly interpolated over missed frames; the longest track is scored;
- crop: box half-size s = max(w, h) / 2 and centre (x, y), each median-filtered over 13 frames
  (scipy.signal.medfilt); the frame is padded by int(s (1 + 2 cs)) with value 110 and the crop is rows
  [y - s, y + s (1 + 2 cs)), columns [x - s (1 + cs), x + s (1 + cs)) with crop_scale cs = 0.4, resized to
  224 x 224 (cv2.resize, bilinear). Frames are BGR uint8 throughout (SyncNet's input).

A Haar cascade finds fewer faces than S3FD (profiles, small or dark faces) and places its boxes a little
differently, so crops, and LSE numbers, are close to but not the reference's (docs/eval.md).
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import numpy as np

from data_pipeline.ingest import per_worker

SIZE = 224
CROP_SCALE = 0.4
IOU_THRESHOLD = 0.5
MAX_GAP = 25  # frames a track may miss detections for (the reference's num_failed_det)
SMOOTH = 13  # median filter length (frames) of the box size and centre
PAD_VALUE = 110
SCALE_STEP = 1.1  # detectMultiScale's scaleFactor
DETECT_SIDE = 480  # frames are detected at this longer side or less (speed; the crop uses the full frame)
_DETECTING = threading.Lock()


def cascade():  # noqa: ANN201 - cv2.CascadeClassifier
    """OpenCV's bundled frontal-face cascade, loaded once per process (ingest.per_worker: once per worker on
    every Beam runner); RuntimeError naming the file if OpenCV cannot load it."""
    import cv2

    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    return per_worker.load_once(("face_cascade", path), functools.partial(_load_cascade, path))


def _load_cascade(path: str):  # noqa: ANN202 - cv2.CascadeClassifier
    import cv2

    c = cv2.CascadeClassifier(path)
    if c.empty():
        raise RuntimeError(f"OpenCV could not load its bundled face detector {path}")
    return c


def detect(bgr: np.ndarray) -> np.ndarray:
    """Faces in one uint8 BGR frame [H, W, 3] as float boxes [K, 4] (x1, y1, x2, y2) in pixels of the frame."""
    return detect_scored(bgr)[0]


def detect_scored(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`detect`'s boxes [K, 4] and each one's support [K]: how strongly the cascade agrees, as its neighbour
    count (the raw windows grouped into the box, detectMultiScale2) per scale step at which a face of that size
    can be found (1 + ln(side / min side) / ln(scale factor)): a bigger face is seen at more scales, so raw
    counts grow with size; per scale step, the real faces of tests/test_curation.py (28 to 100 px) score 3 to
    5 and the cascade's false face on the astronaut's suit (128 px) under 1."""
    import cv2

    h, w = bgr.shape[:2]
    scale = min(1.0, DETECT_SIDE / max(h, w))
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    min_side = max(24, int(0.08 * min(gray.shape)))
    with _DETECTING:  # one cascade per process; OpenCV's CascadeClassifier is not safe for concurrent calls
        found, neighbours = cascade().detectMultiScale2(gray, scaleFactor=SCALE_STEP, minNeighbors=5,
                                                        minSize=(min_side, min_side))
    if len(found) == 0:
        return np.zeros((0, 4), np.float64), np.zeros(0, np.float64)
    raw = np.asarray(found, np.float64)
    steps = 1.0 + np.log(np.maximum(raw[:, 2], min_side) / min_side) / np.log(SCALE_STEP)
    support = np.asarray(neighbours, np.float64).reshape(-1) / steps
    b = raw / scale
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1), support


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Track:
    """One face over consecutive frames: `frames` [n] (first..last, every frame) and `boxes` [n, 4]."""

    frames: np.ndarray
    boxes: np.ndarray


def link(detections: list[np.ndarray], max_gap: int = MAX_GAP,
         threshold: float = IOU_THRESHOLD) -> list[list[tuple[int, np.ndarray]]]:
    """Every face track through per-frame detections, as lists of (index into `detections`, box): a detection
    joins the track whose last box it overlaps most with IoU > `threshold` within `max_gap` entries, else it
    starts a new track (the reference's track_shot)."""
    tracks: list[list[tuple[int, np.ndarray]]] = []
    for f, boxes in enumerate(detections):
        for box in boxes:
            best, best_iou = None, threshold
            for t in tracks:
                last_f, last_box = t[-1]
                if last_f < f and f - last_f <= max_gap:
                    v = iou(box, last_box)
                    if v > best_iou:
                        best, best_iou = t, v
            if best is None:
                tracks.append([(f, box)])
            else:
                best.append((f, box))
    return tracks


def track(detections: list[np.ndarray]) -> Track | None:
    """The longest face track through per-frame detections (see the module docstring); None if no face."""
    tracks = link(detections)
    if not tracks:
        return None
    t = max(tracks, key=lambda t: (t[-1][0] - t[0][0], len(t)))
    fs = np.asarray([f for f, _ in t], np.float64)
    bs = np.stack([b for _, b in t])
    frames = np.arange(int(fs[0]), int(fs[-1]) + 1)
    boxes = np.stack([np.interp(frames, fs, bs[:, j]) for j in range(4)], axis=1)
    return Track(frames, boxes)


def smooth_boxes(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, x, y) per frame: half the box's longer side and its centre, median-filtered over SMOOTH frames
    (scipy.signal.medfilt, zero-padded ends as in the reference; a track shorter than SMOOTH frames uses the
    longest odd length that fits, so the zeros never reach the median)."""
    from scipy.signal import medfilt

    k = min(SMOOTH, len(boxes) - (1 - len(boxes) % 2))

    s = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    x = (boxes[:, 0] + boxes[:, 2]) / 2
    y = (boxes[:, 1] + boxes[:, 3]) / 2
    return tuple(medfilt(v, kernel_size=k) for v in (s, x, y))  # type: ignore[return-value]


def crop(bgr: np.ndarray, s: float, x: float, y: float, cs: float = CROP_SCALE) -> np.ndarray:
    """The reference's crop of one frame around a face of half-size `s` centred at (`x`, `y`): uint8 [224, 224, 3]."""
    import cv2

    bsi = int(s * (1 + 2 * cs))
    frame = np.pad(bgr, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=PAD_VALUE)
    my, mx = y + bsi, x + bsi
    face = frame[int(my - s):int(my + s * (1 + 2 * cs)), int(mx - s * (1 + cs)):int(mx + s * (1 + cs))]
    return cv2.resize(face, (SIZE, SIZE))


def fit(bgr: np.ndarray) -> np.ndarray:
    """An already-cropped face frame at SyncNet's 224 x 224 (resized when it is another size)."""
    import cv2

    if bgr.shape[:2] == (SIZE, SIZE):
        return bgr
    return cv2.resize(bgr, (SIZE, SIZE))
