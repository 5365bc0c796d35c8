"""Audio/video I/O with PyAV: write H.264 + AAC mp4s, and decode any container to 25 fps RGB frames plus
16 kHz mono audio on one shared clock.

Decoding resamples by time, not by frame count: output frame k (time k / 25 s after the first video
frame) is the source frame on screen at that time, so 30 fps or variable-frame-rate sources come out at
25 fps with the audio still in sync. Audio sample 0 is aligned to that same first video frame.
Frames come out at display orientation (the container's display matrix applied), optionally fitted to a
training size by a data_pipeline.ingest.geometry Geometry; of several streams, the default one is used.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import av
import numpy as np
from etils import epath

from data_pipeline.ingest import per_worker
from mirage_base.storage import is_remote

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
    """What a packet scan (plus one decoded frame) tells about a source.

    `width` x `height` is the DISPLAY size: the stored size turned by the container's display matrix
    (`rotation`, degrees counter-clockwise: a phone's portrait clip stored 64x48 with rotation 270 (-90) is
    48x64). `mirror`: the matrix also mirrors (negative determinant, front cameras): the frame is turned by
    `rotation`, then flipped left-right (display_transform).
    """

    path: str
    width: int
    height: int
    src_times: np.ndarray  # presentation times (s) of the source frames, sorted, relative to the first frame
    t0: float  # absolute time (s) of the first video frame
    num_frames: int  # frames at 25 fps
    has_audio: bool
    rotation: int = 0  # display rotation, counter-clockwise degrees (a multiple of 90)
    mirror: bool = False  # after the rotation, flip left-right (a display matrix with a negative determinant)
    pts: np.ndarray | None = None  # sorted pts of the source frames (stream time base), for seeking
    video_index: int = 0  # container stream index of the video stream used
    audio_index: int | None = None  # ... and of the audio stream used (None: no audio)
    pix_fmt: str = ""
    notes: tuple[str, ...] = ()  # what was chosen or assumed about this source (goes to prepare's summary)

    def source_index(self) -> np.ndarray:
        """For each 25 fps output frame k, the index of the source frame on screen at k / 25 s."""
        t = np.arange(self.num_frames) / FPS + 1e-6
        return np.clip(np.searchsorted(self.src_times, t, side="right") - 1, 0, len(self.src_times) - 1)


def _open(path: str) -> Any:
    if is_remote(path):  # gs:// and friends through etils.epath
        return av.open(epath.Path(path).open("rb"))
    return av.open(path)


def pick_stream(streams: Sequence[Any], kind: str) -> tuple[Any, str | None]:
    """The stream to use among a container's `kind` streams: the first with the default disposition,
    else the first; and a note saying which when there is a choice (None when there is one stream)."""
    if not streams:
        return None, None
    default = [s for s in streams if s.disposition & av.stream.Disposition.default]
    s = (default or list(streams))[0]
    if len(streams) == 1:
        return s, None
    why = "the default stream" if default else "no stream is marked default: the first"
    return s, f"{len(streams)} {kind} streams: using stream #{s.index} ({why})"


@dataclasses.dataclass(frozen=True)
class Header:
    """A source's video header from its first decoded frame: display size, rotation, mirror, pixel format."""

    width: int
    height: int
    rotation: int
    mirror: bool
    pix_fmt: str
    interlaced: bool
    hdr: bool
    video_index: int
    audio_index: int | None
    notes: tuple[str, ...]


_HDR_TRC = (16, 18)  # AVCOL_TRC_SMPTE2084 (PQ), AVCOL_TRC_ARIB_STD_B67 (HLG)


def header(path: str) -> Header:
    """Open `path` and decode its first video frame (cheap). ValueError naming the file if unreadable."""
    try:
        with _open(path) as c:
            vs, aus, notes = _streams(path, c)
            return _header(path, vs, aus, notes, next(iter(c.decode(vs)), None))
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: PyAV cannot read it ({e}); is it a video file?") from e


def _streams(path: str, c: Any) -> tuple[Any, Any, list[str]]:
    vs, vnote = pick_stream(c.streams.video, "video")
    if vs is None:
        raise ValueError(f"{path}: no video stream")
    aus, anote = pick_stream(c.streams.audio, "audio")
    return vs, aus, [n for n in (vnote, anote) if n]


def _header(path: str, vs: Any, aus: Any, notes: list[str], frame: Any) -> Header:
    if frame is None:
        raise ValueError(f"{path}: the video stream has no frames")
    rot, mirror = display_transform(path, display_matrix(frame))
    w, h = (frame.height, frame.width) if rot % 180 else (frame.width, frame.height)
    if rot or mirror:
        did = " then ".join(([f"turned {rot} degrees counter-clockwise"] if rot else [])
                            + (["mirrored left-right"] if mirror else []))
        notes.append(f"display matrix: {did}: stored {frame.width}x{frame.height}, shown {w}x{h}")
    hdr = int(frame.color_trc) in _HDR_TRC
    if hdr:
        notes.append(
            f"HDR ({frame.format.name}, transfer characteristic {int(frame.color_trc)}): converted to "
            "8-bit RGB without tone mapping"
        )
    if frame.interlaced_frame:
        notes.append(
            "interlaced: each frame keeps its top field, the other lines interpolated (half the vertical "
            "detail; for full detail deinterlace first, e.g. ffmpeg -vf bwdif)"
        )
    if aus is None:
        notes.append("no audio stream: its audio is silence")
    return Header(
        w, h, rot, mirror, frame.format.name, bool(frame.interlaced_frame), hdr, vs.index,
        None if aus is None else aus.index, tuple(notes),
    )


def display_matrix(frame: Any) -> np.ndarray | None:
    """The frame's FFmpeg DISPLAYMATRIX side data as int32 [3, 3] (16.16 fixed point, last column 2.30), or
    None when it has none (the decoder copies the container's matrix, e.g. an mp4 track's, onto each frame)."""
    try:
        sd = frame.side_data[av.sidedata.sidedata.Type.DISPLAYMATRIX]
    except KeyError:
        return None
    return np.frombuffer(bytes(sd), np.int32).reshape(3, 3).copy()


def display_transform(path: str, matrix: np.ndarray | None) -> tuple[int, bool]:
    """(rotation, mirror) showing a stored frame as a player does: turn it `rotation` degrees counter-clockwise
    (0, 90, 180 or 270), then, if `mirror`, flip it left-right. ValueError naming `path` for other angles.

    FFmpeg's display matrix M (libavutil/display.h) maps a stored point (x, y) to (x, y, 1) M, so its 2x2 part
    is R F: a rotation R then, when det M < 0, the left-right flip F = diag(-1, 1) (av_display_matrix_flip negates
    column 0). R = M F is av_display_matrix_flip(M, 1, 0), and its counter-clockwise angle is
    av_display_rotation_get(R) = -atan2(R[0,1], R[0,0]) (each column normalized). This is what ffmpeg's
    autorotate shows (fftools/ffmpeg_filter.c, theta = -av_display_rotation_get(M) mod 360: for 90,
    `transpose=cclock_flip` when M[1,0] > 0, else `clock`; for 270, `clock_flip` when M[1,0] < 0, else `cclock`;
    for 180, `hflip` when M[0,0] < 0, then `vflip` when M[1,1] < 0; for 0, `vflip` when M[1,1] < 0).
    PyAV's `VideoFrame.rotation` reads only the angle of M itself: a plain mirror reads as -180.
    """
    if matrix is None:
        return 0, False
    m = np.asarray(matrix, np.float64)[:2, :2] / 65536.0
    mirror = bool(np.linalg.det(m) < 0)
    if mirror:
        m[:, 0] = -m[:, 0]
    s0, s1 = np.hypot(m[0, 0], m[1, 0]), np.hypot(m[0, 1], m[1, 1])
    if s0 == 0 or s1 == 0:
        raise ValueError(f"{path}: its display matrix {np.asarray(matrix).ravel().tolist()} is degenerate")
    angle = -np.degrees(np.arctan2(m[0, 1] / s1, m[0, 0] / s0))
    rot = int(round(angle / 90.0)) * 90 % 360
    if abs((angle - rot + 180) % 360 - 180) > 1:
        raise ValueError(f"{path}: display rotation {angle:g} degrees is not a multiple of 90")
    return rot, mirror


def probe(path: str) -> VideoInfo:
    """Header (first frame) + the video packets' times, in one pass over the file (demux; only packets
    up to the first frame are decoded). Discarded packets, e.g. before an mp4 edit list's start, are not
    frames. ValueError naming the file if it is unreadable."""
    try:
        with _open(path) as c:
            vs, aus, notes = _streams(path, c)
            first, pts_list, read = None, [], 0
            for p in c.demux(vs):
                if first is None:
                    first = next(iter(p.decode()), None)
                read += p.size > 0
                if p.pts is not None and p.size > 0 and not p.is_discard:
                    pts_list.append(p.pts)
            if first is None:  # frames held back by the decoder
                first = next(iter(vs.decode(None)), None)
            hd = _header(path, vs, aus, notes, first)
            pts = np.asarray(sorted(pts_list), np.int64)
            if not len(pts):
                raise ValueError(f"{path}: the video stream has no frames")
            tb = float(vs.time_base)
            times = pts.astype(np.float64) * tb
            rate = (
                float(vs.average_rate)
                if vs.average_rate
                else (len(times) - 1) / max(times[-1] - times[0], 1e-9)
            )
            duration = times[-1] - times[0] + 1.0 / max(rate, 1e-9)
            n = int(np.floor(duration * FPS + 1e-6))
            notes = list(hd.notes)
            if times[0] < 0:
                notes.append(f"timestamps start at {times[0]:.3f} s: the clock starts at the first video frame")
            if vs.frames and read < vs.frames:  # e.g. a copy cut short with its index (mp4 faststart) up front
                notes.append(f"the file ends early: its index lists {vs.frames} video frames, {read} could be read "
                             f"({duration:.2f} s used); a truncated copy? fetch it again")
            return VideoInfo(
                path, hd.width, hd.height, times - times[0], float(times[0]), n, hd.audio_index is not None,
                hd.rotation, hd.mirror, pts, hd.video_index, hd.audio_index, hd.pix_fmt, tuple(notes),
            )
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: PyAV cannot read it ({e}); is it a video file?") from e


def _video_stream(c: Any, info: VideoInfo) -> Any:
    return next(s for s in c.streams.video if s.index == info.video_index)


FrameFn = Callable[[Any], np.ndarray]


def frame_converter(info: VideoInfo, geometry: Any = None) -> FrameFn:
    """av.VideoFrame -> uint8 RGB [H, W, 3] at display orientation; `geometry` (data_pipeline.ingest.geometry
    Geometry or None) scales the stored frame then crops the turned one."""
    k, mirror = info.rotation // 90, info.mirror

    def convert(frame: Any) -> np.ndarray:
        kw: dict[str, Any] = {"format": "rgb24"}
        if geometry is not None and geometry.scale is not None:
            kw.update(width=geometry.scale[0], height=geometry.scale[1], interpolation="AREA")
        if frame.interlaced_frame:  # one field per frame, before any scaling mixes the lines
            frame = av.VideoFrame.from_ndarray(keep_top_field(frame.to_ndarray(format="rgb24")), format="rgb24")
        rgb = frame.to_ndarray(**kw)
        if k:
            rgb = np.rot90(rgb, k)
        if mirror:
            rgb = rgb[:, ::-1]
        if k or mirror:
            rgb = np.ascontiguousarray(rgb)
        if geometry is not None and geometry.crop is not None:
            x, y, w, h = geometry.crop
            rgb = np.ascontiguousarray(rgb[y : y + h, x : x + w])
        return rgb

    return convert


def keep_top_field(rgb: np.ndarray) -> np.ndarray:
    """Deinterlace uint8 [H, W, C] within the frame: even lines kept, each odd line the mean of its
    neighbours (the last one a copy). Per frame, so seeking gives the same pixels as streaming."""
    out = rgb.copy()
    inner = rgb[0:-2:2].astype(np.uint16) + rgb[2::2]
    out[1 : 1 + 2 * len(inner) : 2] = ((inner + 1) // 2).astype(np.uint8)
    if rgb.shape[0] % 2 == 0:
        out[-1] = rgb[-2]
    return out


def _frame_index(info: VideoInfo, frame: Any, j: int) -> int:
    if frame.pts is None or info.pts is None:
        return j
    return int(min(np.searchsorted(info.pts, frame.pts), len(info.pts) - 1))


def iter_frames(info: VideoInfo, geometry: Any = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (k, uint8 RGB [H, W, 3]) for every 25 fps output frame k (display orientation, `geometry`
    applied: see frame_converter). Holds one decoded frame at a time."""
    src_of = info.source_index()
    convert = frame_converter(info, geometry)
    k, j = 0, -1
    with _open(info.path) as c:
        vs = _video_stream(c, info)
        vs.thread_type = "AUTO"
        if per_worker.thread_budget():  # a worker process's share of the host (per_worker.set_thread_budget)
            vs.codec_context.thread_count = per_worker.thread_budget()
        for frame in c.decode(vs):
            if k >= info.num_frames:
                break
            j = _frame_index(info, frame, j + 1)
            if src_of[k] > j:
                continue
            rgb = convert(frame)
            while k < info.num_frames and src_of[k] <= j:
                yield k, rgb
                k += 1
    while 0 < k < info.num_frames:  # the decoder gave fewer frames than the scan: hold the last one
        yield k, rgb
        k += 1


class FrameSeeker:
    """Random access to output frames: `get(k)` seeks to the keyframe before the source frame of output
    frame k and decodes up to it (or decodes forward when k is a little ahead of the last fetch). Gives the
    same pixels as iter_frames. Holds one decoded frame; `close()` when done."""

    FORWARD = 64  # source frames: decode forward rather than seek when the target is this close ahead

    def __init__(self, info: VideoInfo, geometry: Any = None):
        self.info, self.src_of = info, info.source_index()
        self.convert = frame_converter(info, geometry)
        self.c: Any = None
        self.frames: Iterator[Any] | None = None
        self.last = -1  # source index of the last decoded frame
        self.seeks = 0

    def get(self, k: int) -> np.ndarray:
        assert self.info.pts is not None
        j = int(self.src_of[k])
        target = int(self.info.pts[j])
        if self.c is None:
            self.c = _open(self.info.path)
        vs = _video_stream(self.c, self.info)
        if self.frames is None or not (self.last < j <= self.last + self.FORWARD):
            self.c.seek(target, stream=vs, backward=True, any_frame=False)
            self.frames, self.last = iter(self.c.decode(vs)), -1
            self.seeks += 1
        for frame in self.frames:
            if frame.pts is None:
                continue
            self.last = _frame_index(self.info, frame, self.last + 1)
            if frame.pts >= target:
                return self.convert(frame)
        raise RuntimeError(
            f"{self.info.path}: seeking to frame {k} (pts {target}) ran past the end; the file may be damaged"
        )

    def close(self) -> None:
        if self.c is not None:
            self.c.close()
            self.c = self.frames = None


def decode_audio_native(path: str, t0: float) -> tuple[np.ndarray, int, float]:
    """All audio of `path` as float32 [samples, channels] at its own rate, and its start time minus `t0`."""
    with _open(path) as c:
        s, _ = pick_stream(c.streams.audio, "audio")
        if s is None:
            return np.zeros((0, 1), np.float32), SAMPLE_RATE, 0.0
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
        s, _ = pick_stream(c.streams.audio, "audio")
        if s is None:
            return np.zeros((0,), np.float32), 0.0
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


def align_audio(audio: np.ndarray, offset_s: float, num_frames: int, *, pad: bool = True) -> np.ndarray:
    """Place 16 kHz audio that starts `offset_s` after video frame 0 on the video clock [frames*HOP]. `pad=False`:
    not padded at the end, so as long as the real audio lasts on that clock (at most frames*HOP samples)."""
    shift = int(round(offset_s * SAMPLE_RATE))
    if shift > 0:
        audio = np.concatenate([np.zeros(shift, np.float32), audio])
    elif shift < 0:
        audio = audio[-shift:]
    n = num_frames * HOP
    if pad and len(audio) < n:
        audio = np.pad(audio, (0, n - len(audio)))
    return np.ascontiguousarray(audio[:n], dtype=np.float32)
