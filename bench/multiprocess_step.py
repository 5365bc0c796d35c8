"""The demo's compiled train step alone (same batch, no loop, no checkpoints) under launch/local.py.

    python launch/local.py --processes=2 --devices-per-process=4 -- python -m bench.multiprocess_step SHARDS [xla|flat]
    python launch/local.py --processes=2 --devices-per-process=1 -- python -m bench.multiprocess_step SHARDS [xla|flat]

SHARDS: prepared shards of `configs/tiny.py:demo` (e.g. `demo_out/shards/train` after `make demo`); the optional
second argument overrides the config's `train.grad_sync`. Builds the trainer's own mesh, state layout and
jitted step, then times 20 steps dispatched back to back ("pipelined", with the CPU time process 0 spent) and
20 steps each followed by a metrics fetch ("synced", as the loop does), twice. Process 0 prints seconds per
step. docs/runtime.md uses it for the cost of XLA's per-buffer Gloo all-reduces at 2 x 4 and of `flat`.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

import jax

from configs import tiny
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train import data as data_lib
from mirage_jax.train import distributed, resume
from mirage_jax.train import step as step_lib
from mirage_jax.train.loop import Trainer


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(shards: str, grad_sync: str | None = None) -> None:
    distributed.initialize()  # the variables launch/local.py sets
    cfg = tiny.get_config("demo")
    cfg.data.source = shards
    if grad_sync:
        cfg.train.grad_sync = grad_sync
    with tempfile.TemporaryDirectory() as workdir:
        tr = Trainer(cfg, workdir)
        with jax.set_mesh(tr.mesh):
            store = ckpt_lib.CheckpointStore(os.path.join(workdir, f"p{jax.process_index()}"), cfg.checkpoint)
            state, _, _ = resume.restore_or_init(store, tr.layout, {}, False)
            source = data_lib.make_source(cfg, tr.rows, 0)
            batch = data_lib.to_global(next(source), tr.batch_shardings, int(cfg.train.global_batch_size))
            step_fn = step_lib.make_train_step(tr.layout, tr.dcfg, cfg.train, tr.lr_schedule, tr.act_rules,
                                               tr.batch_shardings)
            state, m = step_fn(state, batch)
            jax.block_until_ready(m)
            for _ in range(2):
                t, c = time.perf_counter(), _cpu_s()
                for _ in range(20):
                    state, m = step_fn(state, batch)
                jax.block_until_ready(m)
                pipelined = (time.perf_counter() - t) / 20
                cpu = (_cpu_s() - c) / 20
                t = time.perf_counter()
                for _ in range(20):
                    state, m = step_fn(state, batch)
                    jax.device_get(m)
                synced = (time.perf_counter() - t) / 20
                if jax.process_index() == 0:
                    print(f"{jax.process_count()} processes x {jax.local_device_count()} devices, grad_sync="
                          f"{cfg.train.grad_sync}: pipelined "
                          f"{pipelined:.3f} s/step ({cpu:.3f} CPU s/step in process 0), "
                          f"synced {synced:.3f} s/step", flush=True)
            store.close()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["xla"], ["flat"]):
        raise SystemExit("usage: python -m bench.multiprocess_step SHARDS [xla|flat] "
                         "(prepared shards of configs/tiny.py:demo; the second argument sets train.grad_sync)")
    main(*sys.argv[1:])
