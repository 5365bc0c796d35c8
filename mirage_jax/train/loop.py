"""The training loop as a driver: build state, resume, then per step: dispatch, draw, fetch metrics, call hooks.

Order inside one iteration (so the host prepares batch n+1 while the devices run step n):
dispatch step n -> draw batch n+1 (snapshotting the iterator state first) -> wait for step n's metrics
-> the hooks in order (`train.hooks`): profiler window, goodput recorder, non-finite guard, metrics window,
stop agreement, checkpoint policy, the user's step callables, preemption stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging

from mirage_jax.checkpoint_format import config_to_dict
from mirage_jax.parallel import mesh as mesh_lib
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train import data as data_lib
from mirage_jax.train import metrics as metrics_lib
from mirage_jax.train import resume, shape_buckets
from mirage_jax.train.hooks import SYSTEM_CLOCK, CallbackHook, Clock, Hook, StepInfo
from mirage_jax.train.hooks.checkpoint import CheckpointPolicy
from mirage_jax.train.hooks.goodput import EventLog, GoodputRecorder
from mirage_jax.train.hooks.metrics_window import MetricsWindow
from mirage_jax.train.hooks.nonfinite import NonFiniteError, NonFiniteGuard
from mirage_jax.train.hooks.profiler import ProfilerWindow
from mirage_jax.train.hooks.stop import PreemptionStop, StopAgreement
from mirage_jax.train.preemption import Preempted, PreemptionWatcher
from mirage_jax.train.setup import RunSetup

__all__ = ["NonFiniteError", "StepHook", "Trainer"]

StepHook = Callable[[int], None]


class Trainer:
    """The run's `RunSetup` (`self.setup`: typed config, mesh, layout, shardings, the step), this process's batch
    rows, the workdir; `run()` trains to `train.steps`.

    `hooks` (Levanter-style): callables run with the new step number after every step, once its metrics are
    logged and its checkpoint (if due) was started, before a preemption stops the run. Drills use one to kill
    the process at a chosen step (tests/kill_at_step.py). `clock`: time sources of the loop and its hooks.
    `started_at`: wall time the job's process started (the CLI passes its first line's; default: now), the
    goodput log's `job_start`.
    """

    def __init__(self, cfg: Any, workdir: str, *, allow_config_change: bool = False,
                 hooks: Sequence[StepHook] = (), clock: Clock = SYSTEM_CLOCK, started_at: float | None = None):
        self.clock = clock
        self.started_at = clock.wall() if started_at is None else started_at
        self.setup = setup = RunSetup(cfg)
        self.cfg, self.run_cfg = cfg, setup.run_cfg
        self.workdir = workdir
        self.hooks = tuple(hooks)
        self.allow_config_change = allow_config_change or self.run_cfg.checkpoint.allow_config_change
        self.rows = data_lib.process_rows(setup.mesh, setup.batch_axes, self.run_cfg.train.global_batch_size)
        self.total_steps = setup.total_steps

    def _log_setup(self) -> None:
        s = self.setup
        feeds = (f"batch rows [{self.rows.start}, {self.rows.stop})" if s.buckets is None
                 else s.buckets.describe_rows(s.mesh, s.batch_axes))
        logging.info("%s; %d parameters; process %d feeds %s", mesh_lib.describe(s.mesh), s.layout.param_count(),
                     jax.process_index(), feeds)
        if jax.process_count() > 1 and jax.default_backend() == "cpu" and self.run_cfg.train.grad_sync == "xla":
            logging.warning("%d CPU processes with train.grad_sync='xla': XLA:CPU runs every buffer of the gradient "
                            "all-reduces as its own Gloo collective (2.9x the step time of 'flat' for "
                            "configs/tiny.py:demo at 2 x 4); on a pure data-parallel mesh set "
                            "--config.train.grad_sync=flat (docs/runtime.md)", jax.process_count())
        if s.buckets is not None:
            logging.info("%s", s.buckets.describe())
        if s.layout.fallbacks:
            logging.info("%d parameters are not divisible by their mesh axes and use fewer: %s",
                         len(s.layout.fallbacks), "; ".join(s.layout.fallbacks[:4]))

    def run(self) -> int:
        """Train until `train.steps`; returns the final step. Raises Preempted after a preemption save."""
        events = EventLog(self.workdir, enabled=jax.process_index() == 0, clock=self.clock)
        events.record("job_start", t=self.started_at, process_count=jax.process_count())
        events.record("init")
        status, step = "error", None
        try:
            step = self._run(events)
            status = "done"
            return step
        except Preempted:
            status = "preempted"
            raise
        except Exception as e:
            status = type(e).__name__
            raise
        finally:
            events.record("job_end", step=step, status=status)
            events.close()

    def _run(self, events: EventLog) -> int:
        run, setup = self.run_cfg, self.setup
        self._log_setup()
        store = ckpt_lib.CheckpointStore(self.workdir, run.checkpoint)
        config = config_to_dict(self.cfg)
        t = self.clock.perf()
        with jax.set_mesh(setup.mesh):
            state, data_state, restored = resume.restore_or_init(store, setup.layout, config, self.allow_config_change)
        start = int(jax.device_get(state.step))
        events.record("restore", step=start, restored=restored is not None, dt=self.clock.perf() - t)
        source = (data_lib.make_source(run, self.rows, start) if setup.buckets is None
                  else shape_buckets.make_source(run, setup.buckets, setup.mesh, setup.batch_axes))
        if data_state is not None:
            try:
                source.set_state(data_state)
            except BaseException:
                data_lib.close_source(source)
                raise
        logging.info("%s at step %d of %d", "resumed from checkpoint" if restored is not None else "initialized",
                     start, self.total_steps)
        if start >= self.total_steps:
            data_lib.close_source(source)
            store.close()
            return start
        step_fn = setup.make_step()
        writer = metrics_lib.MetricsWriter(self.workdir, run.metrics)
        watcher = PreemptionWatcher()
        try:
            return self._loop(state, start, source, step_fn, store, writer, watcher, config, events)
        finally:  # the source's close stops Grain workers now, not at shutdown (leaked shared-memory warnings)
            data_lib.close_source(source)
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

    def hooks_for(self, store: ckpt_lib.CheckpointStore, writer: Any, watcher: Any, config: dict[str, Any],
                  events: EventLog) -> tuple[StopAgreement, list[Hook]]:
        """The loop's hooks in calling order (see `train.hooks`), and the stop agreement among them."""
        tc = self.run_cfg.train
        flops, tokens, peak = self._throughput()
        n_dev = jax.device_count()
        agreement = StopAgreement(watcher, store)

        def meta(step: int, preempted: bool) -> dict[str, Any]:
            return {"step": step, "time": self.clock.wall(), "process_count": jax.process_count(),
                    "device_count": n_dev, "mesh": dict(self.setup.mesh.shape), "jax": jax.__version__,
                    "preempted": preempted, **self.setup.layout.checkpoint_meta()}

        return agreement, [
            ProfilerWindow(self.workdir, tc.profile_start_step, tc.profile_steps, enabled=jax.process_index() == 0),
            GoodputRecorder(events),
            *([shape_buckets.BucketMetrics(self.setup.buckets, tc.log_every, n_dev, peak)] if self.setup.buckets
              else []),
            NonFiniteGuard(tc.max_nonfinite_steps, store, events=events),
            MetricsWindow(writer, log_every=tc.log_every, global_batch=tc.global_batch_size, n_devices=n_dev,
                          flops_per_sample=flops, tokens_per_sample=tokens, peak=peak),
            agreement,
            CheckpointPolicy(store, config, self.run_cfg.checkpoint.save_every, meta, events=events,
                             clock=self.clock),
            *(CallbackHook(h) for h in self.hooks),
            PreemptionStop(agreement, store, events=events),
        ]

    def _loop(self, state: Any, start: int, source: Any, step_fn: Any, store: ckpt_lib.CheckpointStore,
              writer: metrics_lib.MetricsWriter, watcher: PreemptionWatcher, config: dict[str, Any],
              events: EventLog) -> int:
        setup, clock, feed = self.setup, self.clock, shape_buckets.feeder(self.setup)

        def draw() -> tuple[dict[str, jax.Array], float]:
            t = clock.perf()
            source.get_state()  # the iterator snapshot before the draw, as the loop always took it
            batch = feed(next(source))
            return batch, clock.perf() - t

        batch, data_wait = draw()
        events.record("data", dt=data_wait)
        data_state = source.get_state()  # position after batch `start`: saved with step start+1
        agreement, hooks = self.hooks_for(store, writer, watcher, config, events)
        # Agree before and after compiling the first step (StopAgreement.before_first_step).
        agreement.before_first_step("restored", start)
        t = clock.perf()
        with jax.set_mesh(setup.mesh):
            step_fn = shape_buckets.compile_steps(setup, step_fn, state, batch)  # every shape bucket's, if any
        compile_s = clock.perf() - t
        logging.info("compiled the train step in %.1f s", compile_s)
        events.record("compile", dt=compile_s)
        events.flush()
        agreement.before_first_step("compiled", start)
        last_time = clock.perf()
        info = None
        with jax.set_mesh(setup.mesh):
            for step in range(start, self.total_steps):
                for hook in hooks:
                    hook.before_step(step)
                started_at = clock.wall()
                state, metrics = step_fn(state, batch)
                new_step = step + 1
                if new_step < self.total_steps:
                    batch, wait = draw()
                    next_data_state = source.get_state()
                else:
                    wait, next_data_state = 0.0, None
                m = jax.device_get(metrics)
                ended_at, now = clock.wall(), clock.perf()
                info = StepInfo(step=step, new_step=new_step, total_steps=self.total_steps, metrics=m,
                                first=step == start, step_time_s=now - last_time, data_wait_s=data_wait,
                                started_at=started_at, ended_at=ended_at, draw_s=wait, state=state,
                                data_state=data_state)
                last_time = now
                data_wait = wait
                for hook in hooks:
                    hook.on_step(info)
                data_state = next_data_state
            for hook in hooks:
                hook.on_end(info)
        return self.total_steps
