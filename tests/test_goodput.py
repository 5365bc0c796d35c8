"""Goodput accounting (mirage_jax/goodput.py) against a hand-built event log whose answer is worked out by
hand below, and its CLI (`python -m mirage_jax.goodput`). The end-to-end check on a real run that is SIGKILLed
and resumed is in tests/test_train_resume.py (test_kill9_and_resume_is_bitwise_identical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mirage_jax import goodput
from train_cli import ROOT


def ev(t, event, run, **kw):
    return {"t": t, "event": event, "run": run, **kw}


def two_runs() -> list[dict]:
    """Run a initializes, trains steps 1-6 (2 s each from dispatch to metrics, 0.5 s of it drawing the next
    batch, 0.5 s between steps), commits checkpoint 4, and dies after step 6 (t=22.5). Run b starts at t=30,
    restores checkpoint 4 and trains steps 5-8, then saves 8 and ends at t=46.5."""
    a = [ev(0.0, "job_start", "a", process_count=1), ev(2.0, "init", "a"),
         ev(3.5, "restore", "a", step=0, restored=False, dt=1.0), ev(4.0, "data", "a", dt=0.5),
         ev(7.0, "compile", "a", dt=3.0)]
    for k in range(1, 7):
        start = 8.0 + 2.5 * (k - 1)
        a.append(ev(start + 2.0, "step", "a", step=k, start=start, data_s=0.5))
        if k == 4:
            a.append(ev(start + 2.25, "checkpoint_save", "a", step=4, dt=0.25))
    b = [ev(30.0, "job_start", "b", process_count=1), ev(31.0, "init", "b"),
         ev(33.0, "restore", "b", step=4, restored=True, dt=1.5), ev(33.5, "data", "b", dt=0.5),
         ev(35.5, "compile", "b", dt=2.0)]
    for k in range(5, 9):
        start = 36.0 + 2.5 * (k - 5)
        b.append(ev(start + 2.0, "step", "b", step=k, start=start, data_s=0.5 if k < 8 else 0.0))
    b += [ev(45.75, "checkpoint_save", "b", step=8, dt=0.25), ev(46.25, "checkpoint_wait", "b", dt=0.5),
          ev(46.5, "job_end", "b", step=8, status="done")]
    return a + b


def test_two_runs_by_hand():
    s = goodput.summarize(two_runs()[::-1])  # any order: rows are grouped by run and sorted by start
    assert s.total_s == pytest.approx(46.5)  # 0 .. 46.5
    # run a keeps steps 1-4 (1.5 s each: 2 s less 0.5 s drawing); run b: steps 5-7 1.5 s, step 8 2 s
    assert s.productive_s == pytest.approx(12.5)
    assert s.goodput == pytest.approx(12.5 / 46.5)
    assert s.badput == pytest.approx({
        "initialization": 3.0,  # a: 0 -> 2; b: 30 -> 31
        "training_prep": 3.5,  # a: init the state 1.0 + (8 - 2 - 1 - 0.5 - 3) = 1.5; b: 36 - 31 - 1.5 - 0.5 - 2 = 1.0
        "program_startup": 5.0,  # 3 + 2
        "data_loading": 5.5,  # a: 0.5 + 6 x 0.5; b: 0.5 + 3 x 0.5
        "checkpoint_save": 1.0,  # a: 0.25; b: 0.25 + 0.5
        "checkpoint_restore": 1.5,
        "wasted_progress": 3.0,  # a's steps 5 and 6 (1.5 s each), redone by b from checkpoint 4
        "infrastructure_recovery": 7.5,  # a's last event 22.5 -> b's start 30
        "other": 4.0,  # a: 5 gaps x 0.5 - 0.25 saving; b: 3 gaps x 0.5 + (46.5 - 45.5) - 0.25 - 0.5
    })
    assert s.runs == 2 and s.steps == 8


def test_an_uninterrupted_run_wastes_nothing():
    a = [r for r in two_runs() if r["run"] == "a"] + [ev(23.0, "job_end", "a", step=6, status="done")]
    s = goodput.summarize(a)
    assert s.total_s == 23.0 and s.productive_s == pytest.approx(9.0)
    assert s.badput["wasted_progress"] == 0 and s.badput["infrastructure_recovery"] == 0


def test_damaged_lines_are_skipped_and_counted():
    text = "".join(json.dumps(r) + "\n" for r in two_runs())
    lines = (text + '{"t": 50, "event": "job_end"\n[1, 2]\n{"t": "x", "event": "a", "run": "c"}\n').splitlines()
    events, damaged = goodput.parse_events(lines)
    assert damaged == 3 and len(events) == len(two_runs())


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mirage_jax.goodput", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_json_and_one_line_errors(tmp_path):
    (tmp_path / "goodput.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two_runs()) + '{"torn": \n')
    r = _cli(f"--workdir={tmp_path}", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["goodput"] == pytest.approx(12.5 / 46.5) and out["total_s"] == pytest.approx(46.5)
    assert out["productive_s"] == pytest.approx(12.5) and out["badput"]["wasted_progress"] == pytest.approx(3.0)
    assert out["damaged_lines"] == 1 and "skipped 1 damaged line" in r.stderr
    r = _cli(f"--workdir={tmp_path / 'nope'}")
    assert r.returncode == 2 and r.stderr.strip() == f"goodput: --workdir={tmp_path / 'nope'}: no such directory"
    (tmp_path / "goodput.jsonl").write_text("")
    r = _cli(f"--workdir={tmp_path}")
    assert r.returncode == 2 and "no valid event" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_non_utf8_bytes_damage_only_their_line_and_a_directory_is_one_line(tmp_path):
    """A torn write can leave bytes that are not UTF-8: the reader (the CLI's and the resuming trainer's) skips
    that line and counts it; a directory where the log belongs is a GoodputError, not a traceback."""
    from etils import epath

    from mirage_jax.train.hooks.goodput import EventLog

    good = json.dumps({"t": 1.0, "event": "job_start", "run": "a"}) + "\n"
    (tmp_path / goodput.FILE).write_bytes(good.encode() + b"\xff\xfe{\"t\": 2" + bytes(range(128, 160)) + b"\n")
    events, damaged = goodput.read_log(epath.Path(tmp_path) / goodput.FILE)
    assert [e["event"] for e in events] == ["job_start"] and damaged == 1
    assert EventLog(str(tmp_path), enabled=True).prior == events  # a resume reads the same file the same way
    (tmp_path / "d" / goodput.FILE).mkdir(parents=True)
    with pytest.raises(goodput.GoodputError, match="a directory where the goodput log belongs"):
        goodput.read_log(epath.Path(tmp_path / "d") / goodput.FILE)


def test_setup_events_reach_the_file_before_any_step(tmp_path):
    """A run killed during restore or compile (before a step row) still leaves its start and setup rows on disk:
    the file is read while the log is open, as a crash would leave it."""
    from mirage_jax.train.hooks.goodput import EventLog

    log = EventLog(str(tmp_path), enabled=True, flush_interval_s=3600.0)  # gs://-like: no flush per event
    log.record("job_start")
    log.record("init")
    log.record("restore", step=0, restored=False, dt=0.1)
    log.record("compile", dt=2.0)
    rows = [json.loads(line)["event"] for line in (tmp_path / goodput.FILE).read_text().splitlines()]
    assert rows == ["job_start", "init", "restore", "compile"]
    log.close()
