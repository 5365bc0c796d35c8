"""`CheckpointPolicy`: save step n when due (`checkpoint.save_every`, the last step) unless it lies inside a
non-finite streak, and always on an agreed preemption; waits for the started saves at the end of the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mirage_jax.train.hooks import SYSTEM_CLOCK, Clock, Hook, StepInfo


class CheckpointPolicy(Hook):
    """`store`: the CheckpointStore (all processes call `save` together); `config`: the run's config dict saved
    with every step; `meta(step, preempted)` -> the step's meta dict. `events` (optional): the goodput
    EventLog, flushed BEFORE each save starts (so a committed checkpoint never precedes the goodput rows of
    its steps) and given the save call's blocking time (`checkpoint_save`) and the final wait
    (`checkpoint_wait`)."""

    def __init__(self, store: Any, config: dict[str, Any], save_every: int,
                 meta: Callable[[int, bool], dict[str, Any]], *, events: Any = None, clock: Clock = SYSTEM_CLOCK):
        self.store, self.config, self.save_every = store, config, save_every
        self.meta = meta
        self.events = events
        self.clock = clock

    def due(self, info: StepInfo) -> bool:
        """Save this step? Due steps inside a non-finite streak are skipped (logged), a preemption always saves."""
        from absl import logging

        due = info.new_step % self.save_every == 0 or info.last
        if due and not bool(info.metrics["finite"]) and not info.preempted:
            logging.warning("step %d: not checkpointing a step inside a non-finite streak", info.new_step)
            due = False
        return due or info.preempted

    def on_step(self, info: StepInfo) -> None:
        from absl import logging

        if not self.due(info):
            return
        if self.events is not None:
            self.events.flush()
        t = self.clock.perf()
        self.store.save(info.new_step, info.state, info.data_state, self.config,
                        self.meta(info.new_step, info.preempted))
        if self.events is not None:
            self.events.record("checkpoint_save", step=info.new_step, dt=self.clock.perf() - t)
        logging.info("checkpoint %d started%s", info.new_step, " (preemption)" if info.preempted else "")

    def on_end(self, info: StepInfo | None) -> None:
        if self.events is not None:
            self.events.timed("checkpoint_wait", self.store.wait)
        else:
            self.store.wait()
