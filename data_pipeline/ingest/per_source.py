"""One source file -> encoded clip records: decode (PyAV), cut, filter, encode, serialize.

This is the per-element work of the Beam pipeline in `prepare`, kept free of Beam so it can be tested
and reused directly. Frames are streamed in one forward decode; a frame is held only while a clip still
needs it (its own frames, or a reference frame drawn from elsewhere in the source). Held frames are capped
by a byte budget: past it, waiting clips get their reference frame by seeking (media.FrameSeeker) and
reference frames kept for later clips are dropped and fetched again the same way, so memory does not
grow with the source's duration and the records are the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from data_pipeline import encoders
from data_pipeline.dataset import records
from data_pipeline.ingest import clips, filters, geometry, media, sources
from data_pipeline.ingest.isolation import StageError, stage
from mirage_base import storage

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Everything that decides the bytes of the records (and so goes into the manifest)."""

    clip_seconds: float = 2.0
    min_seconds: float | None = None  # None: clip_seconds (tails shorter than a clip are dropped)
    size: tuple[int, int] | None = None  # (W, H) training size (scale to cover + crop); None: the source's
    crop: str = "center"  # crop policy (data_pipeline.ingest.geometry) when scaling to `size`
    video_encoder: str = "s2d"
    video_params: tuple[tuple[str, Any], ...] = ()
    audio_encoder: str = "logmel"
    audio_params: tuple[tuple[str, Any], ...] = ()
    text_encoder: str = "hash"
    text_params: tuple[tuple[str, Any], ...] = ()
    filters: tuple[str, ...] = ()
    audio_backend: str = "pyav"
    seed: int = 0

    @property
    def clip_frames(self) -> int:
        return int(round(self.clip_seconds * media.FPS))

    @property
    def min_frames(self) -> int:
        return int(round((self.clip_seconds if self.min_seconds is None else self.min_seconds) * media.FPS))

    def build_encoders(self) -> tuple[Any, Any, Any]:
        return (
            encoders.get_video_encoder(self.video_encoder, **dict(self.video_params)),
            encoders.get_audio_encoder(self.audio_encoder, **dict(self.audio_params)),
            encoders.get_text_encoder(self.text_encoder, **dict(self.text_params)),
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("video_params", "audio_params", "text_params"):
            d[k] = dict(d[k])
        d["size"] = None if self.size is None else list(self.size)
        d["filters"] = list(self.filters)
        return d


def _glob(pattern: str) -> list[str]:
    """The files matching `pattern` (local or gs://) by fsspec's glob: `*`, `?` and `[...]` within one path
    component, `**` any number of directories (epath refuses `**`; gcsfs lists the prefix in one paginated call).
    Matches with a hidden component below the pattern's fixed prefix (`.cache/`, `._clip.mp4`) are skipped, as in
    the directory walk; symlinks to files are matched, symlinked directories are not followed (give the directory
    itself to follow them), and a matched directory is not entered (`DIR/*` lists DIR's files only)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern)
    first_wildcard = min(i for i in (path.find(ch) for ch in "*?[") if i >= 0)
    fixed = path[:first_wildcard].rpartition("/")[0]  # the directory every match is under
    remote, out = storage.is_remote(pattern), []
    for p, info in fs.glob(path, detail=True).items():
        is_file = info.get("type") == "file" or (not remote and os.path.isfile(p))  # a symlink to a file: a link
        if not is_file or any(c.startswith(".") for c in p[len(fixed):].split("/")):
            continue
        if remote:
            out.append(fs.unstrip_protocol(p))
        else:  # as the user wrote it: a relative pattern gives relative paths
            out.append(p if os.path.isabs(pattern) else os.path.relpath(p))
    return out


def _distinct(files: list[str]) -> list[str]:
    """`files` less the local ones that are the same file as an earlier one (a symlink to it, or a path through a
    symlinked directory): each would be prepared again under another clip id, twice the same footage."""
    seen: dict[str, str] = {}
    out = []
    for f in files:
        key = f if storage.is_remote(f) else os.path.realpath(f)
        if key in seen:
            log.warning("skipping source %s: the same file as %s (a symlink)", f, seen[key])
            continue
        seen[key] = f
        out.append(f)
    return out


def list_sources(pattern_or_dir: str) -> list[str]:
    """Video files under a directory (recursively) or matching a glob (`_glob`: `**` for any depth), sorted. The
    walk skips hidden entries (names starting with '.', e.g. macOS's `._clip.mp4` resource forks) and enters each
    directory once (a symlink back to an ancestor, `sub/loop -> ..`, is not followed again: it raised ELOOP).

    Raises FileNotFoundError (naming --input) when nothing is found."""
    p = epath.Path(pattern_or_dir)
    if p.is_dir():
        found, todo, entered = [], [p], set()
        while todo:  # recursive walk (epath's rglob refuses on GCS)
            d = todo.pop()
            key = os.fspath(d) if storage.is_remote(d) else os.path.realpath(d)
            if key in entered:
                continue
            entered.add(key)
            for q in d.iterdir():
                if q.name.startswith("."):
                    continue
                if q.is_dir():
                    todo.append(q)
                elif q.suffix.lower() in VIDEO_EXTENSIONS:
                    found.append(q)
    elif p.exists():  # first: a file named `z [1].mp4` is itself, not a pattern
        found = [p]
    elif any(ch in pattern_or_dir for ch in "*?["):
        found = _glob(pattern_or_dir)
    else:
        found = []
    files = _distinct(sorted({os.fspath(q) for q in found}))
    if not files:
        raise FileNotFoundError(
            f"--input={pattern_or_dir}: no video files ({', '.join(VIDEO_EXTENSIONS)}) found"
        )
    return files


def read_sidecar(path: str) -> dict[str, Any]:
    """The source's sidecar (`<name.ext>.json`, else `<stem>.json`: caption, optional mouth track), or {}."""
    side = sources.find_sidecar(path)
    if side is None:
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{side}: sidecar is not valid JSON ({e}); fix or remove it") from e


@dataclasses.dataclass
class ClipRecord:
    """One kept clip: its id (`<source id>@<start frame>`), record bytes and source path (as listed)."""

    clip_id: str
    data: bytes
    source: str = ""


class SourceReport(NamedTuple):
    """What ingesting one source counted (`stats`: clips kept, drops by reason) and noted (what was assumed)."""

    source: str
    stats: dict[str, int]
    notes: tuple[str, ...]


DEFAULT_HELD_BYTES = 1 << 30  # decoded frames a source may hold (1 GiB: ~390 frames of 720p RGB)


def ingest_source(
    path: str,
    cfg: IngestConfig,
    encs: tuple[Any, Any, Any],
    root: str = "",
    audio_16k: np.ndarray | None = None,
    audio_offset_s: float | None = None,
    stats: dict[str, int] | None = None,
    notes: list[str] | None = None,
    held_bytes: int = DEFAULT_HELD_BYTES,
    held_peak: list[int] | None = None,
    plans: list[clips.ClipPlan] | None = None,
    crop_xy: np.ndarray | None = None,
    shifts: dict[int, int] | None = None,
) -> Iterator[ClipRecord]:
    """Records for every kept clip of `path`; `stats` counts clips kept and dropped (by reason), `notes`
    collects what was chosen or assumed about the source (stream picked, rotation, silent audio...).

    `audio_16k`/`audio_offset_s` come from another audio backend (tfio); default: PyAV's resampler.
    At most max(`held_bytes` worth, clip + 2) decoded frames are held; `held_peak`[0] gets the most held.
    Curation (data_pipeline.curate) passes `plans` (the clips it kept, instead of plain clips.plan_clips),
    `crop_xy` ([num_frames, 2] top-left of the `cfg.size` window in the cover-scaled frame, per frame: the face
    crop) and `shifts` ({clip start: frames}: that clip's audio is read this many frames later).
    An error is raised as an `isolation.StageError` naming the step: probe, audio, sidecar, geometry, decode,
    filter:<name> or encode.
    """
    venc, aenc, tenc = encs
    stats = {} if stats is None else stats
    notes = [] if notes is None else notes
    with stage("probe"):
        info = media.probe(path)
    notes.extend(info.notes)
    tf = encoders.frame_multiple(venc)
    source_key = sources.source_id(path, root)
    if plans is None:
        plans = clips.plan_clips(info.num_frames, cfg.clip_frames, cfg.min_frames, tf, source_key, cfg.seed)
    elif not plans:
        return  # curation dropped every clip (it reports why)
    if not plans:
        stats["dropped:too_short"] = stats.get("dropped:too_short", 0) + 1
        notes.append(f"{info.num_frames} frames at 25 fps: shorter than one clip ({cfg.min_frames} frames), no clip")
        return
    with stage("audio"):
        if audio_16k is None:
            audio_16k, audio_offset_s = media.decode_audio_16k(path, info.t0)
        audio = media.align_audio(audio_16k, audio_offset_s or 0.0, info.num_frames)
    with stage("sidecar"):
        side = read_sidecar(path)
        caption = str(side.get("caption", ""))
        track = np.asarray(side.get("mouth", []), np.float32)
    with stage("encode"):
        text, text_mask = tenc.encode(caption)
    active = list(filters.get_filters(list(cfg.filters)))
    with stage("geometry"):
        geo = geometry.plan(
            (info.width, info.height), info.rotation, cfg.size, "center" if crop_xy is not None else cfg.crop,
            lambda g: next(media.iter_frames(info, g))[1],
        )
    out_w, out_h = cfg.size or (info.width, info.height)
    budget = max(held_bytes // (out_w * out_h * 3), cfg.clip_frames + 2)
    frames_of: Any = media.iter_frames(info, geo)
    seeker: Any = media.FrameSeeker(info, geo)
    if crop_xy is not None and geo.crop is not None:  # the scaled frame, cropped per frame where curation says
        geo = geometry.Geometry(geo.scale, None)
        seeker = _CroppedSeeker(media.FrameSeeker(info, geo), crop_xy, out_w, out_h)
        frames_of = ((k, _crop_at(f, crop_xy[k], out_w, out_h)) for k, f in media.iter_frames(info, geo))
    # which clips use frame k: as a clip frame (owner) or as a reference frame (refs)
    owner = {k: i for i, pl in enumerate(plans) for k in range(pl.start, pl.stop)}
    ref_users: dict[int, list[int]] = {}
    for i, pl in enumerate(plans):
        if pl.ref_frame is not None:
            ref_users.setdefault(pl.ref_frame, []).append(i)
    held: dict[int, np.ndarray] = {}
    waiting: dict[int, None] = {}  # clips with all their frames whose reference frame comes later (ordered)
    done = [False] * len(plans)
    silent = [0]

    def ref_of(pl: clips.ClipPlan) -> np.ndarray | None:
        if pl.ref_frame is None:
            return None
        if pl.ref_frame in held:
            return held[pl.ref_frame]
        stats["ref_seeks"] = stats.get("ref_seeks", 0) + 1
        return seeker.get(pl.ref_frame)

    def still_needed(k: int) -> bool:
        return (k in owner and not done[owner[k]]) or any(not done[i] for i in ref_users.get(k, []))

    def finish(i: int) -> Iterator[ClipRecord]:
        pl = plans[i]
        done[i] = True
        ref = ref_of(pl)  # a seek: part of decoding
        with stage("encode"):
            rec = _encode_clip(
                path, source_key, pl, held, ref, audio, track, caption, text, text_mask, encs, active, stats,
                silent if "silence" not in cfg.filters else None, (shifts or {}).get(pl.start, 0),
            )
        for kk in [*range(pl.start, pl.stop), pl.ref_frame]:
            if kk is not None and kk in held and not still_needed(kk):
                del held[kk]
        if rec is not None:
            yield rec

    peak = 0
    with stage("decode"):  # an error of the filters or encoders keeps its own stage
        try:
            for k, frame in frames_of:
                if still_needed(k):
                    held[k] = frame
                peak = max(peak, len(held))
                ready = []
                if k in owner and plans[owner[k]].stop == k + 1:
                    i = owner[k]
                    r = plans[i].ref_frame
                    if r is not None and r > k:
                        waiting[i] = None
                    else:
                        ready.append(i)
                ready += [i for i in ref_users.get(k, []) if waiting.pop(i, 0) is None]
                for i in ready:
                    yield from finish(i)
                while len(held) > budget and waiting:  # over budget: the oldest waiting clip seeks its reference
                    i = next(iter(waiting))
                    del waiting[i]
                    yield from finish(i)
                if len(held) > budget:  # still over: drop kept reference frames, latest use first
                    spare = sorted(
                        (kk for kk in held if kk not in owner or done[owner[kk]]),
                        key=lambda kk: -min(plans[i].start for i in ref_users[kk] if not done[i]),
                    )
                    for kk in spare[: len(held) - budget]:
                        del held[kk]
            for i in list(waiting):  # reference frames past the last decoded frame (a short decode)
                yield from finish(i)
        finally:
            seeker.close()
            if held_peak is not None:
                held_peak[:] = [peak]
    if silent[0]:
        notes.append(f"{silent[0]} clip(s) have silent audio (below -45 dBFS); --filters=silence drops them")
        stats["warned:silent_audio"] = stats.get("warned:silent_audio", 0) + silent[0]
    if stats.get("ref_seeks"):
        notes.append(f"{stats['ref_seeks']} reference frame(s) fetched by seeking (held-frame budget {budget})")
    if not all(done):
        raise StageError("decode", RuntimeError(
            f"{path}: decoding stopped before frame {max(pl.stop for pl in plans)}; the file may be truncated"
        ))


def _crop_at(frame: np.ndarray, xy: np.ndarray, w: int, h: int) -> np.ndarray:
    x, y = int(xy[0]), int(xy[1])
    return np.ascontiguousarray(frame[y : y + h, x : x + w])


class _CroppedSeeker:
    """media.FrameSeeker on the scaled frame, each frame cropped at its curation window."""

    def __init__(self, seeker: media.FrameSeeker, crop_xy: np.ndarray, w: int, h: int):
        self.seeker, self.crop_xy, self.w, self.h = seeker, crop_xy, w, h

    def get(self, k: int) -> np.ndarray:
        return _crop_at(self.seeker.get(k), self.crop_xy[k], self.w, self.h)

    def close(self) -> None:
        self.seeker.close()


def _encode_clip(
    path: str,
    source_key: str,
    pl: clips.ClipPlan,
    held: dict[int, np.ndarray],
    ref_frame: np.ndarray | None,
    audio: np.ndarray,
    track: np.ndarray,
    caption: str,
    text: np.ndarray,
    text_mask: np.ndarray,
    encs: tuple[Any, Any, Any],
    active: list[tuple[str, filters.Filter]],
    stats: dict[str, int],
    silent: list[int] | None = None,
    audio_shift: int = 0,
) -> ClipRecord | None:
    """`silent`: when given (the silence filter is off), counts clips whose audio it would drop; `audio_shift`:
    the clip's audio is read that many frames later (zeros past the source's ends)."""
    venc, aenc, _ = encs
    frames = np.stack([held[k] for k in range(pl.start, pl.stop)])
    a0, a1 = (pl.start + audio_shift) * media.HOP, (pl.stop + audio_shift) * media.HOP
    pad = max(0, -a0, a1 - len(audio))
    wave = np.pad(audio, pad)[a0 + pad : a1 + pad] if pad else audio[a0:a1]
    for name, fn in active:
        with stage(f"filter:{name}"):
            why = fn(filters.ClipData(frames, wave, path, pl.start))
        if why is not None:
            stats[f"dropped:filter:{name}"] = stats.get(f"dropped:filter:{name}", 0) + 1
            return None
    if silent is not None and filters.silence(filters.ClipData(frames, wave, path, pl.start)) is not None:
        silent[0] += 1
    video = venc.encode(frames)
    tf = frames.shape[0] // video.shape[0]
    if ref_frame is None:
        ref = np.zeros((1, *video.shape[1:]), np.float32)
    else:
        ref = venc.encode(np.repeat(ref_frame[None], tf, axis=0))[:1]
    valid = len(track) >= pl.stop
    mouth = track[pl.start : pl.stop].astype(np.float32) if valid else np.zeros(pl.length, np.float32)
    tensors = {
        "video": video,
        "audio": aenc.encode(wave, num_frames=pl.length),
        "text": text,
        "text_mask": text_mask,
        "ref": ref,
        "ref_time": np.array([pl.ref_time], np.float32),
        "mouth": mouth,
        "mouth_valid": np.array([1 if valid else 0], np.uint8),
    }
    clip_id = f"{source_key}@{pl.start:07d}"
    meta = {"clip_id": clip_id, "source": path, "caption": caption, "start_frame": str(pl.start)}
    stats["clips"] = stats.get("clips", 0) + 1
    return ClipRecord(clip_id, records.compress(records.encode_record(tensors, meta)), path)
