"""ArrayRecord shards and manifest.json: crash-safe writes, and the checks a loader trusts.

Every shard is written under a temporary name and renamed into place only when complete; manifest.json
is written last, the same way. A loader reads only the shards manifest.json lists, and only after their
size (and, by default, sha256) match: a run that crashed midway leaves at worst stray temporary files or
shards without a manifest entry, which nothing reads and the next run replaces.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import tempfile
import uuid
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from mirage_base.errors import ExitCode, MirageError
from mirage_base.storage import is_remote

MANIFEST = "manifest.json"
FORMAT = "mirage_jax.aroll.v2"  # v2: each record one zstd frame (data_pipeline.dataset.records.compress)
READABLE_FORMATS = ("mirage_jax.aroll.v1", FORMAT)  # v1: plain records in ArrayRecord's own zstd chunks
BUCKETS_FORMAT = "mirage_jax.aroll.buckets.v1"  # shape buckets, each a FORMAT dataset (data_pipeline.buckets)
# one record per chunk (random access for Grain), stored as given: each record is already a zstd frame
WRITER_OPTIONS = "group_size:1,uncompressed"
TMP_PREFIX = ".tmp-"


class ManifestError(MirageError, ValueError):
    """A manifest.json that is not valid JSON, of a format this version does not read, or of a dataset of shape
    buckets where one shape is needed: one DATA ERROR line naming the file (exit 2)."""

    exit_code, label = ExitCode.REFUSED, "DATA ERROR"


def _format_advice(fmt: Any) -> str:
    """What to do about a manifest of format `fmt`, which this version does not read."""
    head, _, version = str(fmt).rpartition(".v")
    newest = int(FORMAT.rpartition(".v")[2])
    if head == FORMAT.rpartition(".v")[0] and version.isdigit() and int(version) > newest:
        return ("it was written by a newer mirage_jax: update this checkout, or re-run data_pipeline.prepare "
                "with this version into another --output")
    return "re-run data_pipeline.prepare"


RUN_ID_CHARS = 8  # hex digits of the run's fingerprint in its shard names


def shard_name(index: int, count: int, fingerprint: str) -> str:
    """`data-<index>-of-<count>-<run>.array_record`; <run> is the first RUN_ID_CHARS of the run's fingerprint
    (data_pipeline.prepare.fingerprint: inputs + options), so a run never writes over the shards of an earlier
    output with other inputs or options: that output stays whole until the new manifest.json replaces it (the
    commit), and a run that fails leaves it as it was. The same inputs and options give the same names and bytes
    (a --force rerun, another runner)."""
    return f"data-{index:05d}-of-{count:05d}-{fingerprint[:RUN_ID_CHARS]}.array_record"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset directory
    num_records: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (local path, size, mtime_ns) -> sha256: a start-up check and
# the loader built after it hash each local shard once


def _sha256_file(path: str | epath.Path) -> str:
    key = None
    if not is_remote(path):
        st = os.stat(os.fspath(path))
        key = (os.path.abspath(os.fspath(path)), st.st_size, st.st_mtime_ns)
        if key in _DIGESTS:
            return _DIGESTS[key]
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if key is not None:
        _DIGESTS[key] = h.hexdigest()
    return h.hexdigest()


def atomic_write_bytes(dst: epath.Path, data: bytes) -> None:
    """Write `data` to `dst` through a temporary sibling and a rename (a reader never sees half a file)."""
    tmp = dst.parent / f"{TMP_PREFIX}{dst.name}.{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    tmp.replace(dst)


def _os_error(e: RuntimeError, path: epath.Path) -> BaseException:
    """ArrayRecord's C++ writer reports a failed write as RuntimeError("write() failed: File too large; ...") with
    no errno: the OSError whose strerror its message names (ENOSPC, EFBIG, EDQUOT, ...), so callers see the
    storage's refusal as such; `e` itself when the message names none."""
    msg = str(e)
    for code in sorted(errno.errorcode):
        text = os.strerror(code)
        if text and not text.startswith("Unknown error") and f"failed: {text}" in msg:
            return OSError(code, text, os.fspath(path))
    return e


def write_shard(records: list[bytes], out_dir: str, name: str) -> ShardInfo:
    """Write `records` in order as ArrayRecord shard `out_dir/name`; returns its size and sha256."""
    out = epath.Path(out_dir)
    local_dir = out if not is_remote(out) else epath.Path(tempfile.mkdtemp(prefix="mirage-shard-"))
    tmp = local_dir / f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}"
    remote_tmp = out / f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}"
    try:
        try:
            writer = ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
            try:
                for r in records:
                    writer.write(r)
            finally:
                writer.close()
        except RuntimeError as e:
            raise _os_error(e, tmp) from e
        info = ShardInfo(name, len(records), tmp.stat().length, _sha256_file(tmp))
        if local_dir == out:
            tmp.replace(out / name)
        else:  # remote: copy to a temporary remote name, then rename
            tmp.copy(remote_tmp)
            remote_tmp.replace(out / name)
    except BaseException:  # a full disk, a lost connection, an interrupt: leave no partial temp file behind
        for partial in (tmp, remote_tmp) if local_dir != out else (tmp,):
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
        raise
    finally:
        if local_dir != out:
            epath.Path(local_dir).rmtree(missing_ok=True)
    return info


def remove_temporary(out_dir: str | epath.Path) -> list[str]:
    """Delete the temporary files (`.tmp-*`) a failed or interrupted run left in `out_dir`; returns their names.
    Committed shards and manifest.json are kept."""
    removed = []
    d = epath.Path(out_dir)
    if not d.exists():
        return removed
    for p in d.iterdir():
        if p.name.startswith(TMP_PREFIX):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def remove_run_shards(out_dir: str | epath.Path, fingerprint: str) -> list[str]:
    """Delete the shards a failed run of `fingerprint` committed (shard_name) that out_dir's manifest.json does not
    list (an earlier output of the same run keeps its own); returns their names. Other runs' shards are kept."""
    d = epath.Path(out_dir)
    try:
        keep = {s["path"] for s in read_manifest(d)["shards"]}
    except (OSError, ValueError, KeyError, TypeError):  # none or unreadable: nothing of this run is listed
        keep = set()
    tail = f"-{fingerprint[:RUN_ID_CHARS]}.array_record"
    removed = []
    if d.exists():
        for p in d.iterdir():
            if p.name.startswith("data-") and p.name.endswith(tail) and p.name not in keep:
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return sorted(removed)


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    """Write manifest.json last, atomically, with sorted keys (byte-reproducible)."""
    atomic_write_bytes(
        epath.Path(out_dir) / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    )


def read_manifest(path: str | epath.Path) -> dict[str, Any]:
    """Load a manifest (a dataset directory or the manifest.json path) and check its format."""
    p = epath.Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: no manifest.json; the directory is not a finished data_pipeline.prepare "
            "output (a run that crashed writes it last) - run prepare again"
        )
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{p}: not valid JSON ({e}); run data_pipeline.prepare again") from None
    if m.get("format") == BUCKETS_FORMAT:
        names = ", ".join(b["name"] for b in m.get("buckets", []))
        raise ManifestError(f"{p}: a dataset of shape buckets ({names}); this reader takes one shape: point it at one "
                         "bucket's directory (the dataset's <bucket name>/) or train on the whole (mirage_jax.train)")
    if m.get("format") not in READABLE_FORMATS:
        raise ManifestError(f"{p}: format {m.get('format')!r} is not one this version reads {READABLE_FORMATS}; "
                            f"{_format_advice(m.get('format'))}")
    return m


def read_buckets_manifest(path: str | epath.Path) -> dict[str, Any] | None:
    """The top-level manifest of a dataset of shape buckets at `path` (its directory or manifest.json), or None for
    a single-shape dataset or no manifest (the single-shape reader names that). data_pipeline/buckets.py writes it."""
    p = epath.Path(path)
    p = p / MANIFEST if p.is_dir() else p
    if p.name != MANIFEST or not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return m if m.get("format") == BUCKETS_FORMAT else None


def verify_shard(root: str | epath.Path, shard: dict[str, Any], level: str) -> str | None:
    """None if shard matches the manifest at `level` ('none', 'size' or 'sha256'), else what is wrong."""
    p = epath.Path(root) / shard["path"]
    if level == "none":
        return None
    if not p.exists():
        return f"{p}: listed in the manifest but missing"
    size = p.stat().length
    if size != shard["bytes"]:
        return f"{p}: {size} bytes, the manifest says {shard['bytes']} (truncated or rewritten)"
    if level == "sha256":
        digest = _sha256_file(p)
        if digest != shard["sha256"]:
            want = shard["sha256"][:12]
            return f"{p}: sha256 {digest[:12]}... differs from the manifest's {want}... (corrupted)"
    elif level != "size":
        raise ValueError(f"verify={level!r}: use 'sha256', 'size' or 'none'")
    return None


def remove_replaced_buckets(out_dir: str, previous: dict[str, Any] | None, keep: set[str]) -> list[str]:
    """After a new manifest.json is committed in out_dir: delete the bucket directories the `previous` top
    manifest (read_buckets_manifest, read before the commit; None: it was no bucketed dataset) listed and the
    new one does not (`keep`: its bucket names); returns their names. Only directories the previous manifest named
    are touched."""
    removed = []
    for b in (previous or {}).get("buckets", []):
        name = b.get("path") or b.get("name")
        if isinstance(name, str) and name and "/" not in name and name not in keep:
            (epath.Path(out_dir) / name).rmtree(missing_ok=True)
            removed.append(name)
    return sorted(removed)


def clean_stale(out_dir: str, keep: set[str]) -> list[str]:
    """Delete temporary files and shards that manifest.json does not list; returns what was removed."""
    removed = []
    for p in epath.Path(out_dir).iterdir():
        stale_shard = p.name.endswith(".array_record") and p.name not in keep
        if p.name.startswith(TMP_PREFIX) or stale_shard:
            p.unlink()
            removed.append(p.name)
    return sorted(removed)
