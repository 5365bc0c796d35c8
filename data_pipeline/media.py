"""Audio/video I/O with PyAV: write H.264 + AAC mp4s, and decode any container to 25 fps RGB frames plus
16 kHz mono audio on one shared clock.

Decoding resamples by time, not by frame count: output frame k (time k / 25 s after the first video
frame) is the source frame on screen at that time, so 30 fps or variable-frame-rate sources come out at
25 fps with the audio still in sync. Audio sample 0 is aligned to that same first video frame.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
from etils import epath

FPS = 25
SAMPLE_RATE = 16000
HOP = SAMPLE_RATE // FPS  # audio samples per video frame


def write_mp4(path: str | epath.Path, frames: np.ndarray, audio: np.ndarray, *, crf: int = 18) -> None:
    """Write uint8 RGB frames [N, H, W, 3] at 25 fps and float mono audio [M] at 16 kHz as H.264 + AAC.

    Byte-reproducible for the same inputs (bitexact muxing, single-threaded x264).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"write_mp4({path}): frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_mp4({path}): H.264 yuv420p needs even sizes, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"fflags": "+bitexact"}) as c:
        vs = c.add_stream("libx264", rate=FPS, options={"crf": str(crf), "preset": "medium", "threads": "1"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = c.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode())
        a = np.asarray(audio, np.float32)
        step = 1024
        for s in range(0, len(a), step):
            fr = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(a[None, s : s + step]), format="fltp", layout="mono"
            )
            fr.sample_rate, fr.pts = SAMPLE_RATE, s
            c.mux(aus.encode(fr))
        c.mux(aus.encode())
    epath.Path(path).write_bytes(buf.getvalue())


@dataclasses.dataclass
class VideoInfo:
    """What a packet scan (no decoding) tells about a source: its frame times and the 25 fps frame count."""

    path: str
    width: int
    height: int
    src_times: np.ndarray  # presentation times (s) of the source frames, sorted, relative to the first frame
    t0: float  # absolute time (s) of the first video frame
    num_frames: int  # frames at 25 fps
    has_audio: bool

    def source_index(self) -> np.ndarray:
        """For each 25 fps output frame k, the index of the source frame on screen at k / 25 s."""
        t = np.arange(self.num_frames) / FPS + 1e-6
        return np.clip(np.searchsorted(self.src_times, t, side="right") - 1, 0, len(self.src_times) - 1)


def _open(path: str) -> Any:
    if "://" in path:  # gs:// and friends through etils.epath
        return av.open(epath.Path(path).open("rb"))
    return av.open(path)


def probe(path: str) -> VideoInfo:
    """Scan the video packets of `path` for frame times (cheap: demux only, no decode)."""
    try:
        with _open(path) as c:
            if not c.streams.video:
                raise ValueError(f"{path}: no video stream")
            vs = c.streams.video[0]
            tb = float(vs.time_base)
            pts = sorted(p.pts for p in c.demux(vs) if p.pts is not None and p.size > 0)
            if not pts:
                raise ValueError(f"{path}: the video stream has no frames")
            times = np.asarray(pts, np.float64) * tb
            rate = (
                float(vs.average_rate)
                if vs.average_rate
                else (len(times) - 1) / max(times[-1] - times[0], 1e-9)
            )
            duration = times[-1] - times[0] + 1.0 / max(rate, 1e-9)
            n = int(np.floor(duration * FPS + 1e-6))
            return VideoInfo(
                path,
                vs.codec_context.width,
                vs.codec_context.height,
                times - times[0],
                float(times[0]),
                n,
                bool(c.streams.audio),
            )
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: PyAV cannot read it ({e}); is it a video file?") from e


def iter_frames(info: VideoInfo, size: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (k, uint8 RGB [H, W, 3]) for every 25 fps output frame k, resized to `size` = (W, H) if given."""
    src_of = info.source_index()
    k = 0
    with _open(info.path) as c:
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        for j, frame in enumerate(c.decode(vs)):
            if k >= info.num_frames:
                break
            if src_of[k] > j:
                continue
            kw = {"format": "rgb24"}
            if size is not None:
                kw.update(width=size[0], height=size[1], interpolation="AREA")
            rgb = frame.to_ndarray(**kw)
            while k < info.num_frames and src_of[k] <= j:
                yield k, rgb
                k += 1
    while 0 < k < info.num_frames:  # the decoder gave fewer frames than the scan: hold the last one
        yield k, rgb
        k += 1


def decode_audio_native(path: str, t0: float) -> tuple[np.ndarray, int, float]:
    """All audio of `path` as float32 [samples, channels] at its own rate, and its start time minus `t0`."""
    with _open(path) as c:
        if not c.streams.audio:
            return np.zeros((0, 1), np.float32), SAMPLE_RATE, 0.0
        s = c.streams.audio[0]
        chunks, start = [], None
        for frame in c.decode(s):
            if start is None:
                start = float(frame.time) if frame.time is not None else 0.0
            x = frame.to_ndarray()
            if frame.format.is_planar:
                x = x.T
            else:
                x = x.reshape(-1, len(frame.layout.channels))
            chunks.append(
                x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.float32) / np.iinfo(x.dtype).max
            )
        rate = s.codec_context.sample_rate
        audio = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
        return audio, rate, (start or 0.0) - t0


def decode_audio_16k(path: str, t0: float) -> tuple[np.ndarray, float]:
    """All audio of `path` as mono float32 at 16 kHz (FFmpeg's resampler), and its start time minus `t0`."""
    with _open(path) as c:
        if not c.streams.audio:
            return np.zeros((0,), np.float32), 0.0
        s = c.streams.audio[0]
        rs = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks, start = [], None
        for frame in c.decode(s):
            if start is None:
                start = float(frame.time) if frame.time is not None else 0.0
            for out in rs.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in rs.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0,), np.float32)
        return audio, (start or 0.0) - t0


def align_audio(audio: np.ndarray, offset_s: float, num_frames: int) -> np.ndarray:
    """Place 16 kHz audio that starts `offset_s` after video frame 0 on the video clock [frames*HOP]."""
    shift = int(round(offset_s * SAMPLE_RATE))
    if shift > 0:
        audio = np.concatenate([np.zeros(shift, np.float32), audio])
    elif shift < 0:
        audio = audio[-shift:]
    n = num_frames * HOP
    if len(audio) < n:
        audio = np.pad(audio, (0, n - len(audio)))
    return np.ascontiguousarray(audio[:n], dtype=np.float32)
