"""The training loop: build mesh and state, resume, step, log, checkpoint, stop cleanly.

Order inside one iteration (so the host prepares batch n+1 while the devices run step n):
dispatch step n -> draw batch n+1 (snapshotting the iterator state first) -> wait for step n's metrics
-> NaN/Inf accounting, logging -> checkpoint / preemption / end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from data_pipeline.errors import MirageError
from mirage_jax.checkpoint_format import config_to_dict
from mirage_jax.parallel import mesh as mesh_lib
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train import data as data_lib
from mirage_jax.train import metrics as metrics_lib
from mirage_jax.train import resume
from mirage_jax.train.preemption import Preempted, PreemptionWatcher, describe_nothing_trained, describe_saved
from mirage_jax.train.setup import RunSetup


class NonFiniteError(MirageError, RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""

    exit_code, label = 3, "STOPPED"


StepHook = Callable[[int], None]


class Trainer(RunSetup):
    """Everything derived from the config once (`RunSetup`), this process's batch rows; `run()` trains to
    `train.steps`.

    `hooks` (Levanter-style): callables run with the new step number after every step, once its metrics are
    logged and its checkpoint (if due) was started, before a preemption stops the run. Drills use one to kill
    the process at a chosen step (tests/kill_at_step.py).
    """

    def __init__(self, cfg: Any, workdir: str, *, allow_config_change: bool = False,
                 hooks: Sequence[StepHook] = ()):
        super().__init__(cfg)
        self.workdir = workdir
        self.hooks = tuple(hooks)
        self.allow_config_change = allow_config_change or self.run_cfg.checkpoint.allow_config_change
        self.rows = data_lib.process_rows(self.mesh, self.batch_axes, self.run_cfg.train.global_batch_size)

    def _log_setup(self) -> None:
        logging.info("%s; %d parameters; process %d feeds batch rows [%d, %d)", mesh_lib.describe(self.mesh),
                     self.layout.param_count(), jax.process_index(), self.rows.start, self.rows.stop)
        if jax.process_count() > 1 and jax.default_backend() == "cpu" and self.run_cfg.train.grad_sync == "xla":
            logging.warning("%d CPU processes with train.grad_sync='xla': XLA:CPU runs every buffer of the gradient "
                            "all-reduces as its own Gloo collective (2.9x the step time of 'flat' for "
                            "configs/tiny.py:demo at 2 x 4); on a pure data-parallel mesh set "
                            "--config.train.grad_sync=flat (docs/runtime.md)", jax.process_count())
        if self.layout.fallbacks:
            logging.info("%d parameters are not divisible by their mesh axes and use fewer: %s",
                         len(self.layout.fallbacks), "; ".join(self.layout.fallbacks[:4]))

    def run(self) -> int:
        """Train until `train.steps`; returns the final step. Raises Preempted after a preemption save."""
        run = self.run_cfg
        self._log_setup()
        store = ckpt_lib.CheckpointStore(self.workdir, run.checkpoint)
        config = config_to_dict(self.cfg)
        with jax.set_mesh(self.mesh):
            state, data_state, restored = resume.restore_or_init(store, self.layout, config, self.allow_config_change)
        start = int(jax.device_get(state.step))
        source = data_lib.make_source(run, self.rows, start)
        if data_state is not None:
            source.set_state(data_state)
        logging.info("%s at step %d of %d", "resumed from checkpoint" if restored is not None else "initialized",
                     start, self.total_steps)
        if start >= self.total_steps:
            store.close()
            return start
        step_fn = self.make_step()
        writer = metrics_lib.MetricsWriter(self.workdir, run.metrics)
        watcher = PreemptionWatcher()
        try:
            return self._loop(state, start, source, step_fn, store, writer, watcher, config)
        finally:
            watcher.close()
            writer.close()
            store.close()

    def _throughput(self) -> tuple[float, float, float]:
        try:
            flops, tokens = metrics_lib.throughput_model(self.run_cfg)
        except Exception as e:  # noqa: BLE001 - metrics must not stop training
            logging.warning("throughput model unavailable (%s); TFLOP/s and MFU not reported", e)
            flops, tokens = 0, 0
        peak = metrics_lib.peak_flops_per_device(self.run_cfg.metrics.peak_flops_per_device)
        return float(flops), float(tokens), peak

    def _loop(self, state: Any, start: int, source: Any, step_fn: Any, store: ckpt_lib.CheckpointStore,
              writer: metrics_lib.MetricsWriter, watcher: PreemptionWatcher, config: dict[str, Any]) -> int:
        tc, save_every = self.run_cfg.train, self.run_cfg.checkpoint.save_every
        gb = tc.global_batch_size
        flops_per_sample, tokens_per_sample, peak = self._throughput()
        n_dev = jax.device_count()
        k_max = tc.max_nonfinite_steps
        profile_start, profile_end = tc.profile_start_step, tc.profile_start_step + tc.profile_steps
        profiling = False

        def draw() -> tuple[dict[str, jax.Array], Any, float]:
            t = time.perf_counter()
            snapshot = source.get_state()
            batch = data_lib.to_global(next(source), self.batch_shardings, gb)
            return batch, snapshot, time.perf_counter() - t

        batch, _, data_wait = draw()
        data_state = source.get_state()  # position after batch `start`: saved with step start+1
        # Agree before and after compiling the first step: a SIGTERM during setup, restore or compilation (on
        # any process) stops there with nothing to save. The barriers let the processes enter collectives
        # together (Gloo gives up on a peer that arrives > 30 s later, e.g. one compiling much slower).
        for phase in ("restored", "compiled"):
            if phase == "compiled":
                t = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    step_fn = step_fn.lower(state, batch).compile()
                logging.info("compiled the train step in %.1f s", time.perf_counter() - t)
            watcher.barrier(f"{phase}_{start}")
            if watcher.agree()[0]:
                raise Preempted(describe_nothing_trained(start, store.directory))
        last_time = time.perf_counter()
        bucket_sum = bucket_n = 0.0
        window_time = window_wait = 0.0
        window_steps = 0
        with jax.set_mesh(self.mesh):
            for step in range(start, self.total_steps):
                if step == profile_start and jax.process_index() == 0:
                    jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
                    profiling = True
                state, metrics = step_fn(state, batch)
                new_step = step + 1
                if new_step < self.total_steps:
                    batch, _, wait = draw()
                    next_data_state = source.get_state()
                else:
                    wait, next_data_state = 0.0, None
                m = jax.device_get(metrics)
                now = time.perf_counter()
                step_time, last_time = now - last_time, now
                if profiling and new_step >= profile_end:
                    jax.profiler.stop_trace()
                    profiling = False
                if step == start:  # warm-up: reported once, kept out of the averages
                    logging.info("first step took %.1f s", step_time)
                else:
                    window_time += step_time
                    window_wait += data_wait
                    window_steps += 1
                data_wait = wait
                bucket_sum = bucket_sum + np.asarray(m["loss_per_bucket"])
                bucket_n = bucket_n + np.asarray(m["bucket_counts"])
                if not bool(m["finite"]):
                    logging.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped "
                                    "(%d in a row, %d in total)", new_step, m["loss"], m["grad_norm"],
                                    int(m["nonfinite_streak"]), int(m["nonfinite_total"]))
                if int(m["nonfinite_streak"]) >= k_max:
                    store.wait()
                    raise NonFiniteError(
                        f"{k_max} consecutive non-finite steps (train.max_nonfinite_steps={k_max}) ending at step "
                        f"{new_step}; stopping. The last good checkpoint is kept (steps {store.all_steps()} in "
                        f"{store.directory}). Lower optim.lr, raise optim.warmup_steps or check the data, then "
                        "rerun the same command to resume.")
                if new_step % tc.log_every == 0 or new_step == self.total_steps:
                    avg = window_time / window_steps if window_steps else step_time
                    scalars = {
                        "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                        "step_time_s": avg, "data_wait_s": window_wait / max(window_steps, 1),
                        "nonfinite_total": m["nonfinite_total"],
                        "samples_per_s": gb / avg,
                        "tokens_per_s_per_device": gb * tokens_per_sample / avg / n_dev,
                        "loss_per_bucket": np.where(bucket_n > 0, bucket_sum / np.maximum(bucket_n, 1), np.nan),
                    }
                    if flops_per_sample:
                        tflops = gb * flops_per_sample / avg / n_dev
                        scalars["tflops_per_device"] = tflops / 1e12
                        if peak:
                            scalars["mfu"] = tflops / peak
                    writer.write(new_step, scalars)
                    bucket_sum = bucket_n = 0.0
                    window_time = window_wait = 0.0
                    window_steps = 0
                save_error = store.save_error()  # a background save that failed: reported within one step
                preempted, failed_elsewhere = watcher.agree(save_error is not None)
                if save_error is not None:
                    raise save_error
                if failed_elsewhere:
                    raise ckpt_lib.CheckpointSaveError(
                        f"a checkpoint save under {store.directory} failed on another process (its log names the "
                        "file and the OS error); fix the storage and rerun the same command")
                due = new_step % save_every == 0 or new_step == self.total_steps
                if due and not bool(m["finite"]) and not preempted:
                    logging.warning("step %d: not checkpointing a step inside a non-finite streak", new_step)
                    due = False
                if due or preempted:
                    meta = {"step": new_step, "time": time.time(), "process_count": jax.process_count(),
                            "device_count": n_dev, "mesh": dict(self.mesh.shape), "jax": jax.__version__,
                            "preempted": preempted}
                    store.save(new_step, state, data_state, config, meta)
                    logging.info("checkpoint %d started%s", new_step, " (preemption)" if preempted else "")
                for hook in self.hooks:
                    hook(new_step)
                if preempted:
                    store.wait()
                    logging.info("stop-flag agreement: %.2f ms per step (%d steps)", 1e3 * watcher.mean_cost_s(),
                                 watcher.calls - 2)
                    raise Preempted(describe_saved(new_step, store.directory))
                data_state = next_data_state
            if profiling:
                jax.profiler.stop_trace()
            store.wait()
        logging.info("stop-flag agreement: %.2f ms per step (%d steps)", 1e3 * watcher.mean_cost_s(), watcher.calls - 2)
        return self.total_steps
