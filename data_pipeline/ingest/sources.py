"""Vetting the listed sources before any decoding: unique clip ids, unambiguous sidecars, one frame shape.

A source's id is its path relative to the input root, extension included (`talk.mov`, `sub/talk.mp4`),
so two files never share one; clip ids are `<source id>@<start frame>`. What could still collide (the
same id under two spellings, a `<stem>.json` caption shared by `talk.mov` and `talk.mp4`) is found here,
both paths are named, and only those sources are set aside: the rest are kept.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from etils import epath

from data_pipeline.ingest import media
from mirage_base.errors import InputError
from mirage_base.storage import is_remote


def input_root(input_pattern: str, files: Sequence[str]) -> str:
    """The directory source ids are relative to: the input directory, else the files' common folder."""
    if not any(ch in input_pattern for ch in "*?[") and epath.Path(input_pattern).is_dir():
        return os.fspath(epath.Path(input_pattern))
    if not files:
        return ""
    scheme = files[0].partition("://")[0] + "://" if is_remote(files[0]) else ""
    if any(not f.startswith(scheme) for f in files):
        return ""
    return scheme + posixpath.commonpath([posixpath.dirname(f[len(scheme) :]) for f in files])


def source_id(path: str, root: str) -> str:
    """`path` relative to `root`, with its extension, '/'-separated (basename when outside the root)."""
    p, r = path.replace(os.sep, "/"), root.replace(os.sep, "/").rstrip("/")
    if r and p.startswith(r + "/"):
        return p[len(r) + 1 :]
    return posixpath.basename(p)


def sidecar_candidates(path: str) -> list[epath.Path]:
    """Where a source's caption/mouth sidecar may be: `<name.ext>.json`, then `<stem>.json`."""
    p = epath.Path(path)
    return [p.parent / f"{p.name}.json", p.with_suffix(".json")]


def find_sidecar(path: str) -> epath.Path | None:
    return next((c for c in sidecar_candidates(path) if c.exists()), None)


def find_collisions(files: Sequence[str], root: str) -> dict[str, str]:
    """{path: reason} for sources whose id or sidecar another source shares (each reason names both)."""
    return {**sidecar_collisions(files), **id_collisions(files, root)}


def id_collisions(files: Sequence[str], root: str) -> dict[str, str]:
    """{path: reason} for sources that map to one id (possible only outside `root`: basenames)."""
    bad: dict[str, str] = {}
    by_id: dict[str, str] = {}
    for f in files:
        sid = source_id(f, root)
        if sid in by_id:
            other = by_id[sid]
            bad[f] = f"its clip id {sid!r} collides with {other}'s; rename one of them"
            bad.setdefault(other, f"its clip id {sid!r} collides with {f}'s; rename one of them")
        else:
            by_id[sid] = f
    return bad


def sidecar_collisions(files: Sequence[str]) -> dict[str, str]:
    """{path: reason} for sources without a sidecar of their own that share a `<stem>.json`."""
    shared: dict[str, list[str]] = {}
    for f in files:
        own, stem = sidecar_candidates(f)
        if not own.exists() and stem.exists():
            shared.setdefault(os.fspath(stem), []).append(f)
    bad: dict[str, str] = {}
    for side, users in shared.items():
        for f in users if len(users) > 1 else []:
            others = ", ".join(u for u in users if u != f)
            bad[f] = (
                f"its sidecar {side} is also {others}'s; name it {posixpath.basename(f)}.json (one sidecar per source)"
            )
    return bad


def display_sizes(files: Sequence[str], threads: int = 8) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """({path: display (width, height)}, {path: reason}) of `files`: each header decoded, in up to `threads` threads;
    a source whose header cannot be read goes to the second dict."""
    def one(f: str) -> tuple[str, tuple[int, int] | None, str | None]:
        try:
            h = media.header(f)
            return f, (h.width, h.height), None
        except (ValueError, OSError) as e:
            return f, None, str(e).removeprefix(f"{f}: ")

    sizes: dict[str, tuple[int, int]] = {}
    bad: dict[str, str] = {}
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as ex:
        for f, size, err in ex.map(one, files):
            if size is None:
                bad[f] = err or "unreadable"
            else:
                sizes[f] = size
    return sizes, bad


def check_sizes(
    files: Sequence[str], spatial_factor: int, threads: int = 8
) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Display sizes of `files` (header decode, in threads) and {path: reason} for unreadable ones.

    Raises InputError (one line in prepare, exit 2) listing the sizes found when they differ (prepare needs
    --size then), or when the one size is not a multiple of the video encoder's spatial factor.
    """
    sizes, bad = display_sizes(files, threads)
    found: dict[tuple[int, int], list[str]] = {}
    for f, s in sizes.items():
        found.setdefault(s, []).append(f)
    if len(found) > 1:
        by_count = sorted(found.items(), key=lambda x: -len(x[1]))
        listing = "; ".join(f"{w}x{h}: {len(fs)} source(s), e.g. {fs[0]}" for (w, h), fs in by_count)
        raise InputError(
            f"sources have different frame sizes ({listing}); every record needs one shape: set "
            "--size=WxH (each source is scaled to cover it and cropped, see --crop)"
        )
    for (w, h), fs in found.items():
        if w % spatial_factor or h % spatial_factor:
            raise InputError(
                f"sources are {w}x{h} (e.g. {fs[0]}), not a multiple of the video encoder's spatial factor "
                f"{spatial_factor}; set --size=WxH with multiples of {spatial_factor}"
            )
    return sizes, bad
