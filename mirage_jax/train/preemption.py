"""Preemption: SIGTERM or SIGINT (Ctrl-C) at any moment -> save the newest completed step (if any) -> exit 0.

- `install_handler()` runs first thing in `python -m mirage_jax.train` (before absl, JAX, the config), so a
  SIGTERM or Ctrl-C during setup, restore or compilation is remembered, never fatal. launch/local.py starts its
  processes with SIGTERM blocked, so even one that lands during interpreter start-up stays pending until
  the handler is in place.
- Ctrl-C is a preemption like SIGTERM (no KeyboardInterrupt: one raised inside a collective, e.g. Orbax's save
  barrier, left the other processes waiting in the matching collective forever). A SECOND Ctrl-C (at least
  `REPEAT_S` after the first: a terminal's Ctrl-C reaches every process of its process group, so a trainer
  started by a forwarding wrapper in that group gets one keypress twice; launch/local.py avoids that by
  starting the trainers in their own group) exits at once with status 130, naming the last committed
  checkpoint.
- Signals are acted on by a thread ("mirage-signals") woken through `signal.set_wakeup_fd`, not by the Python
  handler: Python runs a handler only when the main thread returns to the interpreter, which never happens
  while it waits in a collective whose peer is gone. The thread sets the stop flag, prints the stop line,
  and starts the stop watchdog: a process still alive `stop_timeout_s()` after the first signal
  (MIRAGE_STOP_TIMEOUT_S, default 120 s) writes one line naming the last committed checkpoint and exits
  (130 after SIGINT, 143 after SIGTERM) whatever it was blocked in. A normal stop (finish the current step,
  save it, exit) takes a step plus a save; every collective in flight ends once every process is stopping.
- The stop step is agreed by the processes themselves: `PreemptionWatcher.agree()` all-gathers each
  process's (stop requested, async save failed) flags at the same points of the loop (before and after
  compiling the first step, and after every step), so a signal that reached any one process stops all
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

import os
import signal
import sys
import threading
import time
import types
from typing import Any

_REQUESTED = threading.Event()
_FINISHED = threading.Event()  # set by mark_finished: signals after that change nothing
REPEAT_S = 1.0  # a second SIGINT sooner than this after the first is the same keypress delivered twice
DEFAULT_STOP_TIMEOUT_S = 120.0
EXIT_FORCED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as a shell reports a kill
_first: dict[str, Any] = {}  # "signal", "time" of the first stop signal
_committed: dict[str, Any] = {"directory": None, "step": None}  # the newest checkpoint known to be committed
_installed: dict[str, Any] = {}


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is committed (or before the first step, when there
    is nothing new to save); the CLI exits 0 on it."""


def stop_timeout_s() -> float:
    """Seconds a process may take to stop after the first stop signal before the watchdog forces it out
    (MIRAGE_STOP_TIMEOUT_S; default 120)."""
    try:
        return float(os.environ.get("MIRAGE_STOP_TIMEOUT_S", DEFAULT_STOP_TIMEOUT_S))
    except ValueError:
        return DEFAULT_STOP_TIMEOUT_S


def note_committed(directory: Any, step: int | None) -> None:
    """Called by the checkpoint store: `step` (None: none yet) is committed under `directory`."""
    _committed["directory"] = directory
    if step is not None and (_committed["step"] is None or step > _committed["step"]):
        _committed["step"] = step


def last_committed() -> str:
    """'the last committed checkpoint is N in DIR' (a local directory is listed now; gs:// gives the newest this
    process saw committed), or what is known when there is none."""
    directory, step = _committed["directory"], _committed["step"]
    if directory is None:
        return "no checkpoint store was opened yet (nothing new was saved)"
    path = os.fspath(directory)
    if "://" not in path:
        try:
            steps = [int(n) for n in os.listdir(path) if n.isdigit()]
            step = max(steps) if steps else None
        except OSError:
            pass
    if step is None:
        return f"no checkpoint was committed in {path}"
    return f"the last committed checkpoint is {step} in {path}"


def _name(signum: int) -> str:
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


def signal_name() -> str:
    """How the stop was asked for: 'SIGTERM', 'SIGINT (Ctrl-C)' (SIGTERM when none was received)."""
    return _name(_first.get("signal", signal.SIGTERM))


def _force_exit(signum: int, why: str) -> None:
    sys.stderr.write(f"STOPPED WITHOUT SAVING (exit {EXIT_FORCED.get(signum, 1)}): {why}; {last_committed()}; "
                     "rerun the same command to resume from it\n")
    sys.stderr.flush()
    os._exit(EXIT_FORCED.get(signum, 1))


def _watchdog(signum: int, limit: float) -> None:
    time.sleep(limit)
    _force_exit(signum, f"still running {limit:.0f} s after {_name(signum)} (blocked in a collective or barrier, or "
                        "a peer process is gone; MIRAGE_STOP_TIMEOUT_S sets the bound)")


def mark_finished() -> None:
    """The run is over (trained to its end, or stopped with its checkpoint committed): a later Ctrl-C, e.g. the
    second press of an impatient user, must not turn the clean exit 0 into 130. Call from the main thread."""
    _FINISHED.set()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also while the interpreter shuts down


def _on_signal(signum: int) -> None:
    """The stop logic for one delivered signal (run in the "mirage-signals" thread)."""
    now = time.monotonic()
    if _FINISHED.is_set():
        return
    if not _REQUESTED.is_set():
        _first.update(signal=signum, time=now)
        _REQUESTED.set()
        sys.stderr.write(f"{_name(signum)} received: will save after the current step (if one completed) and exit 0"
                         + ("; Ctrl-C again to exit at once without saving" if signum == signal.SIGINT else "")
                         + "\n")
        sys.stderr.flush()
        limit = stop_timeout_s()
        if limit > 0:
            threading.Thread(target=_watchdog, args=(signum, limit), name="mirage-stop-watchdog",
                             daemon=True).start()
    elif signum == signal.SIGINT and now - _first["time"] >= REPEAT_S:
        _force_exit(signal.SIGINT, "Ctrl-C again")


def _read_signals(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in (signal.SIGINT, signal.SIGTERM):
                _on_signal(signum)


def _python_level(signum: int, frame: types.FrameType | None) -> None:
    """The Python-level handler does nothing: its C part wakes the "mirage-signals" thread, which acts."""
    del signum, frame


def install_handler() -> None:
    """Handle SIGTERM and SIGINT from now on (idempotent; the main thread only); unblocks SIGTERM, so one held
    pending since exec arrives here (launch/local.py starts its processes with both blocked)."""
    if "fd" not in _installed:
        r, w = os.pipe()
        os.set_blocking(w, False)
        _installed["fd"] = w
        threading.Thread(target=_read_signals, args=(r,), name="mirage-signals", daemon=True).start()
    signal.set_wakeup_fd(_installed["fd"], warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _python_level)
    signal.signal(signal.SIGINT, _python_level)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def requested() -> bool:
    """True once this process received SIGTERM or SIGINT."""
    return _REQUESTED.is_set()


class PreemptionWatcher:
    """`agree(save_failed)` -> (stop, some process's save failed), identical on every process; raises
    WorkdirInUseError on every process when process 0's ownership of the workdir was taken over.

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

        from mirage_base.errors import WorkdirInUseError
        from mirage_jax.train import ownership

        t = time.perf_counter()
        lost = ownership.lost()
        flags = np.array([requested(), save_failed, lost is not None], np.int32)
        if self.multi:
            from jax.experimental import multihost_utils

            flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 3).max(axis=0)
        if flags[2]:
            raise WorkdirInUseError(f"{lost or 'the workdir was taken over by another trainer (process 0 names it)'}"
                                    f"; this run stops without saving ({last_committed()})")
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
        """Nothing to undo: the handler stays for the rest of the process (a late signal is harmless)."""


def describe_saved(step: int, directory: Any) -> str:
    """The clean-exit message of a stop that saved `step`."""
    return f"{signal_name()}: checkpoint {step} saved in {directory}; rerun the same command to resume"


def describe_nothing_trained(start: int, directory: Any) -> str:
    where = f"checkpoint {start} in {directory} is unchanged" if start else f"no checkpoint was written in {directory}"
    return (f"{signal_name()} before the first step: nothing new was trained; {where}; rerun the same command to "
            "resume")
