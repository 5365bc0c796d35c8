"""The training loop's hooks (mirage_jax/train/hooks), one at a time: fake metrics dicts, a fake clock, fake
stores and writers; no JAX compile, no subprocess. Expected values are worked out by hand in each test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train.hooks import CallbackHook, Clock, StepInfo
from mirage_jax.train.hooks.checkpoint import CheckpointPolicy
from mirage_jax.train.hooks.goodput import EventLog, GoodputRecorder
from mirage_jax.train.hooks.metrics_window import MetricsWindow
from mirage_jax.train.hooks.nonfinite import NonFiniteError, NonFiniteGuard
from mirage_jax.train.hooks.profiler import ProfilerWindow
from mirage_jax.train.hooks.stop import PreemptionStop, StopAgreement
from mirage_jax.train.preemption import Preempted


class FakeClock:
    """perf and wall advance only when the test says so (`tick`)."""

    def __init__(self, wall0: float = 1000.0):
        self.now, self.wall0 = 0.0, wall0

    def tick(self, s: float) -> None:
        self.now += s

    def clock(self) -> Clock:
        return Clock(perf=lambda: self.now, wall=lambda: self.wall0 + self.now)


def metrics(finite: bool = True, streak: int = 0, total: int = 0, loss: float = 1.0,
            buckets: tuple[float, ...] = (1.0, 0.0), counts: tuple[float, ...] = (1.0, 0.0)) -> dict:
    return {"loss": np.float32(loss), "grad_norm": np.float32(2.0), "lr": np.float32(1e-3),
            "finite": np.bool_(finite), "nonfinite_streak": np.int32(streak), "nonfinite_total": np.int32(total),
            "loss_per_bucket": np.asarray(buckets, np.float32), "bucket_counts": np.asarray(counts, np.float32)}


def info(step: int, total: int = 100, start: int = 0, **kw) -> StepInfo:
    m = kw.pop("m", None) or metrics()
    return StepInfo(step=step, new_step=step + 1, total_steps=total, metrics=m, first=step == start, **kw)


class FakeWriter:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def write(self, step, scalars):
        self.rows.append((step, scalars))


class FakeStore:
    directory = "/run/checkpoints"

    def __init__(self, error=None):
        self.saved, self.waits, self.error = [], 0, error

    def save(self, step, state, data_state, config, meta):
        self.saved.append((step, data_state, meta))

    def wait(self):
        self.waits += 1

    def all_steps(self):
        return [s for s, _, _ in self.saved]

    def save_error(self):
        e, self.error = self.error, None
        return e


class FakeWatcher:
    def __init__(self, answers):
        self.answers, self.calls, self.asked = list(answers), 0, []

    def agree(self, save_failed=False):
        self.asked.append(save_failed)
        self.calls += 1
        return self.answers.pop(0)

    def barrier(self, name):
        pass

    def mean_cost_s(self):
        return 0.001


def test_metrics_window_averages_exclude_the_first_step_and_reset_per_log_line():
    w = FakeWriter()
    hook = MetricsWindow(w, log_every=3, global_batch=8, n_devices=2, flops_per_sample=1e12,
                         tokens_per_sample=100, peak=4e12)
    # steps 0..5: step times 9 (warm-up), 1, 2 | 3, 4, 5; data waits 0.5 each; bucket 0 loss 1..6
    for s, (dt, loss) in enumerate(zip([9, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], strict=True)):
        hook.on_step(info(s, m=metrics(buckets=(loss, 0.0)), step_time_s=dt, data_wait_s=0.5))
    assert [step for step, _ in w.rows] == [3, 6]
    first, second = w.rows[0][1], w.rows[1][1]
    assert first["step_time_s"] == pytest.approx(1.5)  # (1 + 2) / 2: the warm-up step is not averaged
    assert first["data_wait_s"] == pytest.approx(0.5)
    assert first["samples_per_s"] == pytest.approx(8 / 1.5)
    assert first["tokens_per_s_per_device"] == pytest.approx(8 * 100 / 1.5 / 2)
    assert first["tflops_per_device"] == pytest.approx(8e12 / 1.5 / 2 / 1e12)
    assert first["mfu"] == pytest.approx(8e12 / 1.5 / 2 / 4e12)
    assert first["loss_per_bucket"][0] == pytest.approx(2.0) and math.isnan(first["loss_per_bucket"][1])
    assert second["step_time_s"] == pytest.approx(4.0)  # (3 + 4 + 5) / 3
    assert second["loss_per_bucket"][0] == pytest.approx(5.0)


def test_metrics_window_logs_the_last_step_and_extra_scalars():
    w = FakeWriter()
    hook = MetricsWindow(w, log_every=10, global_batch=4, n_devices=1)
    hook.on_step(info(3, total=4, start=3, step_time_s=2.0, scalars={"goodput": 0.25}))
    (step, row), = w.rows
    assert step == 4 and row["step_time_s"] == 2.0 and row["goodput"] == 0.25  # only the warm-up step: its time
    assert "tflops_per_device" not in row and "mfu" not in row


def test_profiler_window_traces_exactly_its_steps():
    calls = []
    hook = ProfilerWindow("/w", start_step=2, steps=3, enabled=True, start_trace=lambda d: calls.append(("start", d)),
                          stop_trace=lambda: calls.append(("stop", None)))
    for s in range(8):
        hook.before_step(s)
        calls.append(("step", s))
        hook.on_step(info(s))
    hook.on_end(None)
    assert calls[calls.index(("start", "/w/profile")) - 1] == ("step", 1)
    assert calls[calls.index(("stop", None)) - 1] == ("step", 4)  # steps 2, 3, 4 traced
    assert calls.count(("stop", None)) == 1
    off = ProfilerWindow("/w", 0, 1, enabled=False, start_trace=lambda d: calls.append("x"), stop_trace=calls.clear)
    off.before_step(0)
    off.on_end(None)
    assert "x" not in calls


def test_nonfinite_guard_warns_then_stops_after_k_in_a_row():
    store = FakeStore()
    guard = NonFiniteGuard(3, store)
    guard.on_step(info(0, m=metrics(finite=False, streak=1, total=1)))
    guard.on_step(info(1, m=metrics(finite=False, streak=2, total=2)))
    assert store.waits == 0
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps \(train.max_nonfinite_steps=3\) "
                                             r"ending at step 3"):
        guard.on_step(info(2, m=metrics(finite=False, streak=3, total=3)))
    assert store.waits == 1  # the last good checkpoint was committed before stopping


def meta(step, preempted):
    return {"step": step, "preempted": preempted}


def test_checkpoint_policy_due_steps_streaks_and_preemption():
    store, fc = FakeStore(), FakeClock()
    policy = CheckpointPolicy(store, {}, save_every=4, meta=meta, clock=fc.clock())
    for s in range(10):
        finite = s + 1 != 8  # step 8 inside a non-finite streak: due, but skipped
        policy.on_step(info(s, total=10, m=metrics(finite=finite), data_state={"pos": s + 1}))
    assert [(s, d["pos"]) for s, d, _ in store.saved] == [(4, 4), (10, 10)]
    p = info(4, total=10, m=metrics(finite=False), preempted=True)  # a preemption saves even a non-finite step
    policy.on_step(p)
    assert store.saved[-1][0] == 5 and store.saved[-1][2]["preempted"] is True
    policy.on_end(None)
    assert store.waits == 1


def test_stop_agreement_and_preemption_stop():
    store = FakeStore()
    agreement = StopAgreement(FakeWatcher([(False, False), (True, False)]), store)
    stop = PreemptionStop(agreement, store)
    i = info(0)
    agreement.on_step(i)
    stop.on_step(i)  # not preempted: nothing
    assert not i.preempted and store.waits == 0
    i = info(1)
    agreement.on_step(i)
    assert i.preempted
    with pytest.raises(Preempted, match="checkpoint 2 saved in /run/checkpoints"):
        stop.on_step(i)
    assert store.waits == 1
    # a save that failed here is raised as it is; one that failed elsewhere names the store
    own = ckpt_lib.CheckpointSaveError("writing checkpoint 4 failed")
    watcher = FakeWatcher([(False, True)])
    with pytest.raises(ckpt_lib.CheckpointSaveError, match="checkpoint 4 failed"):
        StopAgreement(watcher, FakeStore(error=own)).on_step(info(4))
    assert watcher.asked == [True]  # the others learn of it in the same agreement
    with pytest.raises(ckpt_lib.CheckpointSaveError, match="failed on another process"):
        StopAgreement(FakeWatcher([(False, True)]), FakeStore()).on_step(info(4))
    with pytest.raises(Preempted, match="SIGTERM before the first step"):
        StopAgreement(FakeWatcher([(True, False)]), store).before_first_step("compiled", 0)


def test_callback_hook_gets_the_new_step():
    seen = []
    CallbackHook(seen.append).on_step(info(6))
    assert seen == [7]


def test_goodput_recorder_rows_and_running_goodput(tmp_path):
    fc = FakeClock(wall0=1000.0)
    # an earlier run: started at 900, one step 950..960 (productive 10 s, data 0), step 2, which this run redoes
    prior = [{"t": 900.0, "event": "job_start", "run": "a"},
             {"t": 960.0, "event": "step", "run": "a", "step": 1, "start": 950.0, "data_s": 0.0},
             {"t": 975.0, "event": "step", "run": "a", "step": 2, "start": 960.0, "data_s": 0.0}]
    (tmp_path / "goodput.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prior) + '{"torn\n')
    log = EventLog(str(tmp_path), enabled=True, clock=fc.clock(), run_id="b")
    assert [r["step"] for r in log.prior if r["event"] == "step"] == [1, 2]  # the torn line skipped
    log.record("job_start", t=990.0)
    log.record("restore", step=1, restored=True, dt=2.0)
    saved = []
    store = type("S", (FakeStore,), {"save": lambda self, *a: saved.append((tmp_path / "goodput.jsonl").read_text())})()
    policy = CheckpointPolicy(store, {}, save_every=2, meta=meta, events=log, clock=fc.clock())
    rec = GoodputRecorder(log)
    assert rec.productive_before == 10.0  # step 2 of run a is redone from checkpoint 1: not counted
    i = info(1, start=1, started_at=1000.0, ended_at=1010.0, draw_s=2.0)
    rec.on_step(i)
    # (10 s of run a + 8 s of this step) / (1010 - 900)
    assert i.scalars["goodput"] == pytest.approx(18.0 / 110.0)
    fc.tick(5.0)
    policy.on_step(i)  # step 2 is due: the goodput rows are on disk before the save starts
    assert '"event": "step", "run": "b", "step": 2' in saved[0]
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "goodput.jsonl").read_text().splitlines()[4:]]
    assert [r["event"] for r in rows] == ["job_start", "restore", "step", "checkpoint_save"]
    assert rows[2] == {"t": 1010.0, "event": "step", "run": "b", "step": 2, "start": 1000.0, "data_s": 2.0}
    assert rows[3]["dt"] == 0.0 and rows[3]["step"] == 2


def test_disabled_event_log_writes_nothing(tmp_path):
    log = EventLog(str(tmp_path / "w"), enabled=False, clock=FakeClock().clock())
    log.record("job_start")
    log.flush()
    log.close()
    assert not (tmp_path / "w").exists()
    assert [r["event"] for r in log.head] == ["job_start"]
