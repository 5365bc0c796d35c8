"""Preemption: SIGTERM (or the scheduler's notice) -> save at the next step -> exit 0.

Single process: a Python SIGTERM handler sets a flag. Multi-process: JAX's preemption sync manager
(started by `jax.distributed.initialize`) catches SIGTERM on any host and agrees on ONE step at which
every host sees `reached_preemption_sync_point(step)` -> True, so all hosts save the same step; the
Python handler is then not installed (it would replace JAX's). Only this path ends a run with
`Preempted`; any other exception is a crash and keeps its non-zero exit.
"""

from __future__ import annotations

import signal
import types

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is committed; the CLI exits 0 on it."""


class PreemptionWatcher:
    """`should_stop(step)` is True (on every process, at the same step) once a preemption notice arrived."""

    def __init__(self) -> None:
        self.multi = jax.process_count() > 1
        self.received = False
        self._previous = None
        if not self.multi:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
        del signum, frame
        if not self.received:
            logging.warning("SIGTERM received: will save a checkpoint after the current step and exit")
        self.received = True

    def should_stop(self, step: int) -> bool:
        if self.multi:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.received = True
            except RuntimeError as e:  # preemption service disabled: fall back to nothing
                logging.log_first_n(logging.WARNING, "preemption sync point unavailable: %s", 1, e)
        return self.received

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
