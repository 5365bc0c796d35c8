"""`ProfilerWindow`: a jax.profiler trace of steps [train.profile_start_step, + train.profile_steps) on process 0,
written to WORKDIR/profile (TensorBoard's profile plugin reads it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mirage_jax.train.hooks import Hook, StepInfo


class ProfilerWindow(Hook):
    """Starts the trace before dispatching step `start_step`, stops it once `new_step >= start_step + steps`
    (or at the end of the run). `start_trace`/`stop_trace` default to jax.profiler's (injectable for tests)."""

    def __init__(self, workdir: str, start_step: int, steps: int, *, enabled: bool,
                 start_trace: Callable[[str], Any] | None = None, stop_trace: Callable[[], Any] | None = None):
        import jax

        self.directory = os.path.join(workdir, "profile")
        self.start_step, self.end_step = start_step, start_step + steps
        self.enabled = enabled
        self._start = start_trace or jax.profiler.start_trace
        self._stop = stop_trace or jax.profiler.stop_trace
        self.active = False

    def before_step(self, step: int) -> None:
        if step == self.start_step and self.enabled:
            self._start(self.directory)
            self.active = True

    def on_step(self, info: StepInfo) -> None:
        if self.active and info.new_step >= self.end_step:
            self._stop()
            self.active = False

    def on_end(self, info: StepInfo | None) -> None:
        if self.active:
            self._stop()
            self.active = False
