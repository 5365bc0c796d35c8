"""Quality filters for clips, registered by name (`prepare --filters=silence,static`).

A filter sees a clip's pixels and audio before encoding and returns None to keep it or a short reason to
drop it; prepare counts drops per filter in the manifest. Shot cuts, face tracks, lip sync (SyncNet) and camera
motion are curation stages (data_pipeline.curate, `prepare --curate`); other per-clip detectors (text overlay,
logos) can be registered here with `register_filter`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class ClipData:
    """What a filter sees: uint8 frames [T, H, W, 3] at 25 fps, 16 kHz mono audio, and where it came from."""

    frames: np.ndarray
    audio: np.ndarray
    source: str
    start_frame: int


Filter = Callable[[ClipData], str | None]
_FILTERS: dict[str, Filter] = {}


def register_filter(name: str, fn: Filter) -> None:
    """Make `fn` selectable as `--filters=name`."""
    _FILTERS[name] = fn


def get_filters(names: list[str]) -> list[tuple[str, Filter]]:
    """The named filters, in order; an unknown name lists the registered ones."""
    out = []
    for n in names:
        if n not in _FILTERS:
            raise ValueError(f"--filters: unknown quality filter {n!r}; registered: {sorted(_FILTERS)}")
        out.append((n, _FILTERS[n]))
    return out


def silence(clip: ClipData, min_rms_db: float = -45.0) -> str | None:
    """Drop clips with no speech: RMS below `min_rms_db` dBFS."""
    rms = float(np.sqrt(np.mean(np.square(clip.audio, dtype=np.float64)))) if clip.audio.size else 0.0
    db = 20.0 * np.log10(max(rms, 1e-12))
    return f"audio RMS {db:.1f} dBFS < {min_rms_db}" if db < min_rms_db else None


def static(clip: ClipData, min_mean_abs_diff: float = 0.25) -> str | None:
    """Drop frozen video: mean absolute frame-to-frame difference below the threshold (0-255 scale)."""
    if len(clip.frames) < 2:
        return None
    return static_verdict(float(np.mean(np.abs(np.diff(clip.frames.astype(np.int16), axis=0)))), min_mean_abs_diff)


def static_verdict(diff: float, min_mean_abs_diff: float = 0.25) -> str | None:
    """`static`'s reason for a measured mean absolute frame difference `diff` (0-255), or None."""
    return f"mean frame difference {diff:.3f} < {min_mean_abs_diff}" if diff < min_mean_abs_diff else None


def black(clip: ClipData, max_fraction: float = 0.5) -> str | None:
    """Drop clips whose frames are mostly black (fades, dead cameras)."""
    dark = float(np.mean(clip.frames.max(axis=-1) < 16))
    return f"{dark:.0%} black pixels" if dark > max_fraction else None


register_filter("silence", silence)
register_filter("static", static)
register_filter("black", black)
