"""Child processes that die with their parent: Grain loader workers (and trainers under launch/local.py).

A kill -9 (or OOM kill) of a trainer gives its children no chance to be told. Grain's `mp_prefetch` workers
are `spawn`ed daemons that block in `queue.put` once their buffer is full, so they would wait forever,
reparented to PID 1, and keep multiprocessing's resource tracker (which exits when the last holder of its
pipe does) alive with them. Grain (0.2.x) has no option for this, so each worker runs `DieWithParent`:
a daemon thread that polls `os.getppid()` and SIGKILLs its own process once the parent is gone (within
`interval_s`). Polling, not `prctl(PR_SET_PDEATHSIG)`: the death signal fires when the parent THREAD that
forked the child exits, and Grain may start workers from a pool thread.

Workers also ignore SIGTERM and SIGINT: a signal sent to the whole process group (Ctrl-C, systemd stopping
the unit) is the trainer's to handle (it saves a checkpoint while it still needs its workers); they end
when the trainer does.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def _watch(parent_pid: int, interval_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """SIGKILL this process within `interval_s` of `parent_pid` no longer being its parent (at once if it
    already is not)."""
    threading.Thread(target=_watch, args=(parent_pid, interval_s), name="exit-with-parent", daemon=True).start()


class DieWithParent:
    """Grain `worker_init_fn(worker_index, worker_count)`: ignore SIGTERM/SIGINT, exit when the parent dies.
    Picklable (holds only the parent's pid)."""

    def __init__(self, parent_pid: int | None = None, interval_s: float = 0.5):
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid
        self.interval_s = interval_s

    def __call__(self, worker_index: int = 0, worker_count: int = 1) -> None:
        del worker_index, worker_count
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        exit_with_parent(self.parent_pid, self.interval_s)
