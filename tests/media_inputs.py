"""Small PyAV-written test sources of every kind prepare meets in real footage (tests only)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

LEVEL0, STEP = 16, 3  # frame i of a coded clip is grey LEVEL0 + STEP * i (decodes back within +-1)


def coded_frames(n: int, w: int = 16, h: int = 16) -> np.ndarray:
    """n grey frames whose level encodes their index (see frame_index)."""
    levels = LEVEL0 + STEP * (np.arange(n) % ((255 - LEVEL0) // STEP))
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).astype(np.uint8)


def frame_index(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - LEVEL0) / STEP))


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5, start: float = 0.0) -> np.ndarray:
    """A sine of `freq` Hz that starts `start` s in (silence before), float32 [samples]."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.where(t >= start, amp * np.sin(2 * np.pi * freq * t), 0.0).astype(np.float32)


def write(
    path: str,
    frames: np.ndarray,
    *,
    rate: Fraction | int = 25,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    rotation: int | None = None,
    display_matrix: list[int] | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    layout: str = "mono",
    audio_codec: str = "aac",
    audio_start: float = 0.0,
    extra_video: np.ndarray | None = None,
    default_video: int = 0,
    extra_audio: np.ndarray | None = None,
    fmt: str | None = None,
    container_options: dict[str, str] | None = None,
) -> str:
    """Write `frames` (uint8 [N, H, W, 3]) and optional audio ([samples] or [channels, samples]).

    `pts` in `time_base` units give a variable frame rate; `extra_video`/`extra_audio` add a second stream of
    each kind (`default_video` picks which video stream carries the default disposition); `container_options`
    go to the muxer (e.g. {"movflags": "faststart"}: the mp4 index before the media).
    """
    opts = {"qp": "0", "threads": "1", **(options or {})} if codec == "libx264" else dict(options or {})
    with av.open(path, "w", format=fmt, options=container_options or {}) as c:
        vids = []
        for k, fr in enumerate([frames] if extra_video is None else [frames, extra_video]):
            vs = c.add_stream(codec, rate=rate, options=opts)
            vs.height, vs.width = fr.shape[1:3]
            vs.pix_fmt = pix_fmt
            if time_base is not None:
                vs.codec_context.time_base = vs.time_base = time_base
            if rotation is not None:
                vs.set_display_rotation(rotation)
            if display_matrix is not None:  # FFmpeg's 9 int32 (libavutil/display.h), as the container stores it
                vs.set_display_matrix(display_matrix)
            if extra_video is not None:
                vs.disposition = av.stream.Disposition.default if k == default_video else av.stream.Disposition(0)
            vids.append((vs, fr))
        auds = []
        for a in [] if audio is None else [audio] if extra_audio is None else [audio, extra_audio]:
            aus = c.add_stream(audio_codec, rate=audio_rate, layout=layout)
            auds.append((aus, np.atleast_2d(np.asarray(a, np.float32))))
        for vs, fr in vids:
            for i in range(len(fr)):
                f = av.VideoFrame.from_ndarray(np.ascontiguousarray(fr[i]), format="rgb24")
                if pix_fmt != "yuv420p":
                    f = f.reformat(format=pix_fmt)
                f.pts = i if pts is None else pts[i]
                if time_base is not None:
                    f.time_base = time_base
                c.mux(vs.encode(f))
            c.mux(vs.encode())
        for aus, a in auds:
            step = aus.codec_context.frame_size or 1024
            fmt_name = aus.codec_context.format.name  # e.g. fltp (aac), s16 (opus)
            first = int(round(audio_start * audio_rate))
            for s in range(0, a.shape[1], step):
                chunk = a[:, s : s + step]
                if chunk.shape[1] < step and aus.codec_context.frame_size:
                    chunk = np.pad(chunk, ((0, 0), (0, step - chunk.shape[1])))
                if fmt_name.startswith("s16"):
                    x = (np.clip(chunk, -1, 1) * 32767).astype(np.int16)
                    x = x if fmt_name.endswith("p") else x.T.reshape(1, -1)
                else:
                    x = chunk if fmt_name.endswith("p") else chunk.T.reshape(1, -1)
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format=fmt_name, layout=layout)
                fr.sample_rate, fr.pts = audio_rate, first + s
                c.mux(aus.encode(fr))
            c.mux(aus.encode())
    return path
