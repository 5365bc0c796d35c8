"""prepare throughput and peak memory: this tree's data_pipeline against an older commit's, in one run.

    python -m bench.prepare [--sources=8] [--seconds=20] [--size=128x128] [--encoders=s2d,dct]
        [--runner=DirectRunner] [--repeats=2] [--long-seconds=600] [--long-size=320x240] [--old=REV] [--json]

Writes synthetic H.264 + AAC sources (moving noise + a tone) with PyAV, then runs
`python -m data_pipeline.prepare` as a child process per (code version, encoder), alternating old and new
`--repeats` times: throughput is source seconds per wall second of the whole child (Beam start-up
included), the median over repeats. The old code is `git archive REV data_pipeline` in a temp dir.
Then one long source (`--long-seconds`, 1 s clips) goes through each version's `ingest_source` alone (a
child process that drops each record as it comes: Beam's in-process runner buffers every finished record
before the shard write, which is not per-source memory) and the child's peak RSS (`os.wait4`) is reported;
the new code runs with `held_bytes=--long-held-mb` MiB so its frame budget binds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_DEFAULT = "3a5e92f"  # main before issue 18 (display rotation, geometry, bounded held frames)


def write_sources(out: str, count: int, seconds: float, size: tuple[int, int], seed: int = 0) -> list[str]:
    """`count` mp4s (H.264 + AAC, streamed: any length) of moving noise and a 220 Hz tone, `seconds` long."""
    import av

    from data_pipeline.ingest import media

    os.makedirs(out, exist_ok=True)
    w, h = size
    base = np.random.default_rng(seed).integers(0, 256, (h, w * 2, 3), np.uint8)
    n = int(round(seconds * media.FPS))
    paths = []
    for i in range(count):
        p = os.path.join(out, f"src_{i:03d}.mp4")
        with av.open(p, "w") as c:
            vs = c.add_stream("libx264", rate=media.FPS, options={"crf": "28", "preset": "veryfast"})
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            aus = c.add_stream("aac", rate=media.SAMPLE_RATE, layout="mono")
            for k in range(n):
                f = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(base, 2 * k + i, axis=1)[:, :w]), "rgb24")
                f.pts = k
                c.mux(vs.encode(f))
            c.mux(vs.encode())
            for s in range(0, n * media.HOP, 1024):
                t = np.arange(s, min(s + 1024, n * media.HOP)) / media.SAMPLE_RATE
                wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None]
                a = av.AudioFrame.from_ndarray(wave, "fltp", "mono")
                a.sample_rate, a.pts = media.SAMPLE_RATE, s
                c.mux(aus.encode(a))
            c.mux(aus.encode())
        paths.append(p)
    return paths


def export_old(rev: str, dest: str) -> str:
    """`data_pipeline` as of git revision `rev`, extracted under `dest`."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "data_pipeline"], capture_output=True, check=True)
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


def run_prepare(tree: str, args: Sequence[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one `python -m data_pipeline.prepare` child run from `tree`."""
    env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.prepare", *args], cwd=tree, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare in {tree} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return dt, usage.ru_maxrss * 1024  # KiB on Linux


_INGEST = """
import inspect, sys
from data_pipeline.ingest.per_source import IngestConfig, ingest_source
cfg = IngestConfig(clip_seconds=1.0)
kw = {"held_bytes": int(sys.argv[2])} if "held_bytes" in inspect.signature(ingest_source).parameters else {}
print(sum(1 for _ in ingest_source(sys.argv[1], cfg, cfg.build_encoders(), **kw)))
"""


def run_ingest(tree: str, path: str, held_bytes: int) -> tuple[float, int]:
    """Wall seconds and peak RSS of a child that runs `tree`'s ingest_source over one source, dropping
    each record as it comes (the per-source memory, without Beam's buffers of finished records)."""
    env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _INGEST, path, str(held_bytes)], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"ingest in {tree} failed: {stderr.decode()[-2000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def main(argv: Sequence[str]) -> None:
    from data_pipeline.buckets import parse_size

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        old = export_old(FLAGS.old, os.path.join(tmp, "old"))
        trees = {"old": old, "new": ROOT}
        src = os.path.join(tmp, "src")
        write_sources(src, FLAGS.sources, FLAGS.seconds, parse_size(FLAGS.size))
        total_s = FLAGS.sources * FLAGS.seconds
        load_before = common.load_average()
        for enc in FLAGS.encoders:
            times: dict[str, list[float]] = {"old": [], "new": []}
            rss: dict[str, int] = {}
            for r in range(FLAGS.repeats):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    out = os.path.join(tmp, f"out-{name}-{enc}")
                    args = [f"--input={src}", f"--output={out}", f"--runner={FLAGS.runner}", "--clip-seconds=1",
                            f"--video-encoder={enc}", "--force"]  # fmt: skip
                    dt, peak = run_prepare(trees[name], args)
                    times[name].append(dt)
                    rss[name] = max(rss.get(name, 0), peak)
            for name in ("old", "new"):
                med = statistics.median(times[name])
                results.append({
                    "bench": "throughput", "code": name, "encoder": enc, "runner": FLAGS.runner,
                    "source_seconds": total_s, "wall_s": med, "source_s_per_wall_s": total_s / med,
                    "peak_rss_MiB": rss[name] / 2**20,
                })  # fmt: skip
            results.append({"bench": "throughput", "code": "new/old", "encoder": enc,
                            "throughput_ratio": results[-2]["wall_s"] / results[-1]["wall_s"]})  # fmt: skip
        if FLAGS.long_seconds > 0:
            long_src = os.path.join(tmp, "long")
            (path,) = write_sources(long_src, 1, FLAGS.long_seconds, parse_size(FLAGS.long_size), seed=1)
            for name in ("old", "new"):
                dt, peak = run_ingest(trees[name], path, FLAGS.long_held_mb << 20)
                results.append({
                    "bench": "long_source_ingest", "code": name, "seconds": FLAGS.long_seconds,
                    "size": FLAGS.long_size, "wall_s": dt, "source_s_per_wall_s": FLAGS.long_seconds / dt,
                    "peak_rss_MiB": peak / 2**20,
                })  # fmt: skip
        host = common.host_state(load_before, common.load_average())
    if FLAGS.json:
        print(json.dumps({"host": host, "results": results}, indent=1))
        return
    print(common.host_line({"host": host}))
    for r in results:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    flags.DEFINE_integer("sources", 8, "Sources for the throughput run.")
    flags.DEFINE_float("seconds", 20.0, "Seconds per source.")
    flags.DEFINE_string("size", "128x128", "Source frame size WxH.")
    flags.DEFINE_list("encoders", ["s2d", "dct"], "Video encoders to time.")
    flags.DEFINE_string("runner", "DirectRunner", "prepare --runner for the throughput runs.")
    flags.DEFINE_integer("repeats", 2, "Alternating old/new runs per encoder (median reported).")
    flags.DEFINE_float("long_seconds", 600.0, "Length of the long source for peak RSS (0: skip).")
    flags.DEFINE_string("long_size", "320x240", "Frame size of the long source.")
    flags.DEFINE_integer("long_held_mb", 64, "--max-held-mb for the new code on the long source.")
    flags.DEFINE_string("old", OLD_DEFAULT, "Git revision whose data_pipeline is the 'old' code.")
    flags.DEFINE_bool("json", False, "Print a JSON list.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)
