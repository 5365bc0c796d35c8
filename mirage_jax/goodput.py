"""Goodput of a training job across every restart: `python -m mirage_jax.goodput --workdir=W [--json]`.

The trainer (process 0) appends timestamped events to `W/goodput.jsonl` (`train.hooks.goodput`), one JSON
object per line, each with `t` (Unix seconds), `event` and `run` (one id per process start):

  job_start {process_count}    the CLI started (first line of `python -m mirage_jax.train`)
  init                         the config was validated and the mesh/layout built (`RunSetup`)
  restore {step, restored, dt} the state was restored from checkpoint `step` (restored=true) or initialized
  data {dt}                    the first batch was drawn
  compile {dt}                 the train step was compiled
  step {step, start, data_s}   step `step` ran from `start` to `t`; `data_s` of it drew the next batch
  checkpoint_save {step, dt}   the blocking part of starting checkpoint `step`
  checkpoint_wait {dt}         waiting for started saves (end of run, preemption, non-finite stop)
  preempted {step}             the job stopped on an agreed preemption after saving `step`
  job_end {step, status}       the trainer returned (status: done, preempted, error)

Accounting (badput categories of maxtext's ml-goodput-measurement, `BadputType`, named here in lower case):
- `total_s`: first `job_start` to the last event of the last run;
- `productive_s`: for every step row, `t - start - data_s`, except steps recomputed later;
- `initialization` (TPU_INITIALIZATION): `job_start` to `init` of each run;
- `training_prep` (TRAINING_PREP): `init` to the first step's start, less the restore, compile and data time
  in it (so: building the state from scratch, the data source, the barriers);
- `program_startup` (PROGRAM_STARTUP): `compile`;
- `data_loading` (DATA_LOADING_SYNC): `data` and every step's `data_s`;
- `checkpoint_save` (UNPRODUCTIVE_CHECKPOINT_SAVE_TIME): `checkpoint_save` and `checkpoint_wait`;
- `checkpoint_restore` (UNPRODUCTIVE_CHECKPOINT_RESTORE_TIME): `restore` of a run that restored;
- `wasted_progress` (WASTED_PROGRESS_FROM_DISRUPTION): the productive time of a run's steps after the step the
  next run that restored started from (committed before the disruption: those steps were done twice);
- `infrastructure_recovery` (INFRASTRUCTURE_RECOVERY_FROM_DISRUPTION): a run's last event to the next
  run's `job_start` (the process was dead or not yet started);
- `other`: the rest of `total_s` (logging, the per-step stop agreement, hooks).
So `productive_s + sum(badput) == total_s`, and `goodput = productive_s / total_s`. Timestamps of different
runs come from process 0's host clock of each run (hosts of one job are assumed NTP-synchronized).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from mirage_base.errors import ExitCode, MirageError

FILE = "goodput.jsonl"
CATEGORIES = ("initialization", "training_prep", "program_startup", "data_loading", "checkpoint_save",
              "checkpoint_restore", "wasted_progress", "infrastructure_recovery", "other")


class GoodputError(MirageError):
    """No goodput log to read (missing workdir, no goodput.jsonl, no valid event): exit 2."""

    exit_code = ExitCode.REFUSED


def parse_events(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """(valid events in file order, count of damaged lines skipped). A line is damaged when it is not a JSON
    object with a numeric `t`, a string `event` and a `run` (e.g. the torn last line of a killed writer)."""
    events, damaged = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            damaged += 1
            continue
        if (not isinstance(row, dict) or not isinstance(row.get("t"), (int, float))
                or not isinstance(row.get("event"), str) or "run" not in row):
            damaged += 1
            continue
        events.append(row)
    return events, damaged


def read_events(workdir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """`parse_events` of `workdir`/goodput.jsonl (local or gs://); GoodputError if there is none."""
    from etils import epath

    root = epath.Path(workdir)
    if not root.exists():
        raise GoodputError(f"--workdir={os.fspath(workdir)}: no such directory")
    path = root / FILE
    if not path.exists():
        raise GoodputError(f"{path}: no goodput log (written by `python -m mirage_jax.train` since issue 27; "
                           "is this a training workdir?)")
    return read_log(path)


def read_log(path: Any) -> tuple[list[dict[str, Any]], int]:
    """`parse_events` of the log file at `path` (an `epath.Path`): bytes that are not UTF-8 (a torn or damaged
    write) only damage their own line. Raises GoodputError for a directory in the log's place."""
    if path.is_dir():
        raise GoodputError(f"{path}: a directory where the goodput log belongs; move it away and rerun")
    return parse_events(path.read_bytes().decode("utf-8", errors="replace").splitlines())


@dataclasses.dataclass
class Summary:
    """Seconds: `total_s` wall time, `productive_s` step time kept, `badput` {category: seconds}."""

    total_s: float
    productive_s: float
    badput: dict[str, float]
    runs: int
    steps: int

    @property
    def goodput(self) -> float:
        return self.productive_s / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"goodput": self.goodput, "total_s": self.total_s, "productive_s": self.productive_s,
                "badput": dict(self.badput), "runs": self.runs, "steps": self.steps}


def _runs(events: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Events grouped by `run`, runs ordered by their first timestamp (job_start when present)."""
    by: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        by.setdefault(e["run"], []).append(e)

    def begin(rows: list[dict[str, Any]]) -> float:
        return next((r["t"] for r in rows if r["event"] == "job_start"), min(r["t"] for r in rows))

    return sorted(by.values(), key=begin)


def summarize(events: Sequence[dict[str, Any]]) -> Summary:
    """The goodput accounting of the module docstring over `events` (any order; grouped by run)."""
    if not events:
        return Summary(0.0, 0.0, {c: 0.0 for c in CATEGORIES}, 0, 0)
    runs = _runs(events)
    bad = {c: 0.0 for c in CATEGORIES}
    productive, n_steps = 0.0, 0
    begins = [next((r["t"] for r in rows if r["event"] == "job_start"), min(r["t"] for r in rows)) for rows in runs]
    ends = [max(r["t"] for r in rows) for rows in runs]
    restored_at = [next((int(r["step"]) for r in rows if r["event"] == "restore"), None) for rows in runs]
    for i, rows in enumerate(runs):
        # the step this run's work is redone from: the restore step of the next run that restored (or initialized)
        redo_from = next((s for s in restored_at[i + 1:] if s is not None), None)
        init_t = next((r["t"] for r in rows if r["event"] == "init"), None)
        if init_t is not None:
            bad["initialization"] += init_t - begins[i]
        steps = [r for r in rows if r["event"] == "step"]
        prep_end = min((r["start"] for r in steps), default=ends[i])
        prep_other = 0.0  # restore/compile/data time inside [init, first step start)
        for r in rows:
            kind, dt = r["event"], float(r.get("dt", 0.0))
            if kind == "restore":
                bad["checkpoint_restore" if r.get("restored") else "training_prep"] += dt
                prep_other += dt
            elif kind == "compile":
                bad["program_startup"] += dt
                prep_other += dt
            elif kind == "data":
                bad["data_loading"] += dt
                prep_other += dt
            elif kind in ("checkpoint_save", "checkpoint_wait"):
                bad["checkpoint_save"] += dt
        if init_t is not None:
            bad["training_prep"] += max(prep_end - init_t - prep_other, 0.0)
        for r in steps:
            data_s = float(r.get("data_s", 0.0))
            bad["data_loading"] += data_s
            useful = r["t"] - r["start"] - data_s
            if redo_from is not None and int(r["step"]) > redo_from:
                bad["wasted_progress"] += useful
            else:
                productive += useful
                n_steps += 1
        if i + 1 < len(runs):
            bad["infrastructure_recovery"] += max(begins[i + 1] - ends[i], 0.0)
    total = max(ends) - min(begins)
    bad["other"] = total - productive - sum(v for k, v in bad.items() if k != "other")
    return Summary(total, productive, bad, len(runs), n_steps)


def format_summary(s: Summary, damaged: int = 0) -> str:
    """The human-readable table of `main` (seconds and % of the total)."""
    pct = (lambda v: 100.0 * v / s.total_s) if s.total_s > 0 else (lambda v: 0.0)
    lines = [f"goodput {100.0 * s.goodput:.1f}% over {s.runs} run(s): {s.productive_s:.1f} s productive of "
             f"{s.total_s:.1f} s ({s.steps} steps kept)"]
    lines += [f"  {k:<24} {v:>10.1f} s {pct(v):6.1f}%" for k, v in s.badput.items()]
    if damaged:
        lines.append(f"  ({damaged} damaged line(s) of {FILE} skipped)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        from absl import app

        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = flags.FLAGS.workdir
    events, damaged = read_events(workdir)
    if not events:
        raise GoodputError(f"{workdir}/{FILE}: no valid event" + (f" ({damaged} damaged line(s))" if damaged else ""))
    s = summarize(events)
    if damaged:
        print(f"goodput: skipped {damaged} damaged line(s) of {workdir}/{FILE}", file=sys.stderr)
    if flags.FLAGS.json:
        print(json.dumps({**s.as_dict(), "damaged_lines": damaged}))
    else:
        print(format_summary(s, damaged))


def _run() -> None:
    from absl import flags

    from mirage_base.cli import run

    flags.DEFINE_string("workdir", None, "The training run's directory (local or gs://).")
    flags.DEFINE_bool("json", False, "Print one JSON object: goodput, total_s, productive_s, badput {category: s}.")
    flags.mark_flags_as_required(["workdir"])
    run(main, "goodput")


if __name__ == "__main__":
    _run()
