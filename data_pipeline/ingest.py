"""One source file -> encoded clip records: decode (PyAV), cut, filter, encode, serialize.

This is the per-element work of the Beam pipeline in `prepare`, kept free of Beam so it can be tested
and reused directly. Frames are streamed: only the frames of clips (and reference frames) not yet
emitted are held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from data_pipeline import clips, encoders, filters, media, records

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Everything that decides the bytes of the records (and so goes into the manifest)."""

    clip_seconds: float = 2.0
    min_seconds: float | None = None  # None: clip_seconds (tails shorter than a clip are dropped)
    size: tuple[int, int] | None = None  # (W, H) resize; None: keep the source size
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


def list_sources(pattern_or_dir: str) -> list[str]:
    """Video files under a directory (recursively) or matching a glob, sorted."""
    p = epath.Path(pattern_or_dir)
    if p.is_dir():
        found, todo = [], [p]
        while todo:  # recursive walk (epath's rglob refuses on GCS)
            for q in todo.pop().iterdir():
                if q.is_dir():
                    todo.append(q)
                elif q.suffix.lower() in VIDEO_EXTENSIONS:
                    found.append(q)
    elif any(ch in pattern_or_dir for ch in "*?["):
        root, _, pat = pattern_or_dir.partition("*")
        base = epath.Path(root) if root.endswith("/") else epath.Path(root).parent
        rel = pattern_or_dir[len(os.fspath(base)) + 1 :] if root else pattern_or_dir
        found = list(base.glob(rel))
    elif p.exists():
        found = [p]
    else:
        found = []
    files = sorted({os.fspath(q) for q in found})
    if not files:
        raise FileNotFoundError(
            f"--input={pattern_or_dir}: no video files ({', '.join(VIDEO_EXTENSIONS)}) found"
        )
    return files


def read_sidecar(path: str) -> dict[str, Any]:
    """`<video>.json` next to the source (caption, optional per-frame mouth track), or {}."""
    side = epath.Path(path).with_suffix(".json")
    if not side.exists():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{side}: sidecar is not valid JSON ({e}); fix or remove it") from e


@dataclasses.dataclass
class ClipRecord:
    clip_id: str
    data: bytes


def _ids_root(path: str, root: str) -> str:
    rel = os.path.relpath(path, root) if root and "://" not in path else os.path.basename(path)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def ingest_source(
    path: str,
    cfg: IngestConfig,
    encs: tuple[Any, Any, Any],
    root: str = "",
    audio_16k: np.ndarray | None = None,
    audio_offset_s: float | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[ClipRecord]:
    """Records for every kept clip of `path`; `stats` counts clips kept and dropped (by reason).

    `audio_16k`/`audio_offset_s` come from another audio backend (tfio); default: PyAV's resampler.
    """
    venc, aenc, tenc = encs
    stats = {} if stats is None else stats
    info = media.probe(path)
    tf = encoders.frame_multiple(venc)
    source_key = _ids_root(path, root)
    plans = clips.plan_clips(info.num_frames, cfg.clip_frames, cfg.min_frames, tf, source_key, cfg.seed)
    if not plans:
        stats["dropped:too_short"] = stats.get("dropped:too_short", 0) + 1
        return
    if audio_16k is None:
        audio_16k, audio_offset_s = media.decode_audio_16k(path, info.t0)
    audio = media.align_audio(audio_16k, audio_offset_s or 0.0, info.num_frames)
    side = read_sidecar(path)
    caption = str(side.get("caption", ""))
    track = np.asarray(side.get("mouth", []), np.float32)
    text, text_mask = tenc.encode(caption)
    active = list(filters.get_filters(list(cfg.filters)))
    need: dict[int, list[int]] = {}
    for i, pl in enumerate(plans):
        for k in list(range(pl.start, pl.stop)) + ([pl.ref_frame] if pl.ref_frame is not None else []):
            need.setdefault(k, []).append(i)
    held: dict[int, np.ndarray] = {}
    done = [False] * len(plans)

    def complete(pl: clips.ClipPlan) -> bool:
        return all(k in held for k in range(pl.start, pl.stop)) and (
            pl.ref_frame is None or pl.ref_frame in held
        )

    for k, frame in media.iter_frames(info, cfg.size):
        if k in need:
            held[k] = frame
        for i, pl in enumerate(plans):
            if done[i] or not complete(pl):
                continue
            done[i] = True
            rec = _encode_clip(
                path, source_key, pl, held, audio, track, caption, text, text_mask, encs, active, stats
            )
            if rec is not None:
                yield rec
            for kk in [*range(pl.start, pl.stop), pl.ref_frame]:  # forget frames no pending clip needs
                if kk is not None and all(done[j] for j in need.get(kk, [])):
                    held.pop(kk, None)
    if not all(done):
        raise RuntimeError(
            f"{path}: decoding stopped before frame {max(pl.stop for pl in plans)}; the file may be truncated"
        )


def _encode_clip(
    path: str,
    source_key: str,
    pl: clips.ClipPlan,
    held: dict[int, np.ndarray],
    audio: np.ndarray,
    track: np.ndarray,
    caption: str,
    text: np.ndarray,
    text_mask: np.ndarray,
    encs: tuple[Any, Any, Any],
    active: list[tuple[str, filters.Filter]],
    stats: dict[str, int],
) -> ClipRecord | None:
    venc, aenc, _ = encs
    frames = np.stack([held[k] for k in range(pl.start, pl.stop)])
    wave = audio[pl.start * media.HOP : pl.stop * media.HOP]
    for name, fn in active:
        if fn(filters.ClipData(frames, wave, path, pl.start)) is not None:
            stats[f"dropped:filter:{name}"] = stats.get(f"dropped:filter:{name}", 0) + 1
            return None
    video = venc.encode(frames)
    tf = frames.shape[0] // video.shape[0]
    if pl.ref_frame is None:
        ref = np.zeros((1, *video.shape[1:]), np.float32)
    else:
        ref = venc.encode(np.repeat(held[pl.ref_frame][None], tf, axis=0))[:1]
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
    return ClipRecord(clip_id, records.encode_record(tensors, meta))
