"""Stopping together: `StopAgreement` (after every step, all processes agree on "preempted" and on "a
checkpoint save failed somewhere") and `PreemptionStop` (after the other hooks: wait for the preemption
checkpoint, then raise `Preempted`). The SIGTERM handler and the agreement collective are in
`train.preemption`."""

from __future__ import annotations

from typing import Any

from mirage_jax.train.hooks import Hook, StepInfo


class StopAgreement(Hook):
    """`watcher`: a `preemption.PreemptionWatcher`; `store`: the CheckpointStore.

    After each step: a failed background save of THIS process is raised (its CheckpointSaveError), one of
    ANOTHER process raises a CheckpointSaveError naming the store, and an agreed preemption sets
    `info.preempted` (the checkpoint policy then saves this step and `PreemptionStop` ends the run).
    """

    def __init__(self, watcher: Any, store: Any):
        self.watcher = watcher
        self.store = store

    def before_first_step(self, phase: str, start: int) -> None:
        """Agree at `phase` ("restored", "compiled") before the first step: a SIGTERM during setup, restore or
        compilation (on any process) stops there with nothing to save. The barrier lets the processes enter
        the collective together (Gloo gives up on a peer that arrives > 30 s later)."""
        from mirage_jax.train.preemption import Preempted, describe_nothing_trained

        self.watcher.barrier(f"{phase}_{start}")
        if self.watcher.agree()[0]:
            raise Preempted(describe_nothing_trained(start, self.store.directory))

    def on_step(self, info: StepInfo) -> None:
        from mirage_jax.train import checkpoint as ckpt_lib

        save_error = self.store.save_error()  # a background save that failed: reported within one step
        preempted, failed_elsewhere = self.watcher.agree(save_error is not None)
        if save_error is not None:
            raise save_error
        if failed_elsewhere:
            raise ckpt_lib.CheckpointSaveError(
                f"a checkpoint save under {self.store.directory} failed on another process (its log names the "
                "file and the OS error); fix the storage and rerun the same command")
        info.preempted = preempted

    def log_cost(self) -> None:
        """The "stop-flag agreement: X ms per step" line (the per-step cost of agreeing)."""
        from absl import logging

        logging.info("stop-flag agreement: %.2f ms per step (%d steps)", 1e3 * self.watcher.mean_cost_s(),
                     self.watcher.calls - 2)


class PreemptionStop(Hook):
    """Last hook: after an agreed preemption (its checkpoint started by the policy), wait for the commit,
    record it (goodput `events`, optional), log the agreement cost and raise `Preempted` (the CLI exits 0).
    At the end of a finished run it logs the agreement cost too."""

    def __init__(self, agreement: StopAgreement, store: Any, *, events: Any = None):
        self.agreement = agreement
        self.store = store
        self.events = events

    def on_step(self, info: StepInfo) -> None:
        from mirage_jax.train.preemption import Preempted, describe_saved

        if not info.preempted:
            return
        if self.events is not None:
            self.events.timed("checkpoint_wait", self.store.wait)
            self.events.record("preempted", step=info.new_step)
        else:
            self.store.wait()
        self.agreement.log_cost()
        raise Preempted(describe_saved(info.new_step, self.store.directory))

    def on_end(self, info: StepInfo | None) -> None:
        self.agreement.log_cost()  # last: after the checkpoint policy waited for the final save
