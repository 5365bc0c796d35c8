"""The demo's compiled train step alone (same batch, no loop, no checkpoints) under launch/local.py, with
both gradient synchronisations (`train.grad_sync`) timed in the same processes, one after the other.

    python launch/local.py --processes=2 --devices-per-process=4 -- python -m bench.multiprocess_step SHARDS
    python launch/local.py --processes=2 --devices-per-process=1 -- python -m bench.multiprocess_step SHARDS xla

SHARDS: prepared shards of `configs/tiny.py:demo` (e.g. `demo_out/shards/train` after `make demo`); an optional
second argument (`xla` or `flat`) times only that mode. Builds the trainer's own mesh, state layout and jitted
step, then per mode times 20 steps dispatched back to back ("pipelined", with the CPU time process 0 spent) and
20 steps each followed by a metrics fetch ("synced", as the loop does), twice, alternating the modes. Process 0
prints seconds per step and, with both modes, the ratio xla / flat of the best pipelined times. docs/runtime.md
uses it for the cost of XLA's per-buffer Gloo all-reduces across CPU processes.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
import time
from typing import Any

import jax

from configs import tiny
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train import data as data_lib
from mirage_jax.train import distributed, resume
from mirage_jax.train.loop import Trainer

MODES = ("xla", "flat")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _time(step_fn: Any, state: Any, batch: Any) -> tuple[Any, float, float, float]:
    """(state, pipelined s/step, process CPU s/step, synced s/step) over 20 + 20 steps."""
    t, c = time.perf_counter(), _cpu_s()
    for _ in range(20):
        state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    pipelined, cpu = (time.perf_counter() - t) / 20, (_cpu_s() - c) / 20
    t = time.perf_counter()
    for _ in range(20):
        state, m = step_fn(state, batch)
        jax.device_get(m)
    return state, pipelined, cpu, (time.perf_counter() - t) / 20


def main(shards: str, modes: tuple[str, ...] = MODES) -> None:
    distributed.initialize()  # the variables launch/local.py sets
    cfg = tiny.get_config("demo")
    cfg.data.source = shards
    with tempfile.TemporaryDirectory() as workdir:
        tr = Trainer(cfg, workdir)
        with jax.set_mesh(tr.setup.mesh):
            run = tr.setup.run_cfg
            store = ckpt_lib.CheckpointStore(os.path.join(workdir, f"p{jax.process_index()}"), run.checkpoint)
            state, _, _ = resume.restore_or_init(store, tr.setup.layout, {}, False)
            source = data_lib.make_source(tr.setup.run_cfg, tr.rows, 0)
            batch = data_lib.to_global(next(source), tr.setup.batch_shardings, tr.setup.run_cfg.train.global_batch_size)
            fns = {}
            for mode in modes:
                fns[mode] = tr.setup.make_step(dataclasses.replace(tr.setup.run_cfg.train, grad_sync=mode))
                state, m = fns[mode](state, batch)  # compile
                jax.block_until_ready(m)
            best = {mode: float("inf") for mode in modes}
            for _ in range(2):
                for mode in modes:
                    state, pipelined, cpu, synced = _time(fns[mode], state, batch)
                    best[mode] = min(best[mode], pipelined)
                    if jax.process_index() == 0:
                        print(f"{jax.process_count()} processes x {jax.local_device_count()} devices, grad_sync="
                              f"{mode}: pipelined {pipelined:.3f} s/step ({cpu:.3f} CPU s/step in process 0), "
                              f"synced {synced:.3f} s/step", flush=True)
            if len(modes) == 2 and jax.process_index() == 0:
                print(f"xla / flat (best pipelined): {best['xla'] / best['flat']:.2f}x", flush=True)
            store.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.multiprocess_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", metavar="SHARDS", help="prepared shards of configs/tiny.py:demo")
    parser.add_argument("modes", metavar="MODE", nargs="?", choices=MODES,
                        help="time only this train.grad_sync (default: both, alternating)")
    args = parser.parse_args()
    main(args.shards, (args.modes,) if args.modes else MODES)
