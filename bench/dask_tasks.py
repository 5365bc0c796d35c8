"""Where a `prepare --runner=dask` run spends its time: the Dask task stream of one run.

    python -m bench.dask_tasks [--workers=2] [--sources=8] [--seconds=8] [--prepare_args="--curate"] [--json]

Starts a LocalCluster of `--workers` processes the way prepare does (`data_pipeline.engine.open_engine`: one task
thread each, the same worker preload and thread budget), then runs `python -m data_pipeline.prepare
--dask-address=...` as a child on the real-face footage of bench.curation (`tests/curation_footage`), while
`dask.distributed.get_task_stream` records every task the scheduler ran. Reported: the child's wall time; the
seconds before the first task started (the launcher's start-up and graph submission) and after the last one
ended; how long 0, 1, 2, ... workers were computing at once; each worker's busy seconds; the task count by kind
(the key's name prefix); the host's average busy cores over the run (/proc/stat, `bench.common`). One run, not
alternated: a breakdown, not a comparison (bench.curation compares worker counts). The load is recorded.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench import common
from bench.curation import child_env, write_footage


def measure(workers: int = 2, sources: int = 8, seconds: float = 8.0, prepare_args: Sequence[str] = ("--curate",),
            clip_seconds: float = 2.0, size: str = "128x128") -> dict[str, Any]:
    """The breakdown of one run (see the module docstring), JSON-able."""
    from apache_beam.runners.dask.dask_runner import DaskOptions
    from dask.distributed import Client, get_task_stream

    from data_pipeline import engine

    with tempfile.TemporaryDirectory(prefix="bench-dask-tasks-") as tmp:
        src = write_footage(os.path.join(tmp, "src"), sources, seconds, (0, 0), "faces")
        load_before = common.load_average()
        t0 = time.perf_counter()
        with engine.open_engine("dask", workers=workers) as eng:
            start_s = time.perf_counter() - t0
            address = eng.options.view_as(DaskOptions).address
            cmd = [sys.executable, "-m", "data_pipeline.prepare", f"--input={src}", f"--output={tmp}/out",
                   f"--dask-address={address}", "--runner=dask", f"--clip-seconds={clip_seconds}", f"--size={size}",
                   "--force", *prepare_args]
            with Client(address) as client, get_task_stream(client) as stream, common.ForeignCpu() as cpu:
                w0 = time.time()  # the task stream's clock
                p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
                wall = time.time() - w0
            if p.returncode:
                raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
        host = common.host_state(load_before, common.load_average(), foreign_cores=cpu.cores)
    spans = [(s["start"] - w0, s["stop"] - w0, t["worker"], t["key"]) for t in stream.data
             for s in t["startstops"] if s["action"] == "compute"]
    return {"setup": {"workers": workers, "sources": sources, "source_seconds": sources * seconds,
                      "prepare_args": list(prepare_args), "worker_threads": os.environ.get(engine.THREADS_ENV)
                      or "cores // workers"},
            "cluster_start_s": start_s, "wall_s": wall, **breakdown(spans, wall, workers),
            "host_busy_cores": cpu.host_cores, "host": host}


def breakdown(spans: Sequence[tuple[float, float, str, Any]], wall: float, workers: int) -> dict[str, Any]:
    """From task spans (start s, stop s, worker, key) over a run of `wall` s on `workers` workers: seconds before
    the first task and after the last, seconds with k = 0..workers workers computing at once (k = 0 counts the
    gaps inside the run too; every k in 0..workers is listed, zero ones included), busy seconds per worker (its
    merged spans) and task counts by key prefix.

    k counts workers, not tasks: each worker's spans are merged first (the compute spans the stream records for
    one single-threaded worker's consecutive tasks can overlap by a few ms, which counted as one more worker
    computing: '2: 0.00 s' on one worker), so k cannot exceed the number of workers computing."""
    merged: list[tuple[float, float, str]] = []  # each worker's computing intervals, disjoint
    for w in sorted({w for _, _, w, _ in spans}):
        for a, b in sorted((a, b) for a, b, v, _ in spans if v == w):
            if merged and merged[-1][2] == w and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b), w)
            else:
                merged.append((a, b, w))
    events = sorted([(a, 1) for a, _, _ in merged] + [(b, -1) for _, b, _ in merged])
    at_once: dict[int, float] = dict.fromkeys(range(workers + 1), 0.0)
    level, last = 0, 0.0
    for t, d in events:
        if t > last:
            at_once[level] = at_once.get(level, 0.0) + t - last
        level, last = level + d, max(last, t)
    at_once[0] += max(0.0, wall - last)
    per_worker: dict[str, float] = collections.defaultdict(float)
    for a, b, w in merged:
        per_worker[w] += b - a
    kinds = collections.Counter((k[0] if isinstance(k, tuple) else str(k)).rsplit("-", 1)[0] for *_, k in spans)
    return {"tasks": len(spans), "before_first_s": min((a for a, *_ in spans), default=wall),
            "after_last_s": wall - max((b for _, b, *_ in spans), default=0.0),
            "seconds_with_k_busy": {str(k): v for k, v in sorted(at_once.items())},
            "busy_s_per_worker": sorted(per_worker.values()), "task_kinds": dict(kinds.most_common())}


def report(r: dict[str, Any]) -> list[str]:
    """Markdown lines for a `measure` result."""
    s = r["setup"]
    k = ", ".join(f"{n}: {v:.2f} s" for n, v in r["seconds_with_k_busy"].items())
    kinds = ", ".join(f"{n} {c}" for n, c in list(r["task_kinds"].items())[:6])
    cores = "n/a" if r["host_busy_cores"] is None else f"{r['host_busy_cores']:.2f}"
    per_worker = ", ".join(f"{b:.2f}" for b in r["busy_s_per_worker"])
    args = " ".join(s["prepare_args"]) or "(none)"
    under = sum(v for n, v in r["seconds_with_k_busy"].items() if int(n) < s["workers"])
    return [f"`python -m bench.dask_tasks --workers={s['workers']}`: {s['sources']} sources, "
            f"{s['source_seconds']:.0f} s of faces footage, prepare args {args}, OpenCV / FFmpeg threads per "
            f"worker: {s['worker_threads']}.", "", common.host_line(r), "",
            f"Cluster start {r['cluster_start_s']:.2f} s (before the run); prepare's wall {r['wall_s']:.2f} s: "
            f"{r['before_first_s']:.2f} s before the first task, {r['after_last_s']:.2f} s after the last; seconds "
            f"with k workers computing ({k}); busy s per worker {per_worker}; "
            f"host cores busy on average {cores}; {r['tasks']} tasks ({kinds}).",
            f"Fewer than {s['workers']} worker(s) computing for {under:.2f} s of the {r['wall_s']:.2f} s "
            f"({under / r['wall_s']:.0%}; plus the cluster's start).", ""]


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from data_pipeline import engine

    engine.quiet_logs()  # Beam's and Dask's INFO lines
    F = flags.FLAGS
    r = measure(workers=F.workers, sources=F.sources, seconds=F.seconds, prepare_args=shlex.split(F.prepare_args))
    print(json.dumps(r, indent=1) if F.json else "\n".join(report(r)))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("workers", 2, "Dask worker processes.")
    flags.DEFINE_integer("sources", 8, "Sources of real-face footage to write.")
    flags.DEFINE_float("seconds", 8.0, "Seconds per source.")
    flags.DEFINE_string("prepare_args", "--curate", "Extra prepare flags (one shell-quoted string).")
    flags.DEFINE_bool("json", False, "Print the JSON result.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)
