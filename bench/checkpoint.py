"""Checkpoint save / restore GB/s of the runtime's CheckpointStore (Orbax) vs the disk's raw bandwidth.

    python -m bench.checkpoint [--json] [--compare] [--rounds=3] [--video_dim=320] [--layers=8] [--dir=/tmp]

A real TrainState (params, AdamW moments, EMA: 16 bytes per parameter) of a widened configs/tiny.py,
saved with `train.checkpoint.CheckpointStore` (async, as training does) and restored through abstract
arrays with shardings (as a resume does). Alternated in every round with raw file I/O of the same size
in the same directory:
- raw write = write + fsync of one file; raw read = read of that file after evicting it from the page
  cache (posix_fadvise DONTNEED, no root needed);
- save: `save()` returning (what blocks the training loop) and committed (`wait()`), then the fsync of
  every file it wrote (Orbax does not fsync; adding it makes the number comparable to raw write+fsync);
- restore: after evicting every checkpoint file from the page cache, until the arrays are ready.
With --compare, every candidate option set of the state's arrays (`candidate_formats`: CheckpointStore's
format before issue 20, the shipped one, and single changes: zarr3, OCDBT data file size, no OCDBT) gets its own
CheckpointStore, and each round times raw write, raw read, then save + restore of every format in turn (the order
rotates by one format per round: a format's save can overlap the previous one's background work); ratios to
raw are given as ratios of medians and as the spread (min/median/max) of the per-round ratios. The load average
before and after is recorded (`common.host_state`): above the core count the numbers are "not a claim".
GB/s are of the state's logical bytes (sum of array sizes). Every float array is filled with random values
first, like a trained state (a fresh state's zero moments would compress).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any

from absl import app, flags

from bench import common


def _evict(path: str) -> None:
    """Drop a file's (or every file's below a directory) pages from the page cache."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _fsync_tree(path: str) -> None:
    for d, _, fs in os.walk(path):
        for f in fs:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def raw_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def raw_read(path: str) -> int:
    _evict(path)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(64 << 20):
            n += len(chunk)
    return n


# The option sets `--compare` times side by side: CheckpointStore's format before issue 20 (Orbax's defaults), the one
# it ships (`STATE_FORMAT`), and single changes of the other tensorstore / Orbax write options.
def candidate_formats() -> dict[str, Any]:
    """Name -> `train.checkpoint.ArrayFormat`, the shipped format second."""
    from mirage_jax.train.checkpoint import LEGACY_FORMAT, STATE_FORMAT, ArrayFormat

    return {
        "zstd (before #20)": LEGACY_FORMAT,
        "shipped": STATE_FORMAT,
        "zstd + zarr3": ArrayFormat(zarr3=True, compression=True),
        "zarr3": ArrayFormat(zarr3=True),
        "256 MiB data files": ArrayFormat(data_file_mib=256),
        "no OCDBT": ArrayFormat(ocdbt=False),
    }


TARGETS = {"save_vs_raw_write": 0.5, "restore_vs_raw_read": 0.7, "blocking_fraction": 0.05}  # issue 20


def _run(formats: dict[str, Any], rounds: int, video_dim: int, layers: int, directory: str | None) -> dict[str, Any]:
    """Per-round seconds of raw write / read and of every format's save and restore, alternated in each round."""
    import jax
    import numpy as np

    from mirage_jax.train.checkpoint import CheckpointStore
    from mirage_jax.train.setup import RunSetup

    cfg = common.tiny_config({"model.video_dim": video_dim, "model.num_heads": 8, "model.head_dim": video_dim // 8,
                              "model.text_dim": video_dim // 2, "model.audio_dim": video_dim // 2,
                              "model.num_layers": layers, "checkpoint.keep_last_n": 2, "checkpoint.async_save": True})
    setup = RunSetup(cfg, jax.devices()[:1])
    with jax.set_mesh(setup.mesh):
        state = setup.layout.create()
    # Like a trained state: every float array random (a fresh state's zero moments would compress).
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.02
                         if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, state)
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    work = tempfile.mkdtemp(prefix="bench-ckpt-", dir=directory)
    raw_path = os.path.join(work, "raw.bin")
    payload = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32).tobytes()
    target = setup.layout.abstract_with_shardings()
    data_state = {"kind": "synthetic", "step": 0, "global": True}
    stores = {name: CheckpointStore(os.path.join(work, f"run{i}"), setup.run_cfg.checkpoint, array_format=fmt)
              for i, (name, fmt) in enumerate(formats.items())}
    raw: dict[str, list[float]] = {"raw_write": [], "raw_read": []}
    res = {name: {k: [] for k in ("save_return", "save_commit", "save_fsync", "restore")} for name in formats}
    disk: dict[str, int] = {}
    step = 0
    try:
        def save(name: str) -> None:
            store, r = stores[name], res[name]
            t0 = time.perf_counter()
            store.save(step, state, data_state, {}, {"step": step})
            t1 = time.perf_counter()
            store.wait()
            t2 = time.perf_counter()
            _fsync_tree(str(store.step_dir(step)))
            t3 = time.perf_counter()
            r["save_return"].append(t1 - t0)
            r["save_commit"].append(t2 - t0)
            r["save_fsync"].append(t3 - t0)

        def restore(name: str) -> None:
            store = stores[name]
            _evict(str(store.step_dir(step)))
            t0 = time.perf_counter()
            restored, _ = store.restore(step, target)
            jax.block_until_ready(restored)
            res[name]["restore"].append(time.perf_counter() - t0)

        for rnd in range(rounds + 1):  # round 0 warms up: Orbax's first save sets up its handlers and thread pools
            step += 1
            t0 = time.perf_counter()
            raw_write(raw_path, payload)
            raw["raw_write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw_read(raw_path)
            raw["raw_read"].append(time.perf_counter() - t0)
            names = list(formats)
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # rotated: no format always first
                save(name)
                restore(name)
            if rnd == 0:
                for v in (*raw.values(), *(x for r in res.values() for x in r.values())):
                    v.clear()
        for name, store in stores.items():
            d = str(store.step_dir(step))
            disk[name] = sum(os.path.getsize(os.path.join(a, f)) for a, _, fs in os.walk(d) for f in fs)
    finally:
        for store in stores.values():
            store.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"nbytes": nbytes, "params": setup.layout.param_count(), "raw": raw, "res": res, "disk": disk}


def _rates(nbytes: int, raw: dict[str, list[float]], t: dict[str, list[float]]) -> dict[str, Any]:
    """GB/s of medians, ratios of medians to the raw rates, and the per-round ratios' spread."""
    gb = nbytes / 1e9
    med = {k: common.median(v) for k, v in (*raw.items(), *t.items())}
    out: dict[str, Any] = {
        "save_GBps": gb / med["save_fsync"], "save_commit_GBps": gb / med["save_commit"],
        "restore_GBps": gb / med["restore"],
        "save_blocking_s": med["save_return"], "save_commit_s": med["save_commit"],
        "save_fsync_s": med["save_fsync"], "restore_s": med["restore"],
        "save_vs_raw_write": med["raw_write"] / med["save_fsync"],
        "restore_vs_raw_read": med["raw_read"] / med["restore"],
        "blocking_fraction": med["save_return"] / med["save_commit"],
    }
    def per_round(num: list[float], den: list[float]) -> dict[str, float]:  # the ratio of each round's times
        return common.spread([a / b for a, b in zip(num, den, strict=True)])

    out["spread"] = {"save_vs_raw_write": per_round(raw["raw_write"], t["save_fsync"]),
                     "restore_vs_raw_read": per_round(raw["raw_read"], t["restore"]),
                     "blocking_fraction": per_round(t["save_return"], t["save_commit"])}
    out["meets"] = {k: (out[k] < v if k == "blocking_fraction" else out[k] >= v) for k, v in TARGETS.items()}
    return out


def measure(rounds: int = 3, video_dim: int = 320, layers: int = 8, directory: str | None = None,
            formats: dict[str, Any] | None = None) -> dict:
    """{"save_GBps", "restore_GBps", "raw_write_GBps", "raw_read_GBps", ratios, async blocking times, "host"} of
    CheckpointStore's shipped format; with `formats` (name -> ArrayFormat) also "formats": the same numbers for each,
    timed alternately in the same rounds (the first format's are the top-level ones when "shipped" is absent)."""
    from mirage_jax.train.checkpoint import STATE_FORMAT

    fmts = dict(formats) if formats else {"shipped": STATE_FORMAT}
    load_before = common.load_average()
    r = _run(fmts, rounds, video_dim, layers, directory)
    host = common.host_state(load_before, common.load_average())
    gb = r["nbytes"] / 1e9
    per = {name: {**_rates(r["nbytes"], r["raw"], t), "checkpoint_disk_bytes": r["disk"][name], "times": t,
                  "format": dataclasses.asdict(fmts[name])} for name, t in r["res"].items()}
    head = per.get("shipped", next(iter(per.values())))
    out: dict[str, Any] = {
        "state_bytes": r["nbytes"], "params": r["params"],
        "raw_write_GBps": gb / common.median(r["raw"]["raw_write"]),
        "raw_read_GBps": gb / common.median(r["raw"]["raw_read"]),
        **{k: v for k, v in head.items() if k not in ("times", "format")},
        "times": {**r["raw"], **head["times"]}, "host": host,
    }
    out["setup"] = {"config": "configs/tiny.py", "video_dim": video_dim, "layers": layers, "rounds": rounds,
                    "async_save": True, "directory": directory or tempfile.gettempdir(), "format": head["format"],
                    "orbax_checkpoint": common.module_version("orbax.checkpoint"),
                    "tensorstore": common.module_version("tensorstore")}
    if formats:
        out["formats"] = per
    return out


def _target_words(r: dict[str, Any]) -> str:
    """Which of issue 20's targets a format's medians meet, e.g. 'save >= 0.50x: yes, ...'."""
    words = {"save_vs_raw_write": "save >= {:.2f}x raw write", "restore_vs_raw_read": "restore >= {:.2f}x raw read",
             "blocking_fraction": "blocking < {:.0%} of the save"}
    return "; ".join(f"{words[k].format(v)}: {'yes' if r['meets'][k] else 'NO'}" for k, v in TARGETS.items())


def report(r: dict[str, Any]) -> list[str]:
    """The printed lines, every one computed from `r`."""
    lines = [] if r["host"]["claim"] else ["NOT A CLAIM (every number below): " + r["host"]["why"]]
    lines += [f"state {r['state_bytes'] / 1e6:.0f} MB ({r['params']:,} parameters), {r['setup']['rounds']} rounds, "
             f"orbax-checkpoint {r['setup']['orbax_checkpoint']}, tensorstore {r['setup']['tensorstore']}",
             common.host_line(r).replace("**", ""),
             f"raw write+fsync {r['raw_write_GBps']:.2f} GB/s, raw read {r['raw_read_GBps']:.2f} GB/s"]
    for name, x in (r.get("formats") or {"shipped": r}).items():
        s, rs, bf = (x["spread"][k] for k in ("save_vs_raw_write", "restore_vs_raw_read", "blocking_fraction"))
        lines += [
            f"[{name}] save {x['save_GBps']:.2f} GB/s (with fsync) -> {x['save_vs_raw_write']:.2f}x raw write "
            f"(per round {s['min']:.2f}/{s['median']:.2f}/{s['max']:.2f}); restore {x['restore_GBps']:.2f} GB/s -> "
            f"{x['restore_vs_raw_read']:.2f}x raw read (per round {rs['min']:.2f}/{rs['median']:.2f}/{rs['max']:.2f}); "
            f"async save blocks {x['save_blocking_s'] * 1e3:.0f} ms of {x['save_commit_s'] * 1e3:.0f} ms to commit "
            f"({x['blocking_fraction']:.1%}, per round {bf['min']:.1%}/{bf['median']:.1%}/{bf['max']:.1%}); "
            f"{x['checkpoint_disk_bytes'] / 1e6:.0f} MB on disk",
            f"[{name}] issue 20 targets: {_target_words(x)}",
        ]
    if r.get("formats") and len(r["formats"]) > 1:
        per = r["formats"]
        for k, what in (("save_vs_raw_write", "save"), ("restore_vs_raw_read", "restore")):
            best = max(per, key=lambda n: per[n][k])
            lines.append(f"fastest {what}: {best} ({per[best][k]:.2f}x raw)")
        best = min(per, key=lambda n: per[n]["blocking_fraction"])
        lines.append(f"least blocking: {best} ({per[best]['blocking_fraction']:.1%})")
    return lines


def main(argv: list[str]) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every metadata store it closes at INFO
    F = flags.FLAGS
    r = measure(F.rounds, F.video_dim, F.layers, F.dir, formats=candidate_formats() if F.compare else None)
    if F.json:
        print(json.dumps(r))
        return
    print("\n".join(report(r)))


if __name__ == "__main__":
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_integer("rounds", 3, "Alternating rounds.", lower_bound=1)
    flags.DEFINE_integer("video_dim", 320, "Model width (sets the state size: 16 bytes per parameter).", lower_bound=8)
    flags.DEFINE_integer("layers", 8, "Blocks.", lower_bound=1)
    flags.DEFINE_string("dir", None, "Directory on the disk to measure (default: the temp dir).")
    flags.DEFINE_bool("compare", False, "Time every candidate ArrayFormat (candidate_formats) side by side.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)  # --help exits 0, --a-b is --a_b
