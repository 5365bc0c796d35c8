"""A procedurally drawn talking head (numpy only): varied identities, blinking eyes, head sway, and a
large mouth whose opening follows a given per-frame track.

Shapes are anti-aliased ellipses composited back to front; every face feature lives in a head frame that
sways and tilts. The mouth is about half the face wide and opens up to about a third of the face high, so
lip motion stays a strong signal even at 64 x 64 pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SKIN = {
    "pale": (241, 214, 190),
    "light": (226, 185, 152),
    "olive": (198, 152, 110),
    "tan": (176, 126, 88),
    "brown": (141, 94, 62),
    "dark brown": (99, 64, 44),
}
HAIR = {
    "black": (25, 22, 24),
    "dark brown": (70, 45, 30),
    "auburn": (140, 60, 30),
    "blond": (222, 190, 110),
    "grey": (160, 160, 165),
    "red": (170, 50, 30),
    "blue-dyed": (50, 80, 190),
}
CLOTHES = {
    "red": (190, 40, 45),
    "navy": (30, 40, 100),
    "green": (40, 130, 70),
    "white": (235, 235, 235),
    "black": (30, 30, 35),
    "yellow": (225, 190, 40),
    "purple": (110, 50, 140),
    "teal": (30, 140, 140),
}
BACKGROUNDS = {
    "light blue": (150, 190, 225),
    "beige": (220, 205, 175),
    "dark grey": (70, 72, 78),
    "green": (110, 160, 110),
    "orange": (230, 150, 80),
    "lilac": (190, 170, 220),
    "white": (240, 240, 240),
}
PATTERNS = ("plain", "gradient", "striped", "two-tone")
HAIR_STYLES = ("short", "long", "bald")
FACE_SHAPES = {"round": (0.23, 0.27), "oval": (0.21, 0.30), "long": (0.19, 0.31), "wide": (0.25, 0.27)}
MOUTH_INTERIOR = (40, 8, 16)
LIPS = (170, 70, 80)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic speaker look different from another."""

    skin: str
    hair: str
    hair_style: str
    clothes: str
    background: str
    pattern: str
    face: str
    sway_hz: float
    sway_phase: float
    sway_px: float  # as a fraction of the frame width
    tilt_deg: float

    @staticmethod
    def sample(rng: np.random.Generator) -> Identity:
        pick = lambda d: str(rng.choice(list(d)))
        return Identity(
            pick(SKIN),
            pick(HAIR),
            str(rng.choice(HAIR_STYLES)),
            pick(CLOTHES),
            pick(BACKGROUNDS),
            str(rng.choice(PATTERNS)),
            pick(FACE_SHAPES),
            float(rng.uniform(0.2, 0.6)),
            float(rng.uniform(0, 2 * np.pi)),
            float(rng.uniform(0.01, 0.04)),
            float(rng.uniform(1, 5)),
        )

    def caption(self) -> str:
        """Four short sentences like Mirage's captions: appearance, bearing, background, shot."""
        hair = "a bald head" if self.hair_style == "bald" else f"{self.hair_style} {self.hair} hair"
        return (
            f"A person with {hair}, {self.skin} skin and a {self.face} face, in a {self.clothes} shirt. "
            f"They talk to the camera. {self.pattern.capitalize()} {self.background} background. "
            "Close-up, static shot."
        )


def _ellipse_alpha(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Anti-aliased coverage of an axis-aligned ellipse (approximate signed distance, one-pixel ramp)."""
    rx, ry = max(rx, 1e-3), max(ry, 1e-3)
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip(0.5 - (r - 1.0) * min(rx, ry), 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int]) -> None:
    img *= 1.0 - alpha[..., None]
    img += alpha[..., None] * np.asarray(colour, np.float32)


def _background(ident: Identity, h: int, w: int) -> np.ndarray:
    base = np.asarray(BACKGROUNDS[ident.background], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if ident.pattern == "gradient":
        img *= (0.75 + 0.45 * yy / h)[..., None]
    elif ident.pattern == "striped":
        img *= (0.85 + 0.15 * (np.floor(xx / max(w / 8, 1)) % 2))[..., None]
    elif ident.pattern == "two-tone":
        img *= np.where(xx < w * 0.62, 1.0, 0.7)[..., None]
    return np.clip(img, 0, 255)


def blink_track(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """Per-frame eye openness in [0, 1]: open, with a 4-frame blink every 1.5-4 s."""
    eyes = np.ones(num_frames, np.float32)
    t = int(rng.integers(5, 60))
    while t < num_frames:
        for i, v in enumerate((0.5, 0.05, 0.05, 0.5)):
            if t + i < num_frames:
                eyes[t + i] = v
        t += int(rng.integers(38, 100))
    return eyes


def draw_frame(
    ident: Identity,
    h: int,
    w: int,
    t: float,
    opening: float,
    eyes: float,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """One uint8 RGB frame [h, w, 3] at time `t` (s), and the mouth centre (x, y) in pixels."""
    img = (_background(ident, h, w) if background is None else background).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    s = float(min(h, w))
    fx, fy = FACE_SHAPES[ident.face]
    rx, ry = fx * s, fy * s
    sway = np.sin(2 * np.pi * ident.sway_hz * t + ident.sway_phase)
    cx = w / 2 + ident.sway_px * s * sway
    cy = 0.43 * h + 0.3 * ident.sway_px * s * np.sin(2 * np.pi * ident.sway_hz * 1.7 * t)
    ang = np.deg2rad(ident.tilt_deg * np.sin(2 * np.pi * ident.sway_hz * 0.8 * t + 1.0))
    # head frame: rotate pixel coordinates about the head centre
    u = np.cos(ang) * (xx - cx) + np.sin(ang) * (yy - cy)
    v = -np.sin(ang) * (xx - cx) + np.cos(ang) * (yy - cy)
    hair = HAIR[ident.hair]
    if ident.hair_style == "long":  # behind everything else
        _paint(img, _ellipse_alpha(u, v, 0, 0.35 * ry, 1.3 * rx, 1.25 * ry), hair)
    # body (not tilted) then neck
    _paint(
        img,
        _ellipse_alpha(xx, yy, w / 2 + 0.3 * (cx - w / 2), 1.08 * h, 0.42 * s, 0.3 * s),
        CLOTHES[ident.clothes],
    )
    skin = np.asarray(SKIN[ident.skin], np.float32)
    _paint(img, _ellipse_alpha(xx, yy, cx, cy + 0.95 * ry, 0.45 * rx, 0.5 * ry), tuple(skin * 0.9))
    if ident.hair_style != "bald":
        _paint(img, _ellipse_alpha(u, v, 0, -0.18 * ry, 1.1 * rx, 0.95 * ry), hair)
    face = _ellipse_alpha(u, v, 0, 0.05 * ry, rx, 0.95 * ry)
    if ident.hair_style != "bald":  # fringe: hair covers the top of the face
        face = face * np.clip((v + 0.55 * ry) / 1.0 + 0.5, 0, 1)
    _paint(img, face, tuple(skin))
    _paint(img, _ellipse_alpha(u, v, -1.02 * rx, 0.05 * ry, 0.14 * rx, 0.22 * ry), tuple(skin * 0.92))  # ears
    _paint(img, _ellipse_alpha(u, v, 1.02 * rx, 0.05 * ry, 0.14 * rx, 0.22 * ry), tuple(skin * 0.92))
    for side in (-1.0, 1.0):
        ex, ey = side * 0.4 * rx, -0.18 * ry
        _paint(
            img, _ellipse_alpha(u, v, ex, ey - 0.2 * ry, 0.3 * rx, 0.05 * ry), tuple(np.asarray(hair) * 0.8)
        )
        _paint(img, _ellipse_alpha(u, v, ex, ey, 0.24 * rx, 0.12 * ry * eyes), (245, 245, 245))
        if eyes > 0.3:
            _paint(img, _ellipse_alpha(u, v, ex, ey, 0.11 * rx, 0.1 * ry * eyes), (35, 30, 40))
        else:  # closed lid line
            _paint(img, _ellipse_alpha(u, v, ex, ey, 0.26 * rx, 0.03 * ry + 0.3), tuple(skin * 0.6))
    _paint(img, _ellipse_alpha(u, v, 0, 0.17 * ry, 0.11 * rx, 0.1 * ry), tuple(skin * 0.85))  # nose
    my = 0.5 * ry
    open_h = 0.03 * ry + 0.3 * ry * float(np.clip(opening, 0, 1))
    _paint(img, _ellipse_alpha(u, v, 0, my, 0.55 * rx, open_h + 0.07 * ry), LIPS)
    _paint(img, _ellipse_alpha(u, v, 0, my, 0.46 * rx, open_h), MOUTH_INTERIOR)
    mx = cx - np.sin(ang) * my
    my_px = cy + np.cos(ang) * my
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), (float(mx), float(my_px))


def render(
    ident: Identity, mouth: np.ndarray, eyes: np.ndarray, h: int, w: int, fps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [N, h, w, 3] for the mouth/eye tracks, and the mouth centres [N, 2] (x, y) in pixels."""
    bg = _background(ident, h, w)
    frames, centres = [], []
    for i in range(len(mouth)):
        f, c = draw_frame(ident, h, w, i / fps, float(mouth[i]), float(eyes[i]), bg)
        frames.append(f)
        centres.append(c)
    return np.stack(frames), np.asarray(centres, np.float32)
