"""Checkpoint save / restore GB/s of the runtime's CheckpointStore (Orbax) vs the disk's raw bandwidth.

    python -m bench.checkpoint [--json] [--rounds=3] [--video_dim=320] [--layers=8] [--dir=/tmp]

A real TrainState (params, AdamW moments, EMA: 16 bytes per parameter) of a widened configs/tiny.py,
saved with `train.checkpoint.CheckpointStore` (async, as training does) and restored through abstract
arrays with shardings (as a resume does). Alternated in every round with raw file I/O of the same size
in the same directory:
- raw write = write + fsync of one file; raw read = read of that file after evicting it from the page
  cache (posix_fadvise DONTNEED, no root needed);
- save: `save()` returning (what blocks the training loop) and committed (`wait()`), then the fsync of
  every file it wrote (Orbax does not fsync; adding it makes the number comparable to raw write+fsync);
- restore: after evicting every checkpoint file from the page cache, until the arrays are ready.
GB/s are of the state's logical bytes (sum of array sizes). Every float array is filled with random values
first, like a trained state (a fresh state's zero moments would compress).
"""

from __future__ import annotations

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


def measure(rounds: int = 3, video_dim: int = 320, layers: int = 8, directory: str | None = None) -> dict:
    """{"save_GBps", "restore_GBps", "raw_write_GBps", "raw_read_GBps", ratios, async blocking times}."""
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
    store = CheckpointStore(os.path.join(work, "run"), cfg.checkpoint)
    target = setup.layout.abstract_with_shardings()
    data_state = {"kind": "synthetic", "step": 0, "global": True}
    res: dict[str, list[float]] = {k: [] for k in ("raw_write", "raw_read", "save_return", "save_commit",
                                                  "save_fsync", "restore")}
    try:
        step = 0

        def save() -> None:
            nonlocal step
            step += 1
            t0 = time.perf_counter()
            store.save(step, state, data_state, {}, {"step": step})
            t1 = time.perf_counter()
            store.wait()
            t2 = time.perf_counter()
            _fsync_tree(str(store.step_dir(step)))
            t3 = time.perf_counter()
            res["save_return"].append(t1 - t0)
            res["save_commit"].append(t2 - t0)
            res["save_fsync"].append(t3 - t0)

        def restore() -> None:
            _evict(str(store.step_dir(step)))
            t0 = time.perf_counter()
            restored, _ = store.restore(step, target)
            jax.block_until_ready(restored)
            res["restore"].append(time.perf_counter() - t0)

        save()  # warm-up: Orbax's first save sets up its handlers and thread pools
        restore()
        for k in res:
            res[k].clear()
        for _ in range(rounds):
            t0 = time.perf_counter()
            raw_write(raw_path, payload)
            res["raw_write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw_read(raw_path)
            res["raw_read"].append(time.perf_counter() - t0)
            save()
            restore()
        disk_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                         os.walk(str(store.step_dir(step))) for f in fs)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: common.median(v) for k, v in res.items()}
    gb = nbytes / 1e9
    out: dict[str, Any] = {
        "state_bytes": nbytes, "checkpoint_disk_bytes": disk_bytes,
        "params": setup.layout.param_count(),
        "raw_write_GBps": gb / med["raw_write"], "raw_read_GBps": gb / med["raw_read"],
        "save_GBps": gb / med["save_fsync"], "save_commit_GBps": gb / med["save_commit"],
        "restore_GBps": gb / med["restore"],
        "save_blocking_s": med["save_return"], "save_commit_s": med["save_commit"],
        "save_fsync_s": med["save_fsync"], "restore_s": med["restore"],
    }
    out["save_vs_raw_write"] = out["save_GBps"] / out["raw_write_GBps"]
    out["restore_vs_raw_read"] = out["restore_GBps"] / out["raw_read_GBps"]
    out["blocking_fraction"] = med["save_return"] / med["save_commit"]
    out["setup"] = {"config": "configs/tiny.py", "video_dim": video_dim, "layers": layers, "rounds": rounds,
                    "async_save": True, "directory": directory or tempfile.gettempdir()}
    out["times"] = res
    return out


def main(argv: list[str]) -> None:
    del argv
    F = flags.FLAGS
    r = measure(F.rounds, F.video_dim, F.layers, F.dir)
    if F.json:
        print(json.dumps(r))
        return
    print(f"state {r['state_bytes'] / 1e6:.0f} MB ({r['params']:,} parameters)")
    print(f"save    {r['save_GBps']:.2f} GB/s (with fsync) vs raw write+fsync {r['raw_write_GBps']:.2f} GB/s "
          f"-> {r['save_vs_raw_write']:.2f}x")
    print(f"restore {r['restore_GBps']:.2f} GB/s vs raw read {r['raw_read_GBps']:.2f} GB/s "
          f"-> {r['restore_vs_raw_read']:.2f}x")
    print(f"async save blocks {r['save_blocking_s'] * 1e3:.0f} ms of {r['save_commit_s'] * 1e3:.0f} ms to commit")


if __name__ == "__main__":
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
    flags.DEFINE_integer("video_dim", 320, "Model width (sets the state size: 16 bytes per parameter).")
    flags.DEFINE_integer("layers", 8, "Blocks.")
    flags.DEFINE_string("dir", None, "Directory on the disk to measure (default: the temp dir).")
    app.run(main)
