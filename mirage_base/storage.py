"""gs:// and local paths alike: which paths are remote, and the one preflight that turns "cannot use this URL
at all" (no credentials, no bucket, nothing listening) into one line naming the URL and what to do. Every CLI
(data_pipeline.prepare and mirage_jax's train/eval/generate/export/warm_start) calls it on its path flags.

Cloud access goes through the libraries, each honouring its own standard settings (see docs/pods.md):
gcsfs / google-cloud-storage read `STORAGE_EMULATOR_HOST`, tensorstore (Orbax's array writer) reads
`TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING`, and ArrayRecord's reader (google-cloud-cpp)
reads `CLOUD_STORAGE_EMULATOR_ENDPOINT`. Transient errors (HTTP 408/429/5xx, dropped connections) are
retried by each library with exponential backoff: gcsfs 6 attempts (1 s .. 16 s apart), tensorstore its
`gcs_request_retries` (32 attempts, 1 s .. 32 s), google-cloud-cpp its default retry policy.
"""

from __future__ import annotations

import os

import fsspec

from mirage_base.errors import ExitCode, MirageError

# gcsfs keeps directory listings forever by default (cache_timeout=None): a process that lists a workdir twice
# (export or eval after training went on, a trainer after another host saved) would not see new steps.
# Listings are re-read every time unless a user's fsspec config says otherwise.
fsspec.config.conf.setdefault("gcs", {}).setdefault("cache_timeout", 0)

# The emulator variables the libraries read, in the order docs/pods.md lists them.
EMULATOR_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                 "CLOUD_STORAGE_EMULATOR_ENDPOINT")


class StorageError(MirageError, RuntimeError):
    """A gs:// URL that cannot be used at all; the message is one line naming the URL and the remedy."""

    exit_code = ExitCode.REFUSED


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for URLs (gs://bucket/...), False for local paths."""
    return "://" in os.fspath(path)


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

