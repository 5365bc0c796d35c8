"""Preemption: SIGTERM at any moment -> save the newest completed step (if any) -> exit 0.

- `install_handler()` runs first thing in `python -m mirage_jax.train` (before absl, JAX, the config), so a
  SIGTERM during setup, restore or compilation is remembered, never fatal. launch/local.py starts its
  processes with SIGTERM blocked, so even one that lands during interpreter start-up stays pending until
  the handler is in place.
- The stop step is agreed by the processes themselves: `PreemptionWatcher.agree()` all-gathers each
  process's (stop requested, async save failed) flags at the same points of the loop (before and after
  compiling the first step, and after every step), so a SIGTERM that reached any one process stops all
  of them at the same step, and they save that step together.

Why not JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`)? Its C++ manager
(xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc) reacts to SIGTERM by publishing each
process's LAST `step` passed to `reached_preemption_sync_point` (0 before the first call), takes the maximum
+ 1 as the sync point, and afterwards returns True only when called with exactly that number. A resumed run
that is signalled before its first call (restore, compilation of step 14) publishes 0, the sync point becomes
1, and steps 14, 15, ... never equal it: the notice is swallowed and the run trains on until it is killed.
`distributed.initialize` therefore turns that service off (it would also replace this module's handler
with its own C++ one).
"""

from __future__ import annotations

import signal
import sys
import threading
import types
from typing import Any

_REQUESTED = threading.Event()


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is committed (or before the first step, when there
    is nothing new to save); the CLI exits 0 on it."""


def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    if not _REQUESTED.is_set():
        _REQUESTED.set()
        sys.stderr.write("SIGTERM received: will save after the current step (if one completed) and exit 0\n")
        sys.stderr.flush()


def install_handler() -> None:
    """Handle SIGTERM from now on (idempotent); unblocks SIGTERM, so one held pending since exec arrives here."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def requested() -> bool:
    """True once this process received SIGTERM."""
    return _REQUESTED.is_set()


class PreemptionWatcher:
    """`agree(save_failed)` -> (stop, some process's save failed), identical on every process.

    All processes must call `agree` at the same points (it is a collective when there are several).
    `seconds` accumulates its wall time after each step (the per-step cost of the agreement).
    """

    def __init__(self) -> None:
        import jax

        self.multi = jax.process_count() > 1
        self.seconds = 0.0
        self.calls = 0
        install_handler()  # again: a library may have replaced it during setup

    def agree(self, save_failed: bool = False) -> tuple[bool, bool]:
        import time

        import numpy as np

        t = time.perf_counter()
        flags = np.array([requested(), save_failed], np.int32)
        if self.multi:
            from jax.experimental import multihost_utils

            flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2).max(axis=0)
        if self.calls >= 2:  # the two calls before the first step (which set up the collective) are not per-step
            self.seconds += time.perf_counter() - t
        self.calls += 1
        return bool(flags[0]), bool(flags[1])

    def barrier(self, name: str, timeout_s: float = 600.0) -> None:
        """Wait for every process at `name` through the coordination service (no device collective, so a peer
        that is minutes late, e.g. still compiling on a loaded host, is waited for rather than failed)."""
        if self.multi:
            from jax._src import distributed  # the client Orbax's multihost barriers use too

            distributed.global_state.client.wait_at_barrier(f"mirage_{name}", timeout_in_ms=int(timeout_s * 1000))

    def mean_cost_s(self) -> float:
        """Mean wall time of one agreement after a step (the per-step cost of agreeing on the stop step)."""
        return self.seconds / max(self.calls - 2, 1)

    def close(self) -> None:
        """Nothing to undo: the handler stays for the rest of the process (a late SIGTERM is harmless)."""


def describe_nothing_trained(start: int, directory: Any) -> str:
    where = f"checkpoint {start} in {directory} is unchanged" if start else f"no checkpoint was written in {directory}"
    return (f"SIGTERM before the first step: nothing new was trained; {where}; rerun the same command to "
            "resume")
