"""Ingest: raw A-roll (real or synthetic mp4) -> encoded ArrayRecord shards + manifest.json, with Apache Beam.

    python -m data_pipeline.prepare --input=GLOB_OR_DIR --output=DIR [--runner=local] [--clip-seconds=2] ...

Flow: list sources -> batches of sources -> decode (PyAV; audio optionally via tensorflow-io in its own
venv) -> 25 fps clips + 16 kHz audio -> quality filters -> frozen encoders -> record bytes -> shards
(records sorted by clip id, shard i holds ranks [i * R, (i + 1) * R)) -> manifest.json last.

`--runner=local` (default) runs Beam's FnApiRunner in this process (with a progress bar); `--runner=dask`
runs Beam's DaskRunner over `--workers` local worker processes or the cluster at `--dask-address`
(data_pipeline.engine); DirectRunner, DataflowRunner, FlinkRunner, SparkRunner... are passed to Beam with any
extra Beam flags after `--` (see docs/data_pipeline.md for the Dataflow command). The same input and flags give
byte-identical shards and manifest on every runner; a rerun over a complete output with the same inputs does
nothing. A source that makes a stage raise is kept out and named with the stage (data_pipeline.ingest.isolation).
`--curate` adds the curation stages (data_pipeline.curate) between the batches and the decode.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import signal
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from absl import flags
from etils import epath
from tqdm import tqdm

from data_pipeline import encoders, engine
from data_pipeline.curate import plan as curate_plan
from data_pipeline.curate import report as curate_report
from data_pipeline.curate import stage as curate_stage
from data_pipeline.dataset import manifest as mf
from data_pipeline.dataset import records
from data_pipeline.ingest import filters, geometry, isolation, media, per_worker, sources
from data_pipeline.ingest.per_source import (
    DEFAULT_HELD_BYTES,
    ClipRecord,
    IngestConfig,
    SourceReport,
    ingest_source,
    list_sources,
)
from data_pipeline.prepare_flags import FLAGS, check_runner_flags, config_from_flags, curate_from_flags
from mirage_base.errors import ExitCode, InputError, Interrupted, MirageError, Terminated, in_chain
from mirage_base.storage import check_storage

log = logging.getLogger(__name__)
_PROGRESS: dict[str, Any] = {}  # in-process runs only: the tqdm bar DoFns update
EMPTY_RESULT = mf.TMP_PREFIX + "no-records.json"  # a run without records: its stats for `run`'s error, no manifest


class NoClipsError(MirageError, RuntimeError):
    """Prepare kept no clip from any source; the message says why (stats, first failure) and what to change."""

    exit_code, label = ExitCode.REFUSED, "error"


class OutputWriteError(MirageError, RuntimeError):
    """The output could not be written (a full disk or quota, no permission, a read-only file system): one line
    naming the output and the cause; the run's temporary files are removed (exit 4)."""

    exit_code, label = ExitCode.SAVE_FAILED, "error"


# OSError numbers that mean "the output storage refused the write", not a bug: reported as one line
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def _write_cause(e: BaseException) -> OSError | None:
    """The OSError in `e`'s chain (Beam re-raises a DoFn's error as a RuntimeError whose context is the original)
    that is the output storage's refusal: one of `_WRITE_ERRNOS`, or a directory where prepare writes a file
    (OUT/manifest.json/) or a file where it needs a directory (IsADirectoryError / NotADirectoryError: etils
    raises them without an errno), else None."""
    c = in_chain(e, lambda c: isinstance(c, (IsADirectoryError, NotADirectoryError))
                 or (isinstance(c, OSError) and c.errno in _WRITE_ERRNOS))
    return c if isinstance(c, OSError) else None


def _interrupted(e: BaseException) -> bool:
    """Whether a Ctrl-C is in `e`'s chain (the local runner re-raises it from a DoFn as RuntimeError
    "KeyboardInterrupt [while running 'Ingest']")."""
    return in_chain(e, lambda c: isinstance(c, KeyboardInterrupt)) is not None


class _QuietWriteErrors(logging.Filter):
    """Drops Beam's ERROR log (with traceback) of a DoFn failing on a `_WRITE_ERRNOS` error or stopped by a Ctrl-C:
    `run` reports both in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or (_write_cause(exc) is None and not _interrupted(exc))


logging.getLogger("apache_beam.runners.common").addFilter(_QuietWriteErrors())


def fingerprints(files: Sequence[str], cfg: IngestConfig, records_per_shard: int,
                 curate: curate_plan.CurateConfig | None = None) -> dict[str, str]:
    """Identity of a run in each output format it may be found in: {format: sha256 hex} over the sources (path,
    size, mtime; each stated once, which on gs:// is a request per source), every option that changes the output
    bytes, and the format (manifest.READABLE_FORMATS). The run writes manifest.FORMAT's; `up_to_date` accepts an
    output of any readable format with its own."""
    stats = []
    for f in files:
        st = epath.Path(f).stat()
        stats.append(f"{f}\x00{st.length}\x00{st.mtime}\n".encode())
    run_opts: dict[str, Any] = {"cfg": cfg.to_json(), "rps": records_per_shard}
    if curate is not None:
        run_opts["curate"] = curate.to_json()
    out = {}
    for fmt in mf.READABLE_FORMATS:
        h = hashlib.sha256(json.dumps({**run_opts, "format": fmt}, sort_keys=True).encode())
        for line in stats:
            h.update(line)
        out[fmt] = h.hexdigest()
    return out


class IngestBatch(beam.DoFn):
    """A batch of sources -> one stream of typed elements: a ClipRecord per kept clip, a SourceReport per
    source (stats, notes) and an isolation.Failure per source that raised (kept out of the output).

    A batch item is a source path, or with --curate the source's curate.plan.SourcePlan (its kept clips, face
    crop and audio shifts) or the isolation.Failure of the curation stage that failed on it (passed on)."""

    def __init__(self, cfg: IngestConfig, root: str, tfio_python: str | None, held_bytes: int = DEFAULT_HELD_BYTES):
        self.cfg, self.root, self.tfio_python, self.held_bytes = cfg, root, tfio_python, held_bytes
        # the launcher's registered filters and crop policy travel with the DoFn: a worker process of another
        # runner (Dask, Dataflow) has only what its own imports registered
        self.filters = dict(filters.get_filters(list(cfg.filters)))
        self.crop = None if cfg.crop == "face" else geometry.get_crop(cfg.crop)

    def setup(self) -> None:
        for name, fn in self.filters.items():
            filters.register_filter(name, fn)
        if self.crop is not None:
            geometry.register_crop(self.cfg.crop, self.crop)
        self.encs = per_worker.load_once(("encoders", self.cfg), self.cfg.build_encoders)

    def process(self, batch: list[str | curate_plan.SourcePlan | isolation.Failure]) -> Iterator[Any]:
        plans = {it.path: it for it in batch if isinstance(it, curate_plan.SourcePlan)}
        paths = [it if isinstance(it, str) else it.path for it in batch if not isinstance(it, isolation.Failure)]
        for it in batch:
            if isinstance(it, isolation.Failure):  # curation kept it out; counted as a failed source
                yield it
                self._progress()
        audio: dict[str, tuple[np.ndarray, float]] = {}
        audio_failed: dict[str, isolation.Failure] = {}
        if self.cfg.audio_backend == "tfio":
            from data_pipeline.ingest import tfio_backend

            natives = {}
            for p in paths:
                try:
                    info = media.probe(p)
                except ValueError:  # refused or unreadable: ingest_source below names it
                    continue
                try:
                    natives[p] = media.decode_audio_native(p, info.t0)
                except Exception as e:
                    audio_failed[p] = isolation.failure_of(e, p, "audio")
            outs = tfio_backend.resample_16k([(x, r) for x, r, _ in natives.values()], self.tfio_python)
            audio = {p: (y, natives[p][2]) for p, y in zip(natives, outs, strict=True)}
        for p in paths:
            stats: dict[str, int] = {"sources": 1}
            notes: list[str] = []
            if p in audio_failed:
                yield audio_failed[p]
            else:
                a, off = audio.get(p, (None, None))
                pl = plans.get(p)
                curated: dict[str, Any] = {} if pl is None else {
                    "plans": pl.kept_plans(), "crop_xy": pl.crop_xy, "shifts": pl.shifts}
                produce = functools.partial(
                    ingest_source, p, self.cfg, self.encs, self.root, a, off, stats, notes, held_bytes=self.held_bytes,
                    **curated,
                )
                yield from isolation.isolate(p, "ingest", produce)
            yield SourceReport(p, stats, tuple(notes))
            self._progress()

    @staticmethod
    def _progress() -> None:
        bar = _PROGRESS.get("bar")
        if bar is not None:
            bar.update(1)


BATCHES_PER_SLOT = 8  # at least this many batches per work slot, down to one source per batch


def source_batches(paths: Sequence[str], batch_sources: int, parallelism: int | None) -> list[list[str]]:
    """`paths` (sorted) cut into consecutive batches of at most `batch_sources`, and small enough that a runner
    running `parallelism` work items at once gets about BATCHES_PER_SLOT per slot: when the last batches run, a
    slot idles about half a batch on average, ~1 / (2 x batches per slot) of the run (at 4 per slot, 16 sources on
    2 Dask workers were cut into 2-source batches; the measured 2/1-worker ratio moved within its run-to-run
    spread: bench/results.md 7d).
    Deterministic (Beam's BatchElements sizes batches by timing, and on the DaskRunner loses its last batch);
    the output's bytes do not depend on the cut."""
    paths = sorted(paths)
    size = batch_sources
    if parallelism:
        size = max(1, min(size, math.ceil(len(paths) / (BATCHES_PER_SLOT * parallelism))))
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def _keyed_record(e: Any) -> Iterator[tuple[str, bytes]]:
    if isinstance(e, ClipRecord):
        yield e.clip_id, e.data


def _index_entry(e: Any) -> Iterator[tuple[int, tuple[str, str, str]]]:
    """Everything the shard plan needs, under one key: ("id", clip id, source) and ("failed", "", source)."""
    if isinstance(e, ClipRecord):
        yield 0, ("id", e.clip_id, e.source)
    elif isinstance(e, isolation.Failure):
        yield 0, ("failed", "", e.source)


def _shard_plan(group: tuple[int, Iterable[tuple[str, str, str]]], per_shard: int) -> Iterator[tuple[str, Any]]:
    """(clip id, (shard index, shard count)) for every clip of a source that did not fail, by rank of the sorted
    clip ids: shard i holds ranks [i * per_shard, (i + 1) * per_shard)."""
    entries = list(group[1])
    failed = {src for kind, _, src in entries if kind == "failed"}
    ids = sorted(cid for kind, cid, src in entries if kind == "id" and src not in failed)
    dup = sorted({a for a, b in zip(ids, ids[1:], strict=False) if a == b})
    if dup:
        raise InputError(f"duplicate clip ids {dup[:5]}; two sources map to the same relative path")
    n = max(1, math.ceil(len(ids) / per_shard))
    for rank, cid in enumerate(ids):
        yield cid, (rank // per_shard, n)


def _place(item: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[tuple[int, tuple[str, int, bytes]]]:
    """A clip's record joined with its place: (shard index, (clip id, shard count, bytes)); a record without a
    place (its source failed in some stage) is dropped."""
    cid, joined = item
    places, datas = list(joined["place"]), list(joined["record"])
    if places and datas:
        shard, n = places[0]
        yield shard, (cid, n, datas[0])


class WriteShard(beam.DoFn):
    """(shard index, [(clip_id, shard count, bytes)]) -> shard file written atomically (named by the run's
    fingerprint: manifest.shard_name); yields its manifest entry."""

    def __init__(self, out_dir: str, fingerprint: str):
        self.out_dir, self.fingerprint = out_dir, fingerprint

    def process(self, element: tuple[int, Iterable[tuple[str, int, bytes]]]) -> Iterator[dict[str, Any]]:
        index, items = element
        items = sorted(items)
        num_shards = items[0][1]
        name = mf.shard_name(index, num_shards, self.fingerprint)
        info = mf.write_shard([b for _, _, b in items], self.out_dir, name)
        shapes = _merge_shapes(records.tensor_specs(b) for _, _, b in items)
        yield {"index": index, "shard": info.to_json(), "shapes": shapes}


def _merge_shapes(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """{tensor: {"shape", "dtype"}} specs merged: a dimension that differs between parts becomes None."""
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if k not in out:
                out[k] = dict(v)
            else:
                out[k]["shape"] = [
                    a if a == b else None for a, b in zip(out[k]["shape"], v["shape"], strict=True)
                ]
    return dict(sorted(out.items()))


def _sum_stats(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def build_manifest(
    shard_parts: list[dict[str, Any]],
    stats: dict[str, int],
    failed: list[str],
    cfg: IngestConfig,
    num_sources: int,
    fp: str,
    records_per_shard: int,
    notes: Sequence[str] = (),
    curation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """manifest.json contents (see docs/data_pipeline.md) from the written shards (`curation`: with --curate)."""
    shard_parts = sorted(shard_parts, key=lambda s: s["index"])
    venc, aenc, tenc = cfg.build_encoders()
    shapes = _merge_shapes(p["shapes"] for p in shard_parts)
    video_shape = shapes.get("video", {}).get("shape", [None, None, None, None])
    if shard_parts and None in video_shape[1:]:  # sources.check_sizes / --size rule this out
        raise InputError(f"prepare: records of different frame sizes (video {video_shape}); set --size=WxH")
    f = encoders.spatial_factor(venc)
    h = None if video_shape[1] is None else video_shape[1] * f
    w = None if video_shape[2] is None else video_shape[2] * f
    m = {
        "format": mf.FORMAT,
        "num_records": sum(p["shard"]["num_records"] for p in shard_parts),
        "fps": media.FPS,
        "sample_rate": media.SAMPLE_RATE,
        "clip_frames": cfg.clip_frames,
        "min_frames": cfg.min_frames,
        "time_map": encoders.time_map(venc).to_json(cfg.clip_frames),
        "keys": shapes,
        "metadata_keys": list(records.METADATA_KEYS),
        "encoders": {
            "video": venc.spec(h, w).to_json(),
            "audio": aenc.spec().to_json(),
            "text": tenc.spec().to_json(),
        },
        "shards": [p["shard"] for p in shard_parts],
        "sources": {
            "count": num_sources,
            "fingerprint": fp,
            "failed": sorted(failed)[:1000],
            "notes": sorted(notes)[:1000],
        },
        "stats": stats,
        "options": {**cfg.to_json(), "records_per_shard": records_per_shard},
    }
    if curation is not None:
        m["curation"] = curation
    return m


def up_to_date(out_dir: str, fps: Mapping[str, str]) -> bool:
    """True if out_dir holds a complete output of exactly this run (manifest fingerprint + shard sizes): `fps` maps
    each output format to this run's fingerprint in it, so an output of an older format that is still read
    (manifest.READABLE_FORMATS) counts: upgrading mirage_jax does not rewrite a dataset a trainer is reading."""
    try:
        m = mf.read_manifest(out_dir)
    except (OSError, ValueError):  # none, unreadable (a directory named manifest.json), or not ours: run it
        return False
    if m.get("sources", {}).get("fingerprint") != fps.get(m.get("format", "")):
        return False
    return all(mf.verify_shard(out_dir, s, "size") is None for s in m["shards"])


def run(
    input_pattern: str,
    output: str,
    cfg: IngestConfig,
    *,
    runner: str = "local",
    records_per_shard: int = 64,
    batch_sources: int = 8,
    tfio_python: str | None = None,
    force: bool = False,
    beam_args: Sequence[str] = (),
    progress: bool = True,
    held_bytes: int = DEFAULT_HELD_BYTES,
    workers: int = 2,
    dask_address: str | None = None,
    curate: curate_plan.CurateConfig | None = None,
    files: Sequence[str] | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """Run the ingest pipeline; returns the manifest (also written to `output`/manifest.json). `curate`: the
    curation stages and thresholds (data_pipeline.curate; None: every clip of every source).

    Before any decoding, sources whose clip ids or sidecars collide are set aside (both paths named in
    `sources.failed`); without `cfg.size` the sources' display sizes must agree (InputError listing them).
    `runner`: local, dask (a LocalCluster of `workers` processes, or the cluster at `dask_address`) or a Beam
    runner name (data_pipeline.engine). A source that makes a stage raise is kept out and listed as
    "<source>: <stage>: <reason>" in `sources.failed` (data_pipeline.ingest.isolation).
    `files`/`root`: the sources (and the root their ids are relative to) when a caller already chose them
    among `input_pattern`'s (one shape bucket's, `data_pipeline.buckets`); default: all of them.
    """
    files = list_sources(input_pattern) if files is None else list(files)
    root = sources.input_root(input_pattern, files) if root is None else root
    listed_bad = sources.find_collisions(files, root)
    spatial = encoders.spatial_factor(cfg.build_encoders()[0])
    _check_curation(cfg, curate)  # --crop=face, --syncnet-weights: refused by flag before any work
    if cfg.crop != "face":
        geometry.get_crop(cfg.crop)  # an unknown policy or filter is refused by name before any work
    try:
        filters.get_filters(list(cfg.filters))
    except ValueError as e:
        raise InputError(str(e)) from None
    if cfg.size is not None and (cfg.size[0] % spatial or cfg.size[1] % spatial):
        raise InputError(
            f"--size={cfg.size[0]}x{cfg.size[1]}: width and height must be multiples of the video encoder's "
            f"spatial factor {spatial}"
        )
    fps = fingerprints(files, cfg, records_per_shard, curate)
    fp = fps[mf.FORMAT]
    try:
        epath.Path(output).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it exists and is not a directory" if isinstance(e, FileExistsError) else e.strerror or e
        raise OutputWriteError(f"prepare: --output={output}: cannot create it ({why}); choose another "
                               "--output (or fix its parent's permissions)") from None
    if not force and up_to_date(output, fps):
        m = mf.read_manifest(output)
        older = f" (format {m['format']}, which is still read)" if m["format"] != mf.FORMAT else ""
        print(f"{output}: up to date{older} (same inputs and options); nothing to do. Pass --force to rewrite.")
        try:  # a killed (-9) later run's partial shard, a later no-clips run's report
            _tidy(output, m)
        except OSError as e:  # an up-to-date output on read-only storage is still up to date
            log.warning("prepare: could not tidy %s: %s", output, e)
        return m
    _check_writable(output)
    if cfg.audio_backend == "tfio":
        from data_pipeline.ingest import tfio_backend

        ok, why = tfio_backend.available(tfio_python)
        if not ok:
            raise InputError(f"--audio-backend=tfio: {why}")
    if cfg.size is None:  # one record shape: the sources' display sizes must agree
        listed_bad.update(sources.check_sizes([f for f in files if f not in listed_bad], spatial)[1])
    good = [f for f in files if f not in listed_bad]
    for f, why in sorted(listed_bad.items()):
        log.warning("skipping source %s: %s", f, why)
    listed = [isolation.Failure(f, "sources", why) for f, why in sorted(listed_bad.items())]
    empty = epath.Path(output) / EMPTY_RESULT
    empty.unlink(missing_ok=True)
    try:
        with engine.open_engine(runner, beam_args, workers=workers, dask_address=dask_address) as eng:
            log.info("prepare: %d source(s) on %s", len(good), eng.description)
            batches = source_batches(good, batch_sources, eng.parallelism)
            bar = tqdm(total=len(good), desc="prepare", unit="source", disable=not (progress and eng.in_process))
            _PROGRESS["bar"] = bar if eng.in_process else None
            try:
                p = beam.Pipeline(runner=eng.runner, options=eng.options)
                _pipeline(p, batches, cfg, root, tfio_python, held_bytes, records_per_shard, output, listed,
                          len(files), fp, curate)
                engine.run(p)
            finally:
                bar.close()
                _PROGRESS.pop("bar", None)
    except KeyboardInterrupt:  # Ctrl-C: the engine has stopped (its cluster too); main() says it in one line
        if (done := _committed(output, fp)) is not None:
            return done
        _remove_partial(output, fp)
        raise
    except Exception as e:
        if _interrupted(e):  # a Ctrl-C inside a DoFn, which the local runner re-raises as a RuntimeError
            if (done := _committed(output, fp)) is not None:
                return done
            _remove_partial(output, fp)
            raise KeyboardInterrupt from None
        _remove_partial(output, fp)
        cause = _write_cause(e)
        if cause is None:
            raise
        code = errno.errorcode.get(cause.errno, type(cause).__name__)
        where = f", {cause.filename}" if cause.filename else ""
        raise OutputWriteError(
            f"prepare: writing {output} failed: {cause.strerror or cause} ({code}{where}); its temporary files "
            "were removed and no manifest was written; free space (or fix the permissions, or choose another "
            "--output) and rerun"
        ) from None
    if empty.exists():  # no records: the run's summary, never a manifest.json a loader or a rerun would trust
        result = json.loads(empty.read_text())
        empty.unlink(missing_ok=True)
        failed = result["sources"]["failed"]
        why = f"; first failure: {failed[0]}" if failed else ""
        cur = result.get("curation")
        if cur is not None:  # the curation report is written all the same: it says why nothing is left
            why += (f"; curation dropped {len(cur['dropped'])} clip(s) or span(s): see {output}/"
                    f"{cur['contact_sheet']} and {cur['clips']}, or relax --curate's thresholds")
        raise NoClipsError(
            f"prepare: no clips from {len(files)} source(s) (stats {result['stats']}{why}); check "
            "--clip-seconds/--min-seconds, the filters and the encoders; no shards or manifest were written"
        )
    return mf.read_manifest(output)


def _committed(output: str, fp: str) -> dict[str, Any] | None:
    """After a Ctrl-C / SIGTERM: this run's manifest, if the run had already committed it (the Manifest step ran
    on a worker just before the signal reached the launcher), with what the step had not yet tidied removed; None
    if it had not. A signal that late stops nothing: the output is complete (it was reported as interrupted, with
    'no new manifest.json was written', though the earlier output had been replaced)."""
    if not up_to_date(output, {mf.FORMAT: fp}):
        return None
    m = mf.read_manifest(output)
    _tidy(output, m)
    log.warning("prepare: stopped after its output was complete (%s/manifest.json written): kept", output)
    return m


def _tidy(output: str, m: dict[str, Any]) -> list[str]:
    """Remove from `output` what its committed manifest `m` does not describe: temporary files and unlisted shards
    (manifest.clean_stale), and curation report files (curate.report.stale_names: a no-clips run's, or a curated
    run's under a plain one); returns their names. After a complete run, a run stopped after its commit, and a
    rerun that finds the output up to date."""
    removed = mf.clean_stale(output, {s["path"] for s in m["shards"]})
    for name in curate_report.stale_names(m.get("curation") is not None):
        p = epath.Path(output) / name
        if p.exists():
            p.unlink()
            removed.append(name)
    return removed


def _check_writable(output: str) -> None:
    """OutputWriteError (exit 4) unless a file can be created and deleted in `output`: before any decoding, not
    after all of it (`--output=/proc` was a traceback once the shards were written)."""
    probe = epath.Path(output) / f"{mf.TMP_PREFIX}probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputWriteError(f"prepare: --output={output}: cannot write in it ({e.strerror or e}); choose another "
                               "--output (or fix its permissions)") from None


def _remove_partial(output: str, fp: str) -> None:
    """After a failed or interrupted run: its temporary files and the shards it committed but no manifest lists
    (nothing reads them, they only take space); an earlier output in `output` is left whole."""
    try:
        mf.remove_temporary(output)
        mf.remove_run_shards(output, fp)
    except OSError as e:  # the run's own failure is what the user must see
        log.warning("prepare: could not remove this run's partial files from %s: %s", output, e)


def _check_curation(cfg: IngestConfig, curate: curate_plan.CurateConfig | None) -> None:
    """One line naming the flag: --crop=face without its stages or --size; a --syncnet-weights file missing."""
    if cfg.crop == "face" and (curate is None or "crop" not in curate.stages):
        raise InputError("--crop=face: the face crop is a curation stage; add --curate (or --curate=faces,crop)")
    if cfg.crop == "face" and cfg.size is None:
        raise InputError("--crop=face: needs --size=WxH (the crop's size, e.g. 720x1280)")
    w = curate.syncnet_weights if curate is not None else None
    if w and not epath.Path(w).is_file():
        what = "a directory, not a file" if epath.Path(w).is_dir() else "no such file"
        raise InputError(f"--syncnet-weights={w}: {what} (SyncNet's syncnet_v2.model or a safetensors "
                         "file with its keys; docs/eval.md says where to get it)")
    if w and curate is not None and curate.on("sync"):  # a file that is not SyncNet's: refused before decoding
        from data_pipeline.curate import sync

        sync.check_weights(w)


def _pipeline(p: beam.Pipeline, batches: list[list[str]], cfg: IngestConfig, root: str, tfio_python: str | None,
              held_bytes: int, records_per_shard: int, output: str, listed_failed: list[isolation.Failure],
              num_sources: int, fp: str, curate: curate_plan.CurateConfig | None = None) -> None:
    """The Beam graph of `run`, in the subset every runner here executes (Create, ParDo, GroupByKey,
    CoGroupByKey, Flatten; no side inputs, no tagged outputs: see data_pipeline.engine): (curate,) decode +
    encode the batches, drop every record of a failed source, write the shards, then manifest.json (`_finish`),
    the one sink."""
    work = p | "Sources" >> beam.Create(batches) | "Spread" >> beam.Reshuffle()
    streams = []
    if curate is not None:  # each stage maps a batch: its SourcePlans in, the same plans (or Failures) out
        start = curate_stage.StartPlan(root, cfg.clip_frames, cfg.min_frames,
                                       encoders.frame_multiple(cfg.build_encoders()[0]), cfg.seed, cfg.size)
        work = curate_stage.add_stages(work, curate, start, cfg.size is not None and cfg.crop == "face")
        streams.append(work | "Curate:summaries" >> beam.FlatMap(curate_report.summaries))
    elems = work | "Ingest" >> beam.ParDo(IngestBatch(cfg, root, tfio_python, held_bytes))
    listed = p | "ListedFailed" >> beam.Create(listed_failed)
    elems = (elems, listed, *streams) | "WithListed" >> beam.Flatten()
    # `elems` is one stream of ClipRecord, SourceReport, isolation.Failure and (--curate) curate.report.Summary
    # elements; consumers filter by type. A Failure removes every record of its source from the shard plan.
    records_kv = elems | "Records" >> beam.FlatMap(_keyed_record)
    places = (
        elems
        | "Index" >> beam.FlatMap(_index_entry)
        | "GroupIndex" >> beam.GroupByKey()
        | "PlanShards" >> beam.FlatMap(_shard_plan, records_per_shard)
    )
    written = (
        {"record": records_kv, "place": places}
        | "Join" >> beam.CoGroupByKey()
        | "Place" >> beam.FlatMap(_place)
        | "GroupShards" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(WriteShard(output, fp))
    )
    (
        (
            written | "TagShards" >> beam.Map(lambda s: (0, s)),
            elems | "TagReports" >> beam.FlatMap(_report_entry),
            p | "Start" >> beam.Create([(0, None)]),  # so the manifest step runs even with nothing to report
        )
        | "AllParts" >> beam.Flatten()
        | "GroupParts" >> beam.GroupByKey()
        | "Manifest" >> beam.Map(_finish, cfg, num_sources, fp, records_per_shard, output, root, curate)
    )


def _report_entry(e: Any) -> Iterator[tuple[int, Any]]:
    if isinstance(e, (SourceReport, isolation.Failure, curate_report.Summary)):
        yield 0, e


def source_summary(parts: Sequence[Any]) -> tuple[dict[str, int], list[str], list[str]]:
    """(stats, failed lines, notes) of the SourceReports and Failures in `parts`. A failed source counts as
    {"sources": 1, "failed_sources": 1} whatever it counted before failing, plus "failed:<stage>" per failure."""
    reports = [x for x in parts if isinstance(x, SourceReport)]
    failures = sorted({x for x in parts if isinstance(x, isolation.Failure)})
    failed = {f.source for f in failures}
    per_source = [r.stats for r in reports if r.source not in failed]
    per_source += [{"sources": 1, "failed_sources": 1} for _ in failed]
    per_source += [{f"failed:{f.stage}": 1} for f in failures]
    notes = [f"{r.source}: {n}" for r in reports for n in r.notes]
    return _sum_stats(per_source), [f.line() for f in failures], notes


def _finish(
    group: tuple[int, Iterable[Any]],
    cfg: IngestConfig,
    num_sources: int,
    fp: str,
    records_per_shard: int,
    output: str,
    root: str = "",
    curate: curate_plan.CurateConfig | None = None,
) -> None:
    parts = [x for x in group[1] if x is not None]
    shard_parts = [x for x in parts if isinstance(x, dict)]
    stats, failed, notes = source_summary(parts)
    curation, report = None, {}
    if curate is not None:
        sized = cfg.size is not None and cfg.crop == "face"
        sums = [x for x in parts if isinstance(x, curate_report.Summary)]
        failures = [x for x in parts if isinstance(x, isolation.Failure)]
        curation = curate_report.curation(sums, failures, root, curate, sized)
        report = {"contact_sheet": curate_report.contact_sheet(sums, failures, root),
                  "clips": curate_report.clips_jsonl(sums, failures)}
    m = build_manifest(shard_parts, stats, failed, cfg, num_sources, fp, records_per_shard, notes, curation)
    if curation is not None:  # the report first: a manifest never names a file that is not there
        names = curate_report.report_names(m["num_records"] > 0)  # never over an earlier complete output's
        for key, name in zip(("contact_sheet", "clips"), names, strict=True):
            mf.atomic_write_bytes(epath.Path(output) / name, report[key])
            curation[key] = name
    if m["num_records"] == 0:  # `run` reports it; an earlier output's manifest.json, shards and report stay
        mf.atomic_write_bytes(epath.Path(output) / EMPTY_RESULT, json.dumps(m).encode())
        return
    previous = mf.read_buckets_manifest(output)  # a bucketed dataset this one-shape output replaces
    mf.write_manifest(output, m)
    removed = _tidy(output, m) + mf.remove_replaced_buckets(output, previous, set())
    if removed:
        log.info("removed stale files from %s: %s", output, removed)


def main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    engine.quiet_logs()  # Beam's and Dask's INFO lines: a user reads prepare's own
    try:
        _main(argv)
    except KeyboardInterrupt:
        what, error = ("stopped by SIGTERM", Terminated) if _SIGTERM else ("interrupted (Ctrl-C)", Interrupted)
        raise error(
            f"{what}: the run (and any Dask cluster it started) stopped and its temporary files "
            f"were removed; no new manifest.json was written to {FLAGS.output}; rerun the same command"
        ) from None


_SIGTERM: list[int] = []


def stop_on_sigterm() -> None:
    """The CLI's SIGTERM handler (a batch scheduler's stop): recorded, then handled as a Ctrl-C (SIGINT raised
    in this process), so the engine stops its Dask cluster and the run removes its temporary files the same way;
    `main` says which signal it was (exit 143). Without it SIGTERM killed prepare outright: the workers were
    left to die with their parent and multiprocessing warned of leaked semaphores."""

    def on_sigterm(signum: int, frame: Any) -> None:
        if _SIGTERM:  # a scheduler may send it again: the stop under way is not interrupted
            return
        _SIGTERM.append(signum)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)


def _main(argv: Sequence[str]) -> None:
    check_storage(FLAGS.input, FLAGS.output)  # gs:// preflight: one line, not a traceback
    from data_pipeline import buckets
    from data_pipeline.prepare_flags import bucket_lists

    seconds, sizes = bucket_lists()
    if len(seconds) > 1 or (sizes is not None and len(sizes) > 1):  # shape buckets: one sub-dataset each
        top = buckets.run(FLAGS.input, FLAGS.output, config_from_flags(), seconds, sizes, **_run_kwargs(argv))
        print(buckets.summary(top, FLAGS.output))
        return
    m = _run_from_flags(argv)  # a MirageError (NoClipsError, a user's input or flag): one line, exit 2
    print(summary(m, FLAGS.output))


def summary(m: dict[str, Any], output: str) -> str:
    """prepare's closing report: records, stats, then every failed source and every note, one per line."""
    lines = [f"{output}: {m['num_records']} records in {len(m['shards'])} shard(s); stats {m['stats']}"]
    src = m.get("sources", {})
    cur = m.get("curation")
    if cur is not None:
        by_stage = {k: v["dropped"] for k, v in cur["counts"].items()}
        lines.append(f"  curation: {cur['kept_clips']} clips kept, dropped per stage {by_stage}, "
                     f"{len(cur['dropped'])} drops with reasons in manifest.json; look at "
                     f"{output}/{cur['contact_sheet']}")
    lines += [f"  FAILED {line}" for line in src.get("failed", [])]
    lines += [f"  note: {line}" for line in src.get("notes", [])]
    return "\n".join(lines)


def _run_kwargs(argv: Sequence[str]) -> dict[str, Any]:
    check_runner_flags(FLAGS.runner, FLAGS["workers"].present, FLAGS.dask_address)  # one line, before any work
    return dict(
        runner=FLAGS.runner,
        records_per_shard=FLAGS.records_per_shard,
        batch_sources=FLAGS.batch_sources,
        tfio_python=FLAGS.tfio_python,
        force=FLAGS.force,
        beam_args=list(argv[1:]),
        held_bytes=FLAGS.max_held_mb << 20,
        workers=FLAGS.workers,
        dask_address=FLAGS.dask_address,
        curate=curate_from_flags(),
    )


def _run_from_flags(argv: Sequence[str]) -> dict[str, Any]:
    return run(FLAGS.input, FLAGS.output, config_from_flags(), **_run_kwargs(argv))


if __name__ == "__main__":
    # Run through the imported module so Beam pickles the DoFns by reference, not as __main__ objects.
    from data_pipeline import prepare as _prepare
    from data_pipeline import prepare_flags

    prepare_flags.define_flags()
    flags.adopt_module_key_flags(prepare_flags)  # so --help lists them
    prepare_flags.bare_curate(sys.argv)  # a bare --curate means every stage (absl wants a value)
    # absl stops at `--`: what follows reaches main() as Beam pipeline flags
    from mirage_base import cli  # not `import run`: this module has its own run() (the pipeline)

    # a user's mistake is a MirageError (or a missing --input: FileNotFoundError): one line, exit 2; anything
    # else is a bug and keeps its traceback (exit 1)
    # Ctrl-C is one line too (Interrupted, exit 130), leaving through os._exit: the stopped cluster's threads
    # cannot print after it
    def main_then_done(argv: Sequence[str]) -> None:
        _prepare.main(argv)
        # the output is complete (manifest.json written last): a Ctrl-C from here on (the interpreter's exit, Dask's
        # atexit cluster shutdown) has nothing left to stop, and would print a KeyboardInterrupt traceback there
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    _prepare.stop_on_sigterm()
    cli.run(main_then_done, "prepare", also={FileNotFoundError: (ExitCode.REFUSED, "")}, hard_exit=(Interrupted,))
