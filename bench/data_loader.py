"""Data loader throughput: the Grain loader (decode, crop, batch; in-process and with worker processes)
against raw ArrayRecord reads of the same shards (each record decompressed to its safetensors bytes, as the loader
must; not parsed), in one run; and the elastic order (`make_loader`, index-
based global batches) against the loader it replaced (a Grain chain shuffle -> repeat -> per-process stride
-> random_map -> batch, rebuilt here as `legacy_loader`), same records, workers and threads (target >= 0.9x).

    python -m bench.data_loader --data=DIR [--batch=8] [--batches=50] [--workers=0,2] [--json]
    python -m bench.data_loader --synthesize=6        # make a small dataset in a temp dir first
    python -m bench.data_loader --gcs --synthesize=2 --batch=2 --batches=4   # gs:// (emulator) vs local disk

Prints records/s and MB/s (of record bytes) per configuration, or a JSON list with --json.
`loader_vs_step` (run by `python -m bench`) compares the loader's samples/s with the samples/s the tiny
config's train step consumes, alternating the two: a ratio above 1 means the loader keeps up.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordReader

from bench import common

FLAGS = flags.FLAGS


def bench_raw(paths: list[str], counts: list[int], records: int) -> dict:
    """Sequential raw reads of up to `records` records, each as its safetensors bytes (a v2 shard's zstd frame
    decompressed, as ArrayRecord decompressed v1's chunks; no parsing); MB counts those bytes."""
    from data_pipeline.dataset.records import plain_bytes

    t0, n, nbytes = time.perf_counter(), 0, 0
    while n < records:
        for p in paths:
            r = ArrayRecordReader(p)
            for rec in r.read_all():
                nbytes += len(plain_bytes(rec))
                n += 1
                if n >= records:
                    break
            r.close()
            if n >= records:
                break
    dt = time.perf_counter() - t0
    return {
        "config": "raw read+decompress",
        "workers": 0,
        "records": n,
        "seconds": dt,
        "records_per_s": n / dt,
        "MB_per_s": nbytes / dt / 1e6,
    }


def legacy_loader(data: str, batch: int, workers: int, seed: int = 0, read_threads: int = 4) -> Any:
    """The loader before the elastic order (per-process Grain iterator state), for comparison only."""
    import grain

    from data_pipeline.loader import grain_loader as L
    from data_pipeline.loader.examples import DecodeCrop
    from data_pipeline.loader.shards import ShardSource, resolve_shards
    from mirage_base.time_map import of_manifest

    shards = resolve_shards(data, "sha256")
    m = shards.manifest
    tm = of_manifest(m)  # the same crop as make_loader's: only the order and its state differ
    src = ShardSource(shards.paths, shards.counts)
    ds = grain.MapDataset.source(src).shuffle(seed=seed).repeat(None)[0::1]
    ds = ds.random_map(DecodeCrop(src, tm.covered_frames(int(m["clip_frames"])), tm, 8), seed=seed)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(batch * 2, 8)))
    it = it.batch(batch, drop_remainder=True)
    if workers > 0:
        L._ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return it


def bench_loader(data: str, batch: int, batches: int, workers: int, mean_record_bytes: float,
                 legacy: bool = False) -> dict:
    """Loader batches/s after one warm-up batch (worker start-up excluded)."""
    from data_pipeline.loader.grain_loader import make_loader

    if legacy:
        ds = legacy_loader(data, batch, workers)
    else:
        ds = make_loader(data, global_batch_size=batch, seed=0, worker_count=workers, process_index=0,
                         process_count=1, slow_batch_warn_s=0)
    it = iter(ds)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    n = batches * batch
    return {
        "config": "legacy loader" if legacy else "grain loader",
        "workers": workers,
        "records": n,
        "seconds": dt,
        "records_per_s": n / dt,
        "MB_per_s": n * mean_record_bytes / dt / 1e6,
    }


def prepare_dataset(directory: str, clips: int, seconds: float = 3.0, clip_seconds: float = 2.0) -> str:
    """Synthesize `clips` talking-head clips (64x64) and prepare them into shards; returns the shard dir."""
    from data_pipeline.ingest.per_source import IngestConfig
    from data_pipeline.prepare import run
    from data_pipeline.synthesize import synthesize

    synthesize(os.path.join(directory, "raw"), clips, seconds, 0, (64, 64), progress=False)
    data = os.path.join(directory, "prepared")
    run(os.path.join(directory, "raw"), data, IngestConfig(clip_seconds=clip_seconds), progress=False)
    return data


def loader_vs_step(data: str | None = None, clips: int = 8, batch: int = 8, rounds: int = 3,
                   batches_per_round: int = 4, step_overrides: dict | None = None) -> dict:
    """Loader samples/s (in-process Grain loader, 2 s records of the tiny config's shapes) vs the samples/s
    of the tiny config's real train step at the same global batch, timed alternately."""
    from bench import common

    tmp = None
    if data is None:
        tmp = tempfile.mkdtemp(prefix="bench-data-")
        data = prepare_dataset(tmp, clips)
    from data_pipeline.loader.grain_loader import make_loader

    overrides = {"train.global_batch_size": batch, **(step_overrides or {})}
    step = common.RealStep(common.tiny_config(overrides))
    frames = step.setup.run_cfg.shapes.audio_frames
    it = iter(make_loader(data, global_batch_size=batch, clip_frames=frames, seed=0, worker_count=0,
                          process_index=0, process_count=1, slow_batch_warn_s=0))
    next(it)
    step.compile()
    step.run()

    def load() -> None:
        for _ in range(batches_per_round):
            next(it)

    times = common.alternate({"loader": load, "step": step.run}, rounds)
    it.close() if hasattr(it, "close") else None
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    loader_sps = batch * batches_per_round / common.median(times["loader"])
    step_sps = batch / common.median(times["step"])
    return {"loader_samples_per_s": loader_sps, "step_samples_per_s": step_sps, "ratio": loader_sps / step_sps,
            "setup": {"batch": batch, "clip_frames": frames, "workers": 0, "clips": clips,
                      "step_overrides": overrides, "rounds": rounds, "batches_per_round": batches_per_round},
            "times": times}


def gcs_vs_local(data: str | None = None, clips: int = 2, batch: int = 2, batches: int = 4) -> list[dict]:
    """Records/s of raw ArrayRecord reads and of the Grain loader (in-process), from local disk and from a
    local GCS emulator (tools/emulator.py) holding a copy of the same shards: ArrayRecord's own gs://
    reader against the local file reader. Only the emulator's HTTP path is exercised (no network latency)."""
    import fsspec

    from data_pipeline.dataset import manifest
    from tools.emulator import GcsEmulator

    if data is None:
        data = prepare_dataset(tempfile.mkdtemp(prefix="bench-data-"), clips, clip_seconds=1.0)
    m = manifest.read_manifest(data)
    counts = [s["num_records"] for s in m["shards"]]
    rows = []
    with GcsEmulator(["bench"]):
        fsspec.filesystem("gcs").put(data, "bench/data", recursive=True)
        for where, root in (("local", data), ("gcs emulator", "gs://bench/data")):
            paths = [f"{root}/{s['path']}" for s in m["shards"]]
            raw = bench_raw(paths, counts, batch * batches)
            mean_bytes = raw["MB_per_s"] * 1e6 * raw["seconds"] / raw["records"]
            for r in (raw, bench_loader(root, batch, batches, 0, mean_bytes)):
                rows.append({**r, "storage": where})
    return rows


def main(argv: Sequence[str]) -> None:
    del argv
    from data_pipeline.dataset import manifest

    data = FLAGS.data
    if FLAGS.synthesize:  # before the load is read: the timings, not the synthesis, are what it qualifies
        data = prepare_dataset(tempfile.mkdtemp(prefix="bench-data-"), FLAGS.synthesize, clip_seconds=1.0)
    if FLAGS.gcs:
        load_before = common.load_average()
        rows = gcs_vs_local(data, 2, FLAGS.batch, FLAGS.batches)
        host = common.host_state(load_before, common.load_average())
        print(json.dumps({"host": host, "rows": rows}, indent=1))
        return
    if not data:
        raise app.UsageError("pass --data=DIR (a prepare output) or --synthesize=N")
    m = manifest.read_manifest(data)
    paths = [os.path.join(data, s["path"]) for s in m["shards"]]
    counts = [s["num_records"] for s in m["shards"]]
    total = FLAGS.batches * FLAGS.batch
    load_before = common.load_average()
    rows = [bench_raw(paths, counts, total)]
    mean_bytes = rows[0]["MB_per_s"] * 1e6 * rows[0]["seconds"] / rows[0]["records"]
    for w in FLAGS.workers:
        for legacy in (True, False):
            rows.append(bench_loader(data, FLAGS.batch, FLAGS.batches, int(w), mean_bytes, legacy))
    for r in rows:
        r["vs_raw"] = r["records_per_s"] / rows[0]["records_per_s"]
        old = [o for o in rows if o["config"] == "legacy loader" and o["workers"] == r["workers"]]
        if r["config"] == "grain loader" and old:
            r["vs_legacy"] = r["records_per_s"] / old[0]["records_per_s"]
    host = common.host_state(load_before, common.load_average())
    if FLAGS.json:
        print(json.dumps({"host": host, "rows": rows}, indent=1))
        return
    print(
        f"{m['num_records']} records in {len(paths)} shards, {mean_bytes / 1e6:.2f} MB/record, "
        f"batch {FLAGS.batch}"
    )
    print(common.host_line({"host": host}))
    print(f"{'config':<24}{'workers':>8}{'records/s':>12}{'MB/s':>10}{'vs raw':>9}{'vs legacy':>11}")
    for r in rows:
        vs_legacy = f"{r['vs_legacy']:>11.2f}" if "vs_legacy" in r else ""
        print(
            f"{r['config']:<24}{r['workers']:>8}{r['records_per_s']:>12.1f}{r['MB_per_s']:>10.1f}{r['vs_raw']:>9.2f}"
            + vs_legacy
        )


if __name__ == "__main__":
    flags.DEFINE_string("data", None, "A data_pipeline.prepare output directory.")
    flags.DEFINE_integer(
        "synthesize", 0, "Synthesize N 3 s clips (1 s records) into a temp dir and use them."
    )
    flags.DEFINE_integer("batch", 8, "Global batch size.")
    flags.DEFINE_integer("batches", 50, "Batches timed per loader configuration.")
    flags.DEFINE_list("workers", ["0", "2"], "Worker counts to time (0 = in-process).")
    flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
    flags.DEFINE_bool("gcs", False, "Records/s from a local GCS emulator vs local disk (gcs_vs_local), as JSON "
                      "with the host load around the timings.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)  # --help exits 0, --a-b is --a_b
