"""Target geometry: every record of a dataset has one frame shape.

A source shown at W0 x H0 (display size, after its rotation) is fitted to the training size W x H by
"cover": scaled by s = max(W / W0, H / H0) (so it covers the target, aspect kept) with FFmpeg's area
filter, then cropped to W x H. Where the crop sits is a named policy, like the quality filters:
`center` (default) or one registered with `register_crop(name, fn)`, e.g. a face-centred crop from a
face detector. A policy sees the source's first frame at the scaled size and returns the crop's top-left
corner; the same crop is used for every frame of the source (no jitter within a clip).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from mirage_base.errors import InputError

# (first frame, uint8 [H1, W1, 3] at the scaled display size; target (W, H)) -> crop top-left (x, y)
CropFn = Callable[[np.ndarray, tuple[int, int]], tuple[int, int]]
_CROPS: dict[str, CropFn] = {}


def register_crop(name: str, fn: CropFn) -> None:
    """Make `fn` selectable as `prepare --crop=name`."""
    _CROPS[name] = fn


def get_crop(name: str) -> CropFn:
    if name not in _CROPS:
        raise InputError(f"--crop: unknown crop policy {name!r}; registered: {sorted(_CROPS)}, or face (curation's "
                         "crop stage, with --size)")  # face is not a CropFn: prepare routes it to curate.crop
    return _CROPS[name]


def center(first: np.ndarray, target: tuple[int, int]) -> tuple[int, int]:
    """The middle of the scaled frame (odd margins round towards the top-left)."""
    h1, w1 = first.shape[:2]
    return (w1 - target[0]) // 2, (h1 - target[1]) // 2


register_crop("center", center)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How to turn one source's frames into records: scale the STORED frame to `scale` = (W, H) (None:
    keep), turn it to display orientation, then keep `crop` = (x, y, w, h) of that (None: all of it)."""

    scale: tuple[int, int] | None
    crop: tuple[int, int, int, int] | None


def cover_size(display: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Smallest aspect-preserving scale of `display` = (W0, H0) that covers `target` = (W, H)."""
    (w0, h0), (w, h) = display, target
    s = max(w / w0, h / h0)
    return max(w, math.floor(w0 * s + 0.5)), max(h, math.floor(h0 * s + 0.5))


def plan(
    display: tuple[int, int],
    rotation: int,
    target: tuple[int, int] | None,
    crop: str = "center",
    first_frame: Callable[[Geometry], np.ndarray] | None = None,
) -> Geometry:
    """The Geometry fitting a source shown at `display` (rotation in degrees) to `target` (None: as is).

    `first_frame(g)` gives the source's first frame under `g` (only asked for by a non-centre policy).
    ValueError if the policy's crop does not fit inside the scaled frame.
    """
    if target is None or tuple(display) == tuple(target):
        return Geometry(None, None)
    w1, h1 = cover_size(display, target)
    scale = (h1, w1) if rotation % 180 else (w1, h1)  # the stored frame is turned after scaling
    scaled = Geometry(None if (w1, h1) == tuple(display) else scale, None)
    if crop == "center" or first_frame is None:
        x, y = center(np.empty((h1, w1, 0), np.uint8), target)
    else:
        x, y = get_crop(crop)(first_frame(scaled), target)
    if not (0 <= x <= w1 - target[0] and 0 <= y <= h1 - target[1]):
        raise ValueError(f"--crop={crop}: crop at ({x}, {y}) of {target[0]}x{target[1]} is outside the {w1}x{h1} frame")
    return Geometry(scaled.scale, None if (w1, h1) == tuple(target) else (int(x), int(y), *target))
