"""Which shards a dataset source names, checked against its manifest.json, and random access to their records.

`resolve_shards(source, verify)` turns a prepare output directory, a glob of its shards, a manifest path or a
list of these into a `ShardSet` (only shards the manifest lists, size/sha256 checked); `ShardSource` reads
record i of the set without ever raising (an unreadable record comes back as None with the reason), for the
loader's decode step (`data_pipeline.loader.examples`) to count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain
import numpy as np
from etils import epath

from data_pipeline.dataset import manifest as mf
from data_pipeline.loader import order as order_lib
from mirage_base.errors import ExitCode, MirageError
from mirage_base.storage import is_remote

log = logging.getLogger(__name__)


class ShardError(MirageError, ValueError):
    """A shard manifest.json lists is missing, damaged or rewritten (exit 2, before any training work); the
    message names the shard and, when it can be read at all, its first unreadable record."""

    exit_code, label = ExitCode.REFUSED, "DATA ERROR"


def first_unreadable_record(path: str, count: int) -> str:
    """Where a damaged local shard fails: 'it cannot be opened (...)', 'record i of n is unreadable (...)', or
    'all n records read back (the damage is outside them)'. Reads every record once (local disk only)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    except Exception as e:  # noqa: BLE001 - the C++ reader raises bare RuntimeError/ValueError/OSError kinds
        return f"it cannot be opened ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    try:
        n = reader.num_records()
        for i in range(min(n, count)):
            try:
                reader.read([i])
            except Exception as e:  # noqa: BLE001
                return f"record {i} of {count} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        if n < count:
            return f"it holds {n} records, the manifest says {count}: record {n} of {count} is missing"
        return f"all {count} records read back (the damage is outside them)"
    finally:
        try:
            reader.close()
        except Exception:  # noqa: BLE001,S110 - a damaged file's reader may fail to close; the reason is known
            pass


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """Verified shards (absolute paths, record counts, manifest sha256 digests) and the manifest they came from."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    manifest: dict[str, Any]
    digests: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """`order.dataset_fingerprint` of these shards (names, record counts, digests)."""
        digests = self.digests or ("",) * len(self.paths)
        return order_lib.dataset_fingerprint(self.paths, self.counts, digests)

    @property
    def num_records(self) -> int:
        return sum(self.counts)


def dataset_dirs(source: str) -> tuple[list[epath.Path], set[str] | None]:
    """The prepared-dataset directories named by `source` (a directory, its manifest.json, or a glob of shard
    files), and (for a glob) the shard file names it selects. Raises FileNotFoundError / ValueError naming it."""
    p = epath.Path(source)
    if p.is_dir():
        return [p], None
    if os.path.basename(source) == mf.MANIFEST:
        return [p.parent], None
    parent = epath.Path(os.path.dirname(source) or ".")
    if any(ch in os.path.dirname(source) for ch in "*?["):
        raise ValueError(f"{source}: globs may only match file names, not directories; list the directories")
    matched = {os.fspath(q) for q in parent.glob(os.path.basename(source))}
    if not matched:
        raise FileNotFoundError(
            f"{source}: matches no files; point at a data_pipeline.prepare output directory"
        )
    return [parent], matched


def verify_level(directory: str | os.PathLike[str], verify: str) -> str:
    """The shard check for a dataset in `directory`: `verify`, with 'auto' meaning 'sha256' for local disk and
    'size' for remote storage (gs://): hashing there downloads every shard on every host at start-up, while
    ArrayRecord's chunk checksums and safetensors parsing still catch a damaged record when it is read."""
    if verify != "auto":
        return verify
    return "size" if is_remote(directory) else "sha256"


def resolve_shards(source: str | list[str], verify: str = "auto") -> ShardSet:
    """The shards of `source` (directory, glob of shards, manifest path, or a list of these) that the
    manifest lists and `verify` ('auto', 'sha256', 'size' or 'none'; see `verify_level`) accepts; a mismatch
    raises naming the shard."""
    sources = [source] if isinstance(source, str) else list(source)
    paths, counts, digests, manifests = [], [], [], []
    for s in sources:
        dirs, selected = dataset_dirs(s)
        for d in dirs:
            m = mf.read_manifest(d)
            listed = {os.fspath(d / sh["path"]) for sh in m["shards"]}
            if selected is not None:
                for extra in sorted(q for q in selected if q.endswith(".array_record") and q not in listed):
                    log.warning(
                        "%s is not listed in %s/manifest.json; ignoring it (not a committed shard)", extra, d
                    )
            for sh in m["shards"]:
                full = os.fspath(d / sh["path"])
                if selected is not None and full not in selected:
                    continue
                problem = mf.verify_shard(d, sh, verify_level(d, verify))
                if problem:
                    if not is_remote(full) and os.path.exists(full):
                        problem += f"; {first_unreadable_record(full, int(sh['num_records']))}"
                    raise ShardError(
                        f"{problem}. Re-run data_pipeline.prepare on its inputs to rewrite it, or "
                        "remove the dataset; the loader reads only shards matching manifest.json"
                    )
                if sh["num_records"] > 0:
                    paths.append(full)
                    counts.append(int(sh["num_records"]))
                    digests.append(str(sh.get("sha256", "")))
            manifests.append(m)
    if not paths:
        raise FileNotFoundError(f"{source}: no committed shards with records")
    first = manifests[0]
    for m in manifests[1:]:
        if m["encoders"] != first["encoders"]:
            raise ValueError(
                f"{source}: datasets were built with different encoders ({first['encoders']} vs "
                f"{m['encoders']}); load them separately"
            )
    return ShardSet(tuple(paths), tuple(counts), first, tuple(digests))


class ShardSource:
    """Random access to the records of a ShardSet: item i -> (i, bytes or None, error text).

    Reading never raises: an unreadable record comes back as (i, None, why) for the decode step to count.
    Picklable (worker processes reopen the files lazily).
    """

    def __init__(self, paths: tuple[str, ...], counts: tuple[int, ...]):
        self.paths, self.counts = tuple(paths), tuple(counts)
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._src: Any = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[str, int]:
        """(shard path, record index inside it) of global record i."""
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.paths[s], int(i - self._starts[s])

    def _source(self) -> Any:
        if self._src is None:  # "path[start:stop]" skips opening every file to count its records
            self._src = grain.sources.ArrayRecordDataSource(
                [f"{p}[0:{n}]" for p, n in zip(self.paths, self.counts, strict=True)]
            )
        return self._src

    def __getitem__(self, i: int) -> tuple[int, bytes | None, str]:
        try:
            return int(i), self._source()[int(i)], ""
        except (RuntimeError, ValueError, OSError) as e:
            return int(i), None, f"{type(e).__name__}: {e}"

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "counts": self.counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["paths"], state["counts"])
