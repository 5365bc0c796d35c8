"""prepare on the Dask engine: clips/s with 1 and 2 worker processes, and the cost per source second of extra
prepare stages (curation) against plain prepare.

    python -m bench.curation [--sources=16] [--seconds=8] [--size=128x128] [--workers=1,2] [--rounds=3]
        [--worker_threads=1] [--prepare_args="--curate"] [--footage=faces|synthetic] [--input=DIR] [--json]
    python -m bench --only=curation

Footage (`--footage`): `faces` (the default) is real-face A-roll built from scikit-image's photographs
(tests/curation_footage.talking_heads: one speaker drifting over a texture, a cut half-way in every other
source, 320x180), which curation keeps, so a curated run does all of its stages and then ingests;
`synthetic` is the drawn talking heads (`data_pipeline.synthesize`; moving noise + a tone without espeak-ng),
in which OpenCV's face detector finds no face (`--curate` would drop every clip: use it for plain prepare or
stages without `faces`); or the sources in `--input`. Each configuration is one
`python -m data_pipeline.prepare --runner=dask --workers=W --force` child process (Dask cluster start and stop
included, as a user runs it); `plain` runs it with no extra arguments, `curated` with `--prepare_args` (skipped
when empty: then the plain runs are the measurement). Configurations alternate within every round
(W=1 plain, W=1 curated, W=2 plain, ...; the order reversed on odd rounds) and the median wall time is kept.
The cluster start + stop alone (`data_pipeline.engine.open_engine`, workers importing data_pipeline.prepare, no
pipeline) is timed the same way, so the steady-state rate, clips / (wall - start/stop), is reported next to the
end-to-end one.

Reported per configuration: clips kept, median wall s, clips/s, wall s per source second; then the speed-up of
the most workers over 1 worker (end to end and steady state), and per worker count the cost of the extra stages
(curated wall / plain wall, and extra wall s per source second). The CPU seconds of each run (the child and its
Dask processes, RUSAGE_CHILDREN) over its wall time give the cores it kept busy; from the 1-worker run's, the most
the host's cores allow N workers to gain (`scaling_bound`: cores / busy cores); and how much N processes of pure
computation gain on this host (`common.parallel_capacity`: a reference for N-process scaling, measured at the
start of every round, since a VM's neighbours move it from run to run; median reported) and the speed-up's
share of it (above 100% where prepare's processes wait on I/O, which pure computation never does).
Whether it is a claim (bench/common.host_state): the load average before the runs at most the core count, and
the CPU other processes used while they ran (common.ForeignCpu) at most 0.1 cores; the load after is recorded,
not used (2 workers on 2 cores put it at 2 by themselves). Prints one JSON object with --json.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench import common
from data_pipeline import engine

TARGET = 1.6  # issue 30: 2 workers / 1 worker, curated clips/s end to end
SOURCES, WORKER_THREADS = 16, 1  # the measured default: process scaling over 16 sources (bench/results.md 7d)

_ENGINE_ONLY = """
import importlib, sys, time
from apache_beam.runners.dask.dask_runner import DaskOptions
from dask.distributed import Client
from data_pipeline import engine
t0 = time.perf_counter()
with engine.open_engine("dask", workers=int(sys.argv[1])) as e:
    with Client(e.options.view_as(DaskOptions).address) as c:  # the workers import what prepare's tasks need
        c.run(importlib.import_module, "data_pipeline.prepare")
print(time.perf_counter() - t0)
"""


def child_env(worker_threads: int | None = None) -> dict[str, str]:
    """This environment for a benchmark's child process: CPU JAX, this repository importable; with
    `worker_threads`, each Dask worker's OpenCV / FFmpeg threads (engine.THREADS_ENV)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = common.ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if worker_threads is not None:
        env[engine.THREADS_ENV] = str(worker_threads)
    return env


def write_footage(out: str, sources: int, seconds: float, size: tuple[int, int], footage: str = "synthetic") -> str:
    """`sources` clips of `seconds` under `out`: real-face footage (`faces`, 320x180), or synthetic talking heads
    at `size` if espeak-ng is installed, else noise."""
    from data_pipeline.synthetic import speech

    if footage == "faces":
        from tests import curation_footage

        os.makedirs(out, exist_ok=True)
        curation_footage.talking_heads(out, sources, seconds)
    elif speech.espeak_available():
        from data_pipeline.synthesize import synthesize

        synthesize(out, clips=sources, seconds=seconds, seed=0, size=size, progress=False)
    else:
        from bench.prepare import write_sources

        write_sources(out, sources, seconds, size)
    return out


def source_seconds(src: str) -> float:
    """Total duration of the videos under `src` (seconds, from the containers)."""
    import av

    from data_pipeline.ingest.per_source import list_sources

    total = 0.0
    for p in list_sources(src):
        with av.open(p) as c:
            total += float(c.duration or 0) / 1e6
    return total


def run_prepare(src: str, out: str, workers: int, extra: Sequence[str],
                worker_threads: int | None = None) -> tuple[float, int, float]:
    """Wall seconds of one `python -m data_pipeline.prepare --runner=dask` child, the clips it kept, and the CPU
    seconds (user + system) that the child and every process it waited for (its Dask scheduler thread, Nanny and
    worker processes) used: the kernel's RUSAGE_CHILDREN, which adds a reaped process's descendants' time to it."""
    cmd = [sys.executable, "-m", "data_pipeline.prepare", f"--input={src}", f"--output={out}", "--runner=dask",
           f"--workers={workers}", "--force", *extra]
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=common.ROOT, env=child_env(worker_threads), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    with open(os.path.join(out, "manifest.json")) as f:
        return dt, int(json.load(f)["num_records"]), cpu


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def scaling_bound(cores: int, busy_cores_one: float) -> float:
    """The most `cores` can speed up a run that keeps `busy_cores_one` cores busy on average with one worker, if
    more workers do the same CPU work (Amdahl's bound with the whole run parallel): cores / busy_cores_one. The
    one-worker run's own library threads (OpenCV, FFmpeg) already use part of the other cores."""
    return cores / max(busy_cores_one, 1e-9)


def engine_start_stop(workers: int, worker_threads: int | None = None) -> float:
    """Seconds a child spends starting a LocalCluster of `workers` processes, importing data_pipeline.prepare in
    each worker, and stopping it (no pipeline)."""
    p = subprocess.run([sys.executable, "-c", _ENGINE_ONLY, str(workers)], cwd=common.ROOT,
                       env=child_env(worker_threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"cluster start/stop failed: {p.stderr[-2000:]}")
    return float(p.stdout.strip().splitlines()[-1])


def measure(sources: int = 16, seconds: float = 10.0, size: tuple[int, int] = (128, 128),
            workers: Sequence[int] = (1, 2), rounds: int = 3, prepare_args: Sequence[str] = (),
            clip_seconds: float = 2.0, input_dir: str | None = None, footage: str = "synthetic",
            worker_threads: int | None = None) -> dict[str, Any]:
    """The benchmark (see the module docstring); returns the JSON-able result. `worker_threads`: OpenCV / FFmpeg
    threads per Dask worker (engine.THREADS_ENV) for every worker count, e.g. 1 to time process scaling alone;
    None: prepare's default budget (cores // workers), or what THREADS_ENV already says."""
    extra_plain = [f"--clip-seconds={clip_seconds}"] + ([] if input_dir else [f"--size={size[0]}x{size[1]}"])
    kinds = {"plain": extra_plain}
    if prepare_args:
        kinds["curated"] = [*extra_plain, *prepare_args]
    with tempfile.TemporaryDirectory(prefix="bench-curation-") as tmp:
        src = input_dir or write_footage(os.path.join(tmp, "src"), sources, seconds, size, footage)
        total_s = source_seconds(src)
        configs = [(k, w) for w in workers for k in kinds]
        walls: dict[str, list[float]] = {f"{k}-{w}": [] for k, w in configs}
        cpus: dict[str, list[float]] = {f"{k}-{w}": [] for k, w in configs}
        startup: dict[int, list[float]] = {w: [] for w in workers}
        clips: dict[str, int] = {}
        load_before = common.load_average()
        capacities: list[float] = []  # the host's own N-process ceiling, once a round: a VM's neighbours move it
        with common.ForeignCpu() as foreign:  # N workers fill N cores: the load after counts them
            for r in range(rounds):
                if len(workers) > 1:
                    capacities.append(common.parallel_capacity(max(workers)))
                for k, w in configs if r % 2 == 0 else configs[::-1]:
                    dt, n, cpu = run_prepare(src, os.path.join(tmp, f"out-{k}-{w}"), w, kinds[k], worker_threads)
                    walls[f"{k}-{w}"].append(dt)
                    cpus[f"{k}-{w}"].append(cpu)
                    clips[f"{k}-{w}"] = n
                for w in workers if r % 2 == 0 else workers[::-1]:
                    startup[w].append(engine_start_stop(w, worker_threads))
        capacity = statistics.median(capacities) if capacities else None
        host = common.host_state(load_before, common.load_average(), foreign_cores=foreign.cores)
    rows = []
    for k, w in configs:
        name = f"{k}-{w}"
        wall, start = statistics.median(walls[name]), statistics.median(startup[w])
        busy = statistics.median(c / t for c, t in zip(cpus[name], walls[name], strict=True))
        rows.append({"config": name, "stages": k, "workers": w, "clips": clips[name], "wall_s": wall,
                     "wall_s_all": walls[name], "cpu_s": statistics.median(cpus[name]), "busy_cores": busy,
                     "start_stop_s": start, "clips_per_s": clips[name] / wall,
                     "steady_clips_per_s": clips[name] / max(wall - start, 1e-9),
                     "wall_s_per_source_s": wall / total_s})
    by = {row["config"]: row for row in rows}
    main_kind = "curated" if prepare_args else "plain"
    lo, hi = min(workers), max(workers)
    out: dict[str, Any] = {
        "setup": {"sources": sources if not input_dir else None, "source_seconds": total_s, "size": list(size),
                  "clip_seconds": clip_seconds, "workers": list(workers), "rounds": rounds,
                  "prepare_args": list(prepare_args), "input": input_dir or footage,
                  "worker_threads": child_env(worker_threads).get(engine.THREADS_ENV) or "cores // workers"},
        "rows": rows, "host": host, "parallel_capacity": capacity, "parallel_capacity_all": capacities,
    }
    if hi != lo:
        a, b = by[f"{main_kind}-{hi}"], by[f"{main_kind}-{lo}"]
        end_to_end = a["clips_per_s"] / b["clips_per_s"]
        out["speedup"] = {"stages": main_kind, "workers": [lo, hi], "end_to_end": end_to_end,
                          "steady": a["steady_clips_per_s"] / b["steady_clips_per_s"],
                          "cpu_ratio": a["cpu_s"] / b["cpu_s"],
                          "bound": scaling_bound(host["cores"], b["busy_cores"]) if lo == 1 else None,
                          "of_capacity": end_to_end / capacity if capacity else None}
    if prepare_args:
        out["curation_cost"] = []
        for w in workers:
            cur, plain = by[f"curated-{w}"], by[f"plain-{w}"]
            out["curation_cost"].append({
                "workers": w, "wall_ratio": cur["wall_s"] / plain["wall_s"],
                "extra_s_per_source_s": cur["wall_s_per_source_s"] - plain["wall_s_per_source_s"],
            })
    return out


def report(r: dict[str, Any]) -> list[str]:
    """The results.md section for a `measure` result."""
    s = r["setup"]
    extra = " ".join(s["prepare_args"]) or "(none: plain prepare only)"
    out = [
        "## 7. Data preparation on Dask: clips/s by worker processes, and the cost of curation",
        "",
        f"`python -m data_pipeline.prepare --runner=dask --workers=W` as a child process per run (cluster start "
        f"and stop included), {s['source_seconds']:.0f} s of {s['input']} footage, {s['clip_seconds']} s clips, "
        f"{s['rounds']} alternating rounds, median wall time; curated runs add: {extra}; OpenCV / FFmpeg threads "
        f"per worker (MIRAGE_WORKER_THREADS): {s.get('worker_threads', 'not recorded')}.",
        "",
        common.host_line(r),
        "",
        "| config | clips | wall s | cluster start+stop s | clips/s | steady clips/s | wall s per source s | CPU s "
        "| cores busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out += [f"| {x['config']} | {x['clips']} | {x['wall_s']:.2f} | {x['start_stop_s']:.2f} | {x['clips_per_s']:.2f} "
            f"| {x['steady_clips_per_s']:.2f} | {x['wall_s_per_source_s']:.3f} | {_opt(x.get('cpu_s'))} "
            f"| {_opt(x.get('busy_cores'))} |" for x in r["rows"]]
    out.append("")
    sp = r.get("speedup")
    if sp:
        lo, hi = sp["workers"]
        e2e, met = common.against_target(sp["end_to_end"], TARGET)
        out.append(f"{hi} workers / {lo} worker ({sp['stages']}): {e2e}x clips/s end to end "
                   f"(target >= {TARGET}: {met}), {sp['steady']:.2f}x without the cluster's start and stop.")
        if sp.get("bound"):
            one = next(x for x in r["rows"] if x["config"] == f"{sp['stages']}-{lo}")
            out.append(f"Bound on this host: {lo} worker keeps {one['busy_cores']:.2f} of {r['host']['cores']} cores "
                       f"busy (CPU s / wall s of the run, its workers included), so {hi} workers can be at most "
                       f"{sp['bound']:.2f}x faster doing the same CPU work (cores / busy cores); they used "
                       f"{sp['cpu_ratio']:.2f}x its CPU seconds.")
        if r.get("parallel_capacity"):
            each = r.get("parallel_capacity_all")
            when = (f"median of one measurement per round: {', '.join(f'{c:.2f}' for c in each)}" if each
                    else "measured once, before the runs")
            out.append(f"This host runs {hi} processes of pure computation at {r['parallel_capacity']:.2f}x the "
                       f"throughput of one (`bench.common.parallel_capacity`, {when}); {hi} workers reached "
                       f"{sp['end_to_end'] / r['parallel_capacity']:.0%} of it end to end.")
    for c in r.get("curation_cost", []):
        out.append(f"Curation with {c['workers']} worker(s): {c['wall_ratio']:.2f}x the wall time of plain prepare, "
                   f"{c['extra_s_per_source_s']:+.3f} wall s per source second.")
    out.append("")
    return out


def _opt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from data_pipeline.buckets import parse_size

    F = flags.FLAGS
    r = measure(sources=F.sources, seconds=F.seconds, size=parse_size(F.size), workers=[int(w) for w in F.workers],
                rounds=F.rounds, prepare_args=shlex.split(F.prepare_args), clip_seconds=F.clip_seconds,
                input_dir=F.input, footage=F.footage, worker_threads=F.worker_threads or None)
    if F.json:
        print(json.dumps(r, indent=1))
        return
    print("\n".join(report(r)))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("sources", SOURCES, "Sources to write (ignored with --input).")
    flags.DEFINE_float("seconds", 8.0, "Seconds per source written.")
    flags.DEFINE_string("size", "128x128", "prepare's --size WxH (with --curate: the face crop's size); also the "
                        "synthetic footage's frame size.")
    flags.DEFINE_enum("footage", "faces", ["faces", "synthetic"], "Footage to write (see the module docstring).")
    flags.DEFINE_list("workers", ["1", "2"], "Dask worker process counts to compare.")
    flags.DEFINE_integer("worker_threads", WORKER_THREADS, "OpenCV / FFmpeg threads per Dask worker whatever the "
                         "worker count (1: process scaling alone, the target's measure); 0: prepare's default budget, "
                         "cores // workers (a lone worker's libraries then use every core).")
    flags.DEFINE_integer("rounds", 3, "Alternating rounds (median reported).")
    flags.DEFINE_float("clip_seconds", 2.0, "prepare --clip-seconds.")
    flags.DEFINE_string("prepare_args", "--curate", "Extra prepare flags of the curated runs (one shell-quoted "
                        "string; default every curation stage but sync, which needs --syncnet-weights); empty: only "
                        "plain prepare is timed.")
    flags.DEFINE_string("input", None, "Time these sources instead of writing footage.")
    flags.DEFINE_bool("json", False, "Print the JSON result.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)
