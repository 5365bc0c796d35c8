"""`NonFiniteGuard`: a warning per non-finite step (the jitted step already skipped its update) and
`NonFiniteError` after `train.max_nonfinite_steps` in a row, once the started saves are committed."""

from __future__ import annotations

from typing import Any

from mirage_base.errors import ExitCode, MirageError
from mirage_jax.train.hooks import Hook, StepInfo


class NonFiniteError(MirageError, RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""

    exit_code, label = ExitCode.NONFINITE, "STOPPED"


class NonFiniteGuard(Hook):
    """Reads `finite`, `nonfinite_streak`, `nonfinite_total`, `loss`, `grad_norm` of the step's metrics.
    `store`: the CheckpointStore (waited for before raising, so that its last good checkpoint is committed);
    `events` (optional): the goodput EventLog, which records that wait as checkpoint blocking."""

    def __init__(self, max_streak: int, store: Any, *, events: Any = None):
        self.max_streak = max_streak
        self.store = store
        self.events = events

    def on_step(self, info: StepInfo) -> None:
        from absl import logging

        m = info.metrics
        if not bool(m["finite"]):
            logging.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped "
                            "(%d in a row, %d in total)", info.new_step, m["loss"], m["grad_norm"],
                            int(m["nonfinite_streak"]), int(m["nonfinite_total"]))
        if int(m["nonfinite_streak"]) >= self.max_streak:
            k = self.max_streak
            if self.events is not None:
                self.events.timed("checkpoint_wait", self.store.wait)
            else:
                self.store.wait()
            raise NonFiniteError(
                f"{k} consecutive non-finite steps (train.max_nonfinite_steps={k}) ending at step "
                f"{info.new_step}; stopping. The last good checkpoint is kept (steps {self.store.all_steps()} in "
                f"{self.store.directory}). Lower optim.lr, raise optim.warmup_steps or check the data, then "
                "rerun the same command to resume.")
