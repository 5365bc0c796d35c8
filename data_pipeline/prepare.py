"""Ingest: raw A-roll (real or synthetic mp4) -> encoded ArrayRecord shards + manifest.json, with Apache Beam.

    python -m data_pipeline.prepare --input=GLOB_OR_DIR --output=DIR [--runner=local] [--clip-seconds=2] ...

Flow: list sources -> batches of sources -> decode (PyAV; audio optionally via tensorflow-io in its own
venv) -> 25 fps clips + 16 kHz audio -> quality filters -> frozen encoders -> record bytes -> shards
(records sorted by clip id, shard i holds ranks [i * R, (i + 1) * R)) -> manifest.json last.

`--runner=local` (default) runs Beam's FnApiRunner in this process (with a progress bar);
DirectRunner, DataflowRunner, FlinkRunner, SparkRunner... are passed to Beam with any extra Beam flags
after `--` (see docs/data_pipeline.md for the Dataflow command). The same input and flags give
byte-identical shards and manifest; a rerun over a complete output with the same inputs does nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from absl import flags
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath
from tqdm import tqdm

from data_pipeline import encoders
from data_pipeline.dataset import manifest as mf
from data_pipeline.dataset import records
from data_pipeline.ingest import geometry, media, sources
from data_pipeline.ingest.per_source import DEFAULT_HELD_BYTES, IngestConfig, ingest_source, list_sources
from data_pipeline.prepare_flags import FLAGS, config_from_flags
from mirage_base.errors import ExitCode, InputError, MirageError
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
    """The OSError with one of `_WRITE_ERRNOS` in `e`'s chain (Beam re-raises a DoFn's error as a RuntimeError
    whose context is the original), or None."""
    seen: set[int] = set()
    c: BaseException | None = e
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        if isinstance(c, OSError) and c.errno in _WRITE_ERRNOS:
            return c
        c = c.__cause__ or c.__context__
    return None


class _QuietWriteErrors(logging.Filter):
    """Drops Beam's ERROR log (with traceback) of a DoFn failing on a `_WRITE_ERRNOS` error: `run` reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or _write_cause(exc) is None


logging.getLogger("apache_beam.runners.common").addFilter(_QuietWriteErrors())


def fingerprint(files: Sequence[str], cfg: IngestConfig, records_per_shard: int) -> str:
    """Identity of a run: sources (path, size, mtime) + every option that changes the output bytes."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"cfg": cfg.to_json(), "rps": records_per_shard, "format": mf.FORMAT}, sort_keys=True
        ).encode()
    )
    for f in files:
        st = epath.Path(f).stat()
        h.update(f"{f}\x00{st.length}\x00{st.mtime}\n".encode())
    return h.hexdigest()


class IngestBatch(beam.DoFn):
    """A batch of source paths -> (clip_id, record bytes); per-source stats go to the 'stats' output."""

    def __init__(self, cfg: IngestConfig, root: str, tfio_python: str | None, held_bytes: int = DEFAULT_HELD_BYTES):
        self.cfg, self.root, self.tfio_python, self.held_bytes = cfg, root, tfio_python, held_bytes

    def setup(self) -> None:
        self.encs = self.cfg.build_encoders()

    def process(self, paths: list[str]) -> Iterator[Any]:
        audio: dict[str, tuple[np.ndarray, float]] = {}
        if self.cfg.audio_backend == "tfio":
            from data_pipeline.ingest import tfio_backend

            natives = {}
            for p in paths:
                try:
                    info = media.probe(p)
                except ValueError:  # refused or unreadable: ingest_source below names it
                    continue
                x, rate, off = media.decode_audio_native(p, info.t0)
                natives[p] = (x, rate, off)
            outs = tfio_backend.resample_16k([(x, r) for x, r, _ in natives.values()], self.tfio_python)
            audio = {p: (y, natives[p][2]) for p, y in zip(natives, outs, strict=True)}
        for p in paths:
            stats: dict[str, int] = {"sources": 1}
            notes: list[str] = []
            try:
                a, off = audio.get(p, (None, None))
                for rec in ingest_source(
                    p, self.cfg, self.encs, self.root, a, off, stats, notes, held_bytes=self.held_bytes
                ):
                    yield rec.clip_id, rec.data
            except (ValueError, RuntimeError, OSError) as e:
                log.warning("skipping source %s: %s", p, e)
                stats = {"sources": 1, "failed_sources": 1}
                msg = str(e)
                yield beam.pvalue.TaggedOutput("failed", msg if msg.startswith(p) else f"{p}: {msg}")
            for n in notes:
                yield beam.pvalue.TaggedOutput("notes", f"{p}: {n}")
            yield beam.pvalue.TaggedOutput("stats", stats)
            bar = _PROGRESS.get("bar")
            if bar is not None:
                bar.update(1)


def _assign_shard(
    item: tuple[str, bytes], ranks: dict[str, int], per_shard: int
) -> tuple[int, tuple[str, bytes]]:
    return ranks[item[0]] // per_shard, item


class WriteShard(beam.DoFn):
    """(shard index, [(clip_id, bytes)]) -> shard file written atomically; yields its manifest entry."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def process(
        self, element: tuple[int, Iterable[tuple[str, bytes]]], num_shards: int
    ) -> Iterator[dict[str, Any]]:
        index, items = element
        items = sorted(items)
        ids = [i for i, _ in items]
        if len(set(ids)) != len(ids):
            raise InputError(
                f"shard {index}: duplicate clip ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}; "
                "two sources map to the same relative path"
            )
        info = mf.write_shard([b for _, b in items], self.out_dir, mf.shard_name(index, num_shards))
        shapes = _shape_union([records.decode_record(b)[0] for _, b in items])
        yield {"index": index, "shard": info.to_json(), "shapes": shapes}


def _shape_union(tensor_dicts: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tensor_dicts:
        for k, v in t.items():
            if k not in out:
                out[k] = {"shape": list(v.shape), "dtype": str(v.dtype)}
            else:
                old = out[k]["shape"]
                out[k]["shape"] = [a if a == b else None for a, b in zip(old, v.shape, strict=True)]
    return out


def _merge_shapes(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """manifest.json contents (see docs/data_pipeline.md) from the written shards."""
    shard_parts = sorted(shard_parts, key=lambda s: s["index"])
    venc, aenc, tenc = cfg.build_encoders()
    shapes = _merge_shapes(p["shapes"] for p in shard_parts)
    video_shape = shapes.get("video", {}).get("shape", [None, None, None, None])
    if shard_parts and None in video_shape[1:]:  # sources.check_sizes / --size rule this out
        raise InputError(f"prepare: records of different frame sizes (video {video_shape}); set --size=WxH")
    f = encoders.spatial_factor(venc)
    h = None if video_shape[1] is None else video_shape[1] * f
    w = None if video_shape[2] is None else video_shape[2] * f
    return {
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


def up_to_date(out_dir: str, fp: str) -> bool:
    """True if out_dir holds a complete output of exactly this run (manifest fingerprint + shard sizes)."""
    try:
        m = mf.read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        return False
    if m.get("sources", {}).get("fingerprint") != fp:
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
    files: Sequence[str] | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """Run the ingest pipeline; returns the manifest (also written to `output`/manifest.json).

    Before any decoding, sources whose clip ids or sidecars collide are set aside (both paths named in
    `sources.failed`); without `cfg.size` the sources' display sizes must agree (InputError listing them).
    `files`/`root`: the sources (and the root their ids are relative to) when a caller already chose them
    among `input_pattern`'s (one shape bucket's, `data_pipeline.buckets`); default: all of them.
    """
    files = list_sources(input_pattern) if files is None else list(files)
    root = sources.input_root(input_pattern, files) if root is None else root
    listed_bad = sources.find_collisions(files, root)
    spatial = encoders.spatial_factor(cfg.build_encoders()[0])
    geometry.get_crop(cfg.crop)  # an unknown policy is refused by name before any work
    if cfg.size is not None and (cfg.size[0] % spatial or cfg.size[1] % spatial):
        raise InputError(
            f"--size={cfg.size[0]}x{cfg.size[1]}: width and height must be multiples of the video encoder's "
            f"spatial factor {spatial}"
        )
    fp = fingerprint(files, cfg, records_per_shard)
    epath.Path(output).mkdir(parents=True, exist_ok=True)
    if not force and up_to_date(output, fp):
        print(f"{output}: up to date (same inputs and options); nothing to do. Pass --force to rewrite.")
        return mf.read_manifest(output)
    if cfg.audio_backend == "tfio":
        from data_pipeline.ingest import tfio_backend

        ok, why = tfio_backend.available(tfio_python)
        if not ok:
            raise InputError(f"--audio-backend=tfio: {why}")
    if cfg.size is None:  # one record shape: the sources' display sizes must agree
        listed_bad.update(sources.check_sizes([f for f in files if f not in listed_bad], spatial)[1])
    good = [f for f in files if f not in listed_bad]
    listed_failed = [f"{f}: {why}" for f, why in sorted(listed_bad.items())]
    for line in listed_failed:
        log.warning("skipping source %s", line)
    local = runner == "local"
    if local:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        beam_runner: Any = FnApiRunner()
        options = PipelineOptions(list(beam_args))
    else:
        beam_runner = runner
        options = PipelineOptions(["--runner", runner, *beam_args])
    result: dict[str, Any] = {}
    empty = epath.Path(output) / EMPTY_RESULT
    empty.unlink(missing_ok=True)
    bar = tqdm(total=len(good), desc="prepare", unit="source", disable=not (progress and local))
    _PROGRESS["bar"] = bar if local else None
    try:
        _pipeline(beam_runner, options, good, cfg, root, tfio_python, held_bytes, records_per_shard,
                  batch_sources, output, listed_failed, files, fp)
    except Exception as e:
        mf.remove_temporary(output)  # a partial shard of this run: nothing reads it, it only takes space
        cause = _write_cause(e)
        if cause is None:
            raise
        code = errno.errorcode.get(cause.errno, str(cause.errno))
        where = f", {cause.filename}" if cause.filename else ""
        raise OutputWriteError(
            f"prepare: writing {output} failed: {cause.strerror or cause} ({code}{where}); its temporary files "
            "were removed and no manifest was written; free space (or fix the permissions, or choose another "
            "--output) and rerun"
        ) from None
    finally:
        bar.close()
        _PROGRESS.pop("bar", None)
    if empty.exists():  # no records: the run's summary, never a manifest.json a loader or a rerun would trust
        result = json.loads(empty.read_text())
        empty.unlink(missing_ok=True)
        failed = result["sources"]["failed"]
        why = f"; first failure: {failed[0]}" if failed else ""
        raise NoClipsError(
            f"prepare: no clips from {len(files)} source(s) (stats {result['stats']}{why}); check "
            "--clip-seconds/--min-seconds, the filters and the encoders; nothing was written"
        )
    return mf.read_manifest(output)


def _pipeline(beam_runner: Any, options: PipelineOptions, good: list[str], cfg: IngestConfig, root: str,
              tfio_python: str | None, held_bytes: int, records_per_shard: int, batch_sources: int, output: str,
              listed_failed: list[str], files: list[str], fp: str) -> None:
    """The Beam pipeline of `run`: decode + encode `good`, write the shards, then manifest.json (`_finish`)."""
    with beam.Pipeline(runner=beam_runner, options=options) as p:
        srcs = p | "Sources" >> beam.Create(good) | "Spread" >> beam.Reshuffle()
        batches = srcs | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=batch_sources)
        out = batches | "Ingest" >> beam.ParDo(IngestBatch(cfg, root, tfio_python, held_bytes)).with_outputs(
            "stats", "failed", "notes", main="records"
        )
        recs = out.records
        ids = recs | "Ids" >> beam.Keys() | "AllIds" >> beam.combiners.ToList()
        ranks = ids | "Ranks" >> beam.Map(lambda xs: {cid: i for i, cid in enumerate(sorted(xs))})
        num_shards = ids | "NumShards" >> beam.Map(
            lambda xs: max(1, math.ceil(len(xs) / records_per_shard))
        )
        written = (
            recs
            | "Assign" >> beam.Map(_assign_shard, beam.pvalue.AsSingleton(ranks), records_per_shard)
            | "GroupShards" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShard(output), beam.pvalue.AsSingleton(num_shards))
        )
        listed_stats = p | "ListedStats" >> beam.Create([{"sources": 1, "failed_sources": 1}] * len(listed_failed))
        stats = (
            (out.stats, listed_stats)
            | "AllStats" >> beam.Flatten()
            | "Stats" >> beam.combiners.ToList()
            | "SumStats" >> beam.Map(_sum_stats)
        )
        listed = p | "ListedFailed" >> beam.Create(listed_failed)
        failed = (out.failed, listed) | "AllFailed" >> beam.Flatten() | "Failed" >> beam.combiners.ToList()
        notes = out.notes | "Notes" >> beam.combiners.ToList()
        (
            written
            | "AllShards" >> beam.combiners.ToList()
            | "Manifest"
            >> beam.Map(
                _finish,
                beam.pvalue.AsSingleton(stats),
                beam.pvalue.AsSingleton(failed),
                cfg,
                len(files),
                fp,
                records_per_shard,
                output,
                beam.pvalue.AsSingleton(notes),
            )
        )


def _finish(
    shard_parts: list[dict[str, Any]],
    stats: dict[str, int],
    failed: list[str],
    cfg: IngestConfig,
    num_sources: int,
    fp: str,
    records_per_shard: int,
    output: str,
    notes: Sequence[str] = (),
) -> None:
    m = build_manifest(shard_parts, stats, failed, cfg, num_sources, fp, records_per_shard, notes)
    if m["num_records"] == 0:  # `run` reports it; an earlier output's manifest.json and shards stay as they were
        mf.atomic_write_bytes(epath.Path(output) / EMPTY_RESULT, json.dumps(m).encode())
        return
    mf.write_manifest(output, m)
    removed = mf.clean_stale(output, {s["path"] for s in m["shards"]})
    if removed:
        log.info("removed stale files from %s: %s", output, removed)


def main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
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
    lines += [f"  FAILED {line}" for line in src.get("failed", [])]
    lines += [f"  note: {line}" for line in src.get("notes", [])]
    return "\n".join(lines)


def _run_kwargs(argv: Sequence[str]) -> dict[str, Any]:
    return dict(
        runner=FLAGS.runner,
        records_per_shard=FLAGS.records_per_shard,
        batch_sources=FLAGS.batch_sources,
        tfio_python=FLAGS.tfio_python,
        force=FLAGS.force,
        beam_args=list(argv[1:]),
        held_bytes=FLAGS.max_held_mb << 20,
    )


def _run_from_flags(argv: Sequence[str]) -> dict[str, Any]:
    return run(FLAGS.input, FLAGS.output, config_from_flags(), **_run_kwargs(argv))


if __name__ == "__main__":
    # Run through the imported module so Beam pickles the DoFns by reference, not as __main__ objects.
    from data_pipeline import prepare as _prepare
    from data_pipeline import prepare_flags

    prepare_flags.define_flags()
    flags.adopt_module_key_flags(prepare_flags)  # so --help lists them
    # absl stops at `--`: what follows reaches main() as Beam pipeline flags
    from mirage_base import cli  # not `import run`: this module has its own run() (the pipeline)

    # a user's mistake is a MirageError (or a missing --input: FileNotFoundError): one line, exit 2; anything
    # else is a bug and keeps its traceback (exit 1)
    cli.run(_prepare.main, "prepare", also={FileNotFoundError: (ExitCode.REFUSED, "")})
