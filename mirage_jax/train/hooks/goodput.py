"""Goodput events: `EventLog` appends the run's timestamped events to WORKDIR/goodput.jsonl (process 0 only;
gs:// too, through `paths.AppendLog`); `GoodputRecorder` is the hook that adds one `step` row per step and
the running goodput scalar of log steps. The event names and the accounting are in `mirage_jax.goodput`.

Flushing: locally after every step (a write of one line); on gs:// (each flush composes an object, and GCS
allows about one write per second to an object) at most every `flush_interval_s`, and always before a
checkpoint save starts, so a committed checkpoint is never newer than the rows of the steps it holds.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from mirage_jax.train.hooks import SYSTEM_CLOCK, Clock, Hook, StepInfo

T = TypeVar("T")


# written through at once (a handful per run, seconds apart even on gs://, whose objects take ~1 write/s)
_SETUP_EVENTS = frozenset({"job_start", "restore", "compile", "preempted", "job_end"})

class EventLog:
    """`record(event, **fields)` appends `{"t", "event", "run", **fields}` (t: `clock.wall()` unless given).

    Disabled (`enabled=False`: processes other than 0) it records nothing. `prior`: the valid events already in
    the file when it was opened (earlier runs of the job), read before appending; `head`: this run's rows other
    than `step` rows (kept in memory, on every process).
    """

    def __init__(self, workdir: str, *, enabled: bool, clock: Clock = SYSTEM_CLOCK, run_id: str | None = None,
                 flush_interval_s: float | None = None):
        from mirage_base.storage import is_remote

        self.clock = clock
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.enabled = enabled
        self.prior: list[dict[str, Any]] = []
        self.head: list[dict[str, Any]] = []
        self.log: Any = None
        remote = is_remote(os.fspath(workdir))
        self.flush_interval_s = (60.0 if remote else 0.0) if flush_interval_s is None else flush_interval_s
        self._flushed_at = clock.perf()
        if not enabled:
            return
        from etils import epath

        from mirage_jax.goodput import FILE, read_log
        from mirage_jax.paths import AppendLog

        out = epath.Path(workdir)
        out.mkdir(parents=True, exist_ok=True)
        if (out / FILE).exists():
            self.prior, _ = read_log(out / FILE)
        self.log = AppendLog(out / FILE)

    def record(self, event: str, *, t: float | None = None, **fields: Any) -> None:
        row = {"t": self.clock.wall() if t is None else t, "event": event, "run": self.run_id, **fields}
        if event != "step":
            self.head.append(row)
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")
            if event in _SETUP_EVENTS:  # a run killed before its first step still leaves its start and setup
                self.flush()
            elif event != "step":
                self.maybe_flush()

    def timed(self, event: str, fn: Callable[[], T], **fields: Any) -> T:
        """`fn()`, recording `event` with its duration `dt` (also when it raises)."""
        t = self.clock.perf()
        try:
            return fn()
        finally:
            self.record(event, dt=self.clock.perf() - t, **fields)

    def maybe_flush(self) -> None:
        """Flush if `flush_interval_s` passed since the last flush (0: always)."""
        if self.clock.perf() - self._flushed_at >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = self.clock.perf()
        if self.log is not None:
            self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.flush()
            self.log.close()
            self.log = None


class GoodputRecorder(Hook):
    """One `step` row per step (`info.started_at`, `info.ended_at`, `info.draw_s`), and `info.scalars["goodput"]`:
    the job's goodput so far, (productive seconds of earlier runs, less their steps this run redoes, + this
    run's) / (now - the job's first start), the same accounting as `mirage_jax.goodput.summarize`.

    Created after this run's restore: its rows so far (`events.head`: job_start, init, restore, ...) decide what
    of the earlier runs (`events.prior`) was wasted.
    """

    def __init__(self, events: EventLog):
        from mirage_jax.goodput import summarize

        self.events = events
        before = [*events.prior, *events.head]
        self.productive_before = summarize(before).productive_s if events.prior else 0.0
        self.first_start = min((e["t"] for e in before if e["event"] == "job_start"), default=None)
        self.productive = 0.0

    def on_step(self, info: StepInfo) -> None:
        self.events.record("step", t=info.ended_at, step=info.new_step, start=info.started_at,
                           data_s=info.draw_s)
        self.productive += info.ended_at - info.started_at - info.draw_s
        if self.first_start is not None and info.ended_at > self.first_start:
            info.scalars["goodput"] = (self.productive_before + self.productive) / (info.ended_at - self.first_start)
        self.events.maybe_flush()
