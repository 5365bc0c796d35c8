"""Filesystem paths: local folders and gs:// URLs alike (etils.epath over gcsfs; Orbax over tensorstore).

Cloud access goes through the libraries, each honouring its own standard settings (see docs/pods.md):
gcsfs / google-cloud-storage read `STORAGE_EMULATOR_HOST`, tensorstore (Orbax's array writer) reads
`TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING`, and ArrayRecord's reader (google-cloud-cpp)
reads `CLOUD_STORAGE_EMULATOR_ENDPOINT`. Transient errors (HTTP 408/429/5xx, dropped connections) are
retried by each library with exponential backoff: gcsfs 6 attempts (1 s .. 16 s apart), tensorstore its
`gcs_request_retries` (32 attempts, 1 s .. 32 s), google-cloud-cpp its default retry policy.

`check_storage` is the one place that turns "cannot use this URL at all" (no credentials, no bucket,
nothing listening) into one line naming the URL and what to do; the CLIs call it on their path flags.
"""

from __future__ import annotations

import os
import uuid
from typing import IO

import fsspec
from etils import epath

from data_pipeline.errors import MirageError

# gcsfs keeps directory listings forever by default (cache_timeout=None): a process that lists a workdir twice
# (export or eval after training went on, a trainer after another host saved) would not see new steps.
# Listings are re-read every time unless a user's fsspec config says otherwise.
fsspec.config.conf.setdefault("gcs", {}).setdefault("cache_timeout", 0)

# The emulator variables the libraries read, in the order docs/pods.md lists them.
EMULATOR_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                 "CLOUD_STORAGE_EMULATOR_ENDPOINT")


class StorageError(MirageError, RuntimeError):
    """A gs:// URL that cannot be used at all; the message is one line naming the URL and the remedy."""

    exit_code = 2


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for URLs (gs://bucket/...), False for local paths."""
    return "://" in os.fspath(path)


def orbax_path(path: str | os.PathLike[str]) -> epath.Path:
    """`path` as an epath: local paths made absolute (Orbax refuses relative ones, and `--workdir=run` /
    `--checkpoint=run` is what people type); URLs such as gs://bucket/run are kept as they are."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _check_emulator_settings(url: str) -> None:
    """With STORAGE_EMULATOR_HOST set, every library must point at the emulator too (else tensorstore or
    ArrayRecord would try the real GCS and hang or fail far from the cause)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    missing = [v for v in EMULATOR_VARS[1:] if not os.environ.get(v)]
    if missing:
        hint = " ".join(f"{v}={'dummy' if v == 'GOOGLE_AUTH_TOKEN_FOR_TESTING' else host}" for v in missing)
        raise StorageError(f"{url}: STORAGE_EMULATOR_HOST={host} is set but {', '.join(missing)} is not; "
                           f"set {hint} so that Orbax (tensorstore) and the shard reader use the emulator too")


def _check_credentials(url: str) -> None:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return  # the emulator takes any token
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(f"{url}: no Google Cloud credentials ({first}); run `gcloud auth application-default "
                           "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a key file (TPU VMs and GKE with "
                           "workload identity need nothing: see docs/pods.md)") from None


def check_storage(*paths: str | os.PathLike[str] | None) -> None:
    """Raise StorageError (one line) if a gs:// path among `paths` cannot be reached: gcsfs missing,
    emulator half-configured, no credentials, no such bucket, access denied, or no connection (after
    gcsfs's own retries). Local paths and None are skipped; each bucket is checked once."""
    seen: set[str] = set()
    for p in paths:
        if p is None or not is_remote(p):
            continue
        url = os.fspath(p)
        if not url.startswith("gs://"):
            continue  # other schemes: left to their fsspec backends
        bucket = _bucket(url)
        if bucket in seen:
            continue
        seen.add(bucket)
        try:
            import gcsfs  # noqa: F401 - epath needs it for gs://
        except ImportError:
            raise StorageError(f"{url}: gs:// needs gcsfs; `pip install -r requirements.txt` pins it") from None
        _check_emulator_settings(url)
        _check_credentials(url)
        endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
        try:
            fsspec.filesystem("gcs").ls(bucket, detail=False)
        except FileNotFoundError:
            raise StorageError(f"{url}: bucket gs://{bucket} does not exist at {endpoint}; create it (`gcloud "
                               f"storage buckets create gs://{bucket}`) or fix the URL") from None
        except PermissionError as e:
            raise StorageError(f"{url}: access to gs://{bucket} denied ({str(e).splitlines()[0]}); grant this "
                               "account roles/storage.objectAdmin on the bucket") from None
        except Exception as e:  # noqa: BLE001 - anything else: connection refused/reset, DNS, TLS, 5xx after retries
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StorageError(f"{url}: cannot reach {endpoint} after gcsfs's retries ({type(e).__name__}: "
                               f"{reason}); check the network, or STORAGE_EMULATOR_HOST for an emulator") from None


class AppendLog:
    """A text file that grows by appended lines, locally or on GCS (whose objects cannot be appended to).

    Locally: an ordinary file opened in append mode. On GCS: each `flush` uploads the buffered lines as a
    new object and composes it onto the end of the file server-side (GCS compose), so earlier lines (from
    a run that is resumed) are kept and no flush rewrites the whole file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = epath.Path(path)
        self.remote = is_remote(path)
        self._buf: list[str] = []
        self._local: IO[str] | None = None if self.remote else self.path.open("a")

    def write(self, text: str) -> None:
        if self._local is not None:
            self._local.write(text)
        else:
            self._buf.append(text)

    def flush(self) -> None:
        if self._local is not None:
            self._local.flush()
            return
        if not self._buf:
            return
        fs = fsspec.filesystem("gcs")
        target = os.fspath(self.path)
        data = "".join(self._buf).encode()
        if not fs.exists(target):
            fs.pipe(target, data)
        else:
            part = f"{target}.part-{uuid.uuid4().hex}"
            fs.pipe(part, data)
            try:
                fs.merge(target, [target, part])
            finally:
                fs.rm(part)
        self._buf.clear()

    def close(self) -> None:
        self.flush()
        if self._local is not None:
            self._local.close()


def upload_dir(local_dir: str, url: str, *, last: str | None = None) -> None:
    """Copy the files of `local_dir` to the folder `url` (gs://...), the file named `last` after all
    others (a reader that finds it finds the rest complete); files already in `url` that `local_dir`
    lacks are removed afterwards."""
    fs = fsspec.filesystem("gcs")
    dst = epath.Path(url)
    names = sorted(os.listdir(local_dir), key=lambda n: (n == last, n))
    for name in names:  # streamed (resumable upload), never whole in memory
        fs.put_file(os.path.join(local_dir, name), os.fspath(dst / name))
    for stale in (q for q in (dst.iterdir() if dst.exists() else []) if q.name not in names):
        stale.unlink()
