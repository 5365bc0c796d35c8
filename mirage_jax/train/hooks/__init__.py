"""The training loop's hooks: one small object per concern, called by `train.loop.Trainer` after every step.

The loop (`Trainer._loop`) is a driver: dispatch step n, draw batch n+1 (snapshotting the iterator state
first), fetch step n's metrics to the host, then call each hook's `on_step(info)` in order. `before_step(step)`
runs before dispatching, `on_end(info)` once after the last step of a run that reached `train.steps`.

Order (`Trainer.hooks_for`): profiler window, goodput recorder (so every completed step has its row), non-finite
guard, metrics window, stop agreement, checkpoint policy, the user's step callables, preemption stop. Hooks
talk through `StepInfo`: the stop agreement sets `preempted` for the checkpoint policy and the preemption stop,
the goodput recorder adds `scalars["goodput"]` for the metrics window. Each module holds one hook:
- `profiler`: `ProfilerWindow` (a jax.profiler trace of `train.profile_steps` steps);
- `nonfinite`: `NonFiniteGuard` (warns per non-finite step, raises `NonFiniteError` after K in a row);
- `goodput`: `GoodputRecorder` + `EventLog` (the workdir's goodput.jsonl; `mirage_jax.goodput` reads it);
- `metrics_window`: `MetricsWindow` (throughput/MFU averages, log cadence, per-noise-bucket loss);
- `stop`: `StopAgreement` (all processes agree on preemption / a failed save) and `PreemptionStop`;
- `checkpoint`: `CheckpointPolicy` (save when due, skip inside a non-finite streak, save on preemption).

Time comes from a `Clock` (perf: interval seconds, wall: Unix seconds), injectable so that each hook is
unit-tested with fake metrics and a fake clock, without JAX compiles (tests/test_train_hooks.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Clock:
    """`perf()`: monotonic seconds for durations (time.perf_counter); `wall()`: Unix seconds for timestamps."""

    perf: Callable[[], float] = time.perf_counter
    wall: Callable[[], float] = time.time


SYSTEM_CLOCK = Clock()


@dataclasses.dataclass
class StepInfo:
    """What the hooks see after step `step` (0-based batch index) ran; the state's step is now `new_step`.

    - `metrics`: the step's metrics as host values (numpy scalars/arrays: loss, grad_norm, lr, finite,
      nonfinite_streak, nonfinite_total, loss_per_bucket, bucket_counts);
    - `first`: the first step of this process's run (its time includes warm-up; kept out of averages);
    - `step_time_s`: perf seconds since the previous step's metrics arrived (for the first step: since the
      step was compiled), the interval the metrics window averages;
    - `data_wait_s`: seconds the host spent drawing THIS step's batch (drawn during the previous iteration,
      or before the first step);
    - `started_at`, `ended_at`: wall seconds at dispatch and once the metrics arrived; `draw_s`: seconds of
      drawing the NEXT batch inside that interval (goodput counts it as data loading, not productive);
    - `state`: the train state after the step; `data_state`: the iterator state positioned after this step's
      batch (saved with checkpoint `new_step`);
    - `preempted`: set by `StopAgreement` when every process agreed to stop after this step;
    - `scalars`: extra scalars hooks add for the metrics line of a log step (e.g. goodput).
    """

    step: int
    new_step: int
    total_steps: int
    metrics: dict[str, Any]
    first: bool = False
    step_time_s: float = 0.0
    data_wait_s: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    draw_s: float = 0.0
    state: Any = None
    data_state: Any = None
    preempted: bool = False
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def last(self) -> bool:
        """The run's final step (`train.steps`)."""
        return self.new_step == self.total_steps


class Hook:
    """Base of the loop's hooks; every method is a no-op unless overridden."""

    def before_step(self, step: int) -> None:
        """Before dispatching step `step` (0-based)."""

    def on_step(self, info: StepInfo) -> None:
        """After the step's metrics arrived (see the order in this package's docstring)."""

    def on_end(self, info: StepInfo | None) -> None:
        """Once, after the last step of a run that reached `train.steps` (`info`: that step's, or None)."""


class CallbackHook(Hook):
    """A user's callable of the new step number (`Trainer(hooks=...)`; tests/kill_at_step.py passes one)."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def on_step(self, info: StepInfo) -> None:
        self.fn(info.new_step)
