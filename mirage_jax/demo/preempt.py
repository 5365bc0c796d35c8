"""Preemption drill from outside a run: start a training command, wait until its metrics log reaches a step,
send SIGTERM (what a pod scheduler sends before preempting), and wait for the run to exit.

Used by `mirage_jax.demo` (the README demo's drill on the launcher) and by the tests that check a preempted
run saves and exits 0 (tests/test_train_resume.py, tests/test_launch_multiprocess.py). The run's own
handling of the signal is `train.preemption`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

_STEP = re.compile(r'"step": (\d+)')


def last_logged_step(workdir: str | os.PathLike) -> int:
    """The highest step in `workdir`/metrics.jsonl (0 when there is none yet); a partly written last line is
    read up to where it ends."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            text = f.read()
    except OSError:
        return 0
    return max((int(s) for s in _STEP.findall(text)), default=0)


@dataclasses.dataclass(frozen=True)
class DrillResult:
    """How the drilled run ended: its exit status, its whole output (stdout and stderr), and the last logged
    step when SIGTERM was sent (None: the run exited before reaching the step and got no signal)."""

    returncode: int
    output: str
    signalled_at: int | None


def preempt_at_step(cmd: Sequence[str], workdir: str | os.PathLike, step: int, *,
                    cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                    timeout: float | None = None, on_line: Callable[[str], None] | None = None,
                    on_signal: Callable[[int], None] | None = None, poll_s: float = 0.2) -> DrillResult:
    """Run `cmd` (a training run that logs to `workdir`/metrics.jsonl); once its logged step is >= `step`,
    send it SIGTERM; wait for it to exit.

    `on_line` gets every output line as it arrives (e.g. to echo it); `on_signal` gets the logged step just
    before the signal is sent. `timeout` (seconds, None: no limit)
    bounds the wait for the step and, separately, the wait for the exit after the signal; past either the
    run is killed and TimeoutError raised with the end of its output.
    """
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env) if env is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_exit(limit: float | None, what: str) -> int:
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join()
            raise TimeoutError(f"{what} within {limit:.0f} s: {list(cmd)[:4]}...; output ends:\n"
                               f"{''.join(lines)[-3000:]}") from None
        reader.join()
        return rc

    deadline = None if timeout is None else time.monotonic() + timeout
    signalled_at = None
    while proc.poll() is None:
        reached = last_logged_step(workdir)
        if reached >= step:
            if on_signal is not None:
                on_signal(reached)
            proc.send_signal(signal.SIGTERM)
            signalled_at = reached
            break
        if deadline is not None and time.monotonic() > deadline:
            wait_exit(0.0, f"the run did not log step {step}")
        time.sleep(poll_s)
    rc = wait_exit(timeout, "the run did not exit after SIGTERM" if signalled_at is not None else "the run")
    return DrillResult(rc, "".join(lines), signalled_at)
