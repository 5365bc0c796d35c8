"""Footage for the curation tests, built from real photographs in scikit-image's wheel (astronaut.png: a frontal
portrait; brick, gravel, grass: textures for backgrounds and b-roll), animated and written with PyAV. Every
decision curation should make is known by construction: where the cuts are, where the face is, how many."""

from __future__ import annotations

import os

import numpy as np

W, H = 320, 180  # source frame size
PATCH = 144  # the astronaut's head patch, pasted at this size
# the face in astronaut.png (OpenCV's Haar box, 512 x 512 image): x 176..272, y 65..161; the patch is rows 0..256,
# columns 96..352 of it, scaled to PATCH: so the face centre inside a patch is at:
FACE_CX = (224 - 96) * PATCH / 256
FACE_CY = 113 * PATCH / 256
FACE_SIDE = 96 * PATCH / 256

CUTS = (60, 75)  # cut.mp4: shots [0, 60), [60, 75) (b-roll, 0.6 s: shorter than a 1 s clip), [75, 125)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1) if gray.ndim == 2 else gray[..., :3]


def images() -> dict[str, np.ndarray]:
    import cv2
    from skimage import data

    head = cv2.resize(data.astronaut()[0:256, 96:352], (PATCH, PATCH), interpolation=cv2.INTER_AREA)
    tint = {"brick": (1.0, 0.75, 0.55), "grass": (0.55, 1.0, 0.45), "gravel": (0.6, 0.7, 1.0)}  # colour footage
    bg = {n: (cv2.resize(_rgb(getattr(data, n)()), (2 * W, H), interpolation=cv2.INTER_AREA) * np.array(c))
          .astype(np.uint8) for n, c in tint.items()}
    return {"head": head, "mirror": np.ascontiguousarray(head[:, ::-1]), **bg}


def paste(bg: np.ndarray, patch: np.ndarray, x: int, y: int) -> np.ndarray:
    out = bg.copy()
    out[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
    return out


def speaker_x(k: int) -> int:
    """speaker.mp4: the patch's left edge at frame k (1 px per frame)."""
    return 40 + k


def build(folder: str) -> dict[str, str]:
    """Write the sources; returns {name: path}. Faces move a pixel a frame (a talking head is never frozen)."""
    from data_pipeline.ingest import media
    from tests import media_inputs

    im = images()
    head, mirror = im["head"], im["mirror"]
    brick, gravel, grass = (im[n][:, :W] for n in ("brick", "gravel", "grass"))
    y0 = 20
    rng = np.random.default_rng(0)

    def noise(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n * media.HOP)).astype(np.float32)

    clips = {
        # one speaker moving slowly across a still background: 3 clips kept, the crop follows the face
        "speaker": [paste(brick, head, speaker_x(k), y0) for k in range(75)],
        # a hard cut at 60, a 15-frame b-roll shot, a second shot of the speaker elsewhere from 75
        "cut": [paste(brick, head, 40 + k, y0) if k < CUTS[0] else gravel.copy() if k < CUTS[1]
                else paste(grass, head, 100 + k - CUTS[1], y0) for k in range(125)],
        # two faces side by side
        "twoshot": [paste(paste(brick, head, 20 + k, y0), mirror, 176 - k, y0) for k in range(25)],
        # no face: a texture drifting
        "broll": [np.ascontiguousarray(im["gravel"][:, 2 * k:2 * k + W]) for k in range(50)],
        # the face leaves the frame: fully inside for frames 0..12 only (4 px a frame)
        "leaves": [paste(np.pad(brick, ((0, 0), (0, 200), (0, 0))), head, 170 + 4 * k, y0)[:, :W]
                   for k in range(25)],
        # the camera pans 2 px a frame over the speaker and the wall (0.156 frame widths a second)
        "pan": [np.ascontiguousarray(paste(im["brick"], head, 150 + k // 5, y0)[:, 2 * k:2 * k + W])
                for k in range(25)],
    }
    out = {}
    for name, frames in clips.items():
        p = os.path.join(folder, f"{name}.mp4")
        media.write_mp4(p, np.stack(frames), noise(len(frames)))
        out[name] = p
    # a speaker without an audio stream: the sync stage cannot score it (the source is named, kept out)
    out["mute"] = media_inputs.write(os.path.join(folder, "mute.mp4"), np.stack(clips["speaker"][:25]))
    return out


def talking_heads(folder: str, sources: int, seconds: float) -> list[str]:
    """`sources` single-speaker sources of `seconds` each, for timing curation (bench.curation): the astronaut's
    head drifting 1 px a frame back and forth over a tinted texture, noise for audio; every other source cuts
    half-way to another background with the speaker elsewhere. Curation keeps their clips (one face, no pan,
    shots of whole clips), so the curated run also ingests them. Returns the paths."""
    from data_pipeline.ingest import media

    im = images()
    bgs = [im[n][:, :W] for n in ("brick", "grass", "gravel")]
    rng = np.random.default_rng(0)
    n = round(seconds * media.FPS)
    paths = []
    for i in range(sources):
        frames = []
        for k in range(n):
            cut = i % 2 == 1 and k >= n // 2
            x = 40 + abs((k + 13 * i) % 120 - 60) + (60 if cut else 0)  # a triangle wave, 1 px a frame
            frames.append(paste(bgs[(i + cut) % 3], im["head"], x, 20))
        p = os.path.join(folder, f"speaker_{i:03d}.mp4")
        media.write_mp4(p, np.stack(frames), (0.1 * rng.standard_normal(n * media.HOP)).astype(np.float32))
        paths.append(p)
    return paths


def astronaut_whole(path: str, frames: int = 25) -> str:
    """The whole astronaut.png (one person: her face, her suit with its patches, the flag) at 390 x 390, drifting
    right half a pixel a frame in a 430 x 390 frame. At this scale OpenCV's Haar cascade also finds a "face" on
    her suit in most frames (a false second face, measured: faces.detect_scored), so the one-speaker truth of
    this clip tests that curation does not take it for a second person."""
    import cv2
    from skimage import data

    from data_pipeline.ingest import media

    im = cv2.resize(data.astronaut(), (390, 390), interpolation=cv2.INTER_AREA)
    out = []
    for k in range(frames):
        f = np.full((390, 430, 3), 90, np.uint8)
        f[:, 4 + k // 2:4 + k // 2 + 390] = im
        out.append(f)
    rng = np.random.default_rng(1)
    media.write_mp4(path, np.stack(out), (0.1 * rng.standard_normal(frames * media.HOP)).astype(np.float32))
    return path
