"""Lip-sync for synthetic A-roll: mouth opening read off the frames, its correlation with the speech, and
the audio-video offset with a confidence (SyncNet's offset + confidence, made exact for this domain).

The synthetic talking heads (`data_pipeline.synthetic.talking_head`) draw the mouth interior in one colour
(`MOUTH_INTERIOR`) as an ellipse whose height is linear in the opening, and nothing else of that colour
sits in the lower middle of the face. So the per-frame opening is, up to an affine map, the soft area of
mouth-interior-coloured pixels in a fixed window around the mouth (wide enough for the head's sway and
tilt). The soft (Gaussian) colour membership keeps partial credit for the blurred mouths a young model
draws. On real synthetic clips the estimate correlates with the true track at r ~ 0.99.

The speech's own track is `data_pipeline.synthetic.speech.mouth_track(waveform)` (the loudness envelope the
renderer animates the mouth with), so any audio, not only the data set's, has a ground truth.

Sync score = Pearson r of the two tracks at offset 0. Offset = the lag in [-max_offset, max_offset] that
maximises r (positive: the mouth moves after the sound); confidence = r at that lag minus the median r
over all lags (SyncNet's "max minus median").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.synthetic.talking_head import MOUTH_INTERIOR

# (top, bottom, left, right) as fractions of the frame: the mouth at every opening, face shape, sway and tilt
MOUTH_WINDOW = (0.44, 0.72, 0.30, 0.70)
COLOUR_SIGMA = 40.0  # RGB distance scale of the soft colour membership


def mouth_opening(frames: np.ndarray) -> np.ndarray:
    """Per-frame mouth opening (arbitrary affine units) of uint8 RGB frames [T, H, W, 3] -> float64 [T]."""
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"mouth_opening: expected frames [T, H, W, 3], got shape {x.shape}")
    h, w = x.shape[1:3]
    top, bottom, left, right = MOUTH_WINDOW
    win = x[:, int(top * h) : int(bottom * h), int(left * w) : int(right * w)].astype(np.float64)
    d2 = np.sum((win - np.asarray(MOUTH_INTERIOR, np.float64)) ** 2, axis=-1)
    return np.exp(-d2 / (2.0 * COLOUR_SIGMA**2)).mean(axis=(1, 2))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant (no motion carries no sync)."""
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    return float(np.sum(a * b) / den) if den > 1e-12 else 0.0


def lagged_correlations(video_track: np.ndarray, audio_track: np.ndarray, max_offset: int) -> np.ndarray:
    """r(k) for k in [-max_offset, max_offset]: video frame i paired with audio frame i - k."""
    v, a = np.asarray(video_track, np.float64), np.asarray(audio_track, np.float64)
    n = min(len(v), len(a))
    v, a = v[:n], a[:n]
    max_offset = min(max_offset, n - 3)
    out = []
    for k in range(-max_offset, max_offset + 1):
        if k >= 0:
            out.append(pearson(v[k:], a[: n - k]))
        else:
            out.append(pearson(v[: n + k], a[-k:]))
    return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class Sync:
    """One video against one speech track."""

    score: float  # r at offset 0
    offset: int  # frames; positive = the mouth moves after the sound
    confidence: float  # r at the offset minus the median r over all offsets

    def to_json(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def sync(video_track: np.ndarray, audio_track: np.ndarray, max_offset: int = 8) -> Sync:
    """Sync score, offset and confidence of a video's mouth track against a speech's mouth track."""
    n = min(len(video_track), len(audio_track))
    if n < 8:
        raise ValueError(f"lip-sync needs at least 8 frames, got {n}")
    rs = lagged_correlations(video_track, audio_track, max_offset)
    m = (len(rs) - 1) // 2
    best = int(np.argmax(rs))
    return Sync(score=pearson(video_track[:n], audio_track[:n]), offset=best - m,
                confidence=float(rs[best] - np.median(rs)))


def sync_frames(frames: np.ndarray, audio_track: np.ndarray, max_offset: int = 8) -> Sync:
    """`sync` of uint8 frames [T, H, W, 3] against a speech mouth track [T]."""
    return sync(mouth_opening(frames), audio_track, max_offset)
