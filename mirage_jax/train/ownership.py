"""One owner per workdir: a second trainer on a workdir that a live run owns is refused with one line.

The owner record (host, pid, start time, run id) is `WORKDIR/owner.json`, written when a run takes the workdir
and removed when it ends:
- local disk (or any POSIX filesystem with working `flock`, NFS v4 included): the record is for humans; the
  ownership itself is an exclusive `fcntl.flock` on `WORKDIR/owner.lock`, held for the run's life and released
  by the kernel when the process ends in any way (kill -9 included), so a crashed owner never blocks a rerun,
  and a live one cannot be taken over (stop it first; `--takeover` does not break a file lock).
- gs:// (no file locks): the record is a LEASE. It is created only if no owner object exists (GCS generation
  precondition `ifGenerationMatch=0`, so of two starters exactly one wins), renewed every `lease_s() / 4`
  seconds by a background thread (each renewal conditional on the generation it wrote last), and EXPIRES
  `lease_s()` seconds after its last renewal (MIRAGE_OWNER_LEASE_S, default 120 s; measured with GCS's own
  `updated` time of the object against this host's clock). A starter that finds an unexpired lease watches it
  until it expires: renewed meanwhile (a live owner renews every lease_s() / 4 s) -> refused; run out (a crashed
  owner, e.g. a job restarted right after its pods were killed) -> taken, after at most one lease of waiting. An
  expired lease, or `--takeover`, is replaced at once, conditionally on the generation it read. An owner whose
  renewal finds another generation has lost the workdir (`lost()`); the loop's stop-flag agreement then stops
  every process without saving (`PreemptionWatcher.agree`).

In a multi-process job only process 0 takes the workdir; it publishes its decision through the JAX
coordination service's key-value store, and every process raises the same `WorkdirInUseError` (so all exit
together with the same line) or goes on. Only the owner writes checkpoints and metrics.jsonl, so both keep
one lineage.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from mirage_base.errors import WorkdirInUseError
from mirage_base.storage import is_remote

OWNER_FILE = "owner.json"
LOCK_FILE = "owner.lock"
DEFAULT_LEASE_S = 120.0
_DECISION_KEY = "mirage_workdir_owner"
_current: dict[str, Any] = {}  # "owner": the Ownership this process took or joined

log = logging.getLogger(__name__)


def lease_s() -> float:
    """The gs:// lease's time to live in seconds after its last renewal (MIRAGE_OWNER_LEASE_S; default 120)."""
    return float(os.environ.get("MIRAGE_OWNER_LEASE_S", DEFAULT_LEASE_S))


@dataclasses.dataclass(frozen=True)
class OwnerRecord:
    """Who owns a workdir. `started`: ISO 8601 UTC; `lease_s`: the lease's time to live (gs:// only)."""

    host: str
    pid: int
    started: str
    run_id: str
    lease_s: float | None = None

    @classmethod
    def mine(cls, lease: float | None = None) -> OwnerRecord:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(socket.gethostname(), os.getpid(), now, uuid.uuid4().hex[:12], lease)

    @classmethod
    def parse(cls, text: str) -> OwnerRecord | None:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d["started"]), str(d["run_id"]), d.get("lease_s"))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (started {self.started}, run {self.run_id})"


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Ownership:
    """A workdir this process owns (or, on processes other than 0, joined); `release()` gives it up."""

    def __init__(self, workdir: str, record: OwnerRecord):
        self.workdir = workdir
        self.record = record
        self._lost: str | None = None

    def lost(self) -> str | None:
        """Why the workdir is no longer ours (another owner took it over), else None."""
        return self._lost

    def release(self) -> None:
        _current.pop("owner", None)

    def __enter__(self) -> Ownership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LocalOwnership(Ownership):
    """An exclusive flock on WORKDIR/owner.lock (held while the process lives) + WORKDIR/owner.json."""

    def __init__(self, workdir: str, record: OwnerRecord, fd: int):
        super().__init__(workdir, record)
        self._fd: int | None = fd

    def release(self) -> None:
        super().release()
        if self._fd is None:
            return
        path = os.path.join(self.workdir, OWNER_FILE)
        current = read_record(self.workdir)
        if current is not None and current.run_id == self.record.run_id:
            try:
                os.remove(path)
            except OSError:
                pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _take_local(workdir: str, takeover: bool) -> LocalOwnership:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        owner = read_record(workdir)
        who = owner.describe() if owner else "another process (its owner.json is missing)"
        stop = f"`kill -TERM {owner.pid}` on {owner.host}" if owner else "stopping it"
        raise WorkdirInUseError(
            f"{workdir} is in use by {who}: one trainer per workdir. Stop that run first ({stop} saves and exits), "
            "or use another --workdir" + (" (--takeover cannot take a file lock from a live process)"
                                         if takeover else "")) from None
    previous = read_record(workdir)
    if previous is not None:
        log.warning("taking over %s from %s, which is gone (its lock was released)", workdir, previous.describe())
    record = OwnerRecord.mine()
    tmp = os.path.join(workdir, f".{OWNER_FILE}.{record.run_id}")
    with open(tmp, "w") as f:
        f.write(record.to_json() + "\n")
    os.replace(tmp, os.path.join(workdir, OWNER_FILE))
    return LocalOwnership(workdir, record, fd)


def _gcs_blob(workdir: str) -> Any:
    """The google-cloud-storage Blob of WORKDIR/owner.json (anonymous against STORAGE_EMULATOR_HOST)."""
    from google.cloud import storage

    bucket, _, prefix = workdir.split("://", 1)[1].partition("/")
    client = (storage.Client.create_anonymous_client() if os.environ.get("STORAGE_EMULATOR_HOST")
              else storage.Client())
    name = f"{prefix.strip('/')}/{OWNER_FILE}" if prefix.strip("/") else OWNER_FILE
    return client.bucket(bucket).blob(name)


class GcsOwnership(Ownership):
    """A lease object WORKDIR/owner.json renewed by a background thread (see the module docstring)."""

    def __init__(self, workdir: str, record: OwnerRecord, blob: Any, generation: int):
        super().__init__(workdir, record)
        self._blob, self._generation = blob, generation
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="mirage-owner-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        from google.api_core import exceptions as gexc

        period = max(lease_s() / 4, 0.2)
        while not self._stop.wait(period):
            try:
                self._blob.upload_from_string(self.record.to_json(), content_type="application/json",
                                              if_generation_match=self._generation)
                self._generation = self._blob.generation
            except (gexc.PreconditionFailed, gexc.NotFound):
                other = read_record(self.workdir)
                who = other.describe() if other else "its owner record was deleted"
                self._lost = (f"{self.workdir} was taken over by {who} (--takeover, or this run's lease lapsed: "
                              f"no renewal for {lease_s():.0f} s)")
                log.error("%s", self._lost)
                return
            except Exception as e:  # noqa: BLE001 - a transient error: the next period tries again
                log.warning("renewing the owner lease of %s failed (%s); retrying in %.0f s", self.workdir, e,
                            period)

    def release(self) -> None:
        super().release()
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        if self._lost is None:
            try:
                self._blob.delete(if_generation_match=self._generation)
            except Exception as e:  # noqa: BLE001 - the lease then expires by itself
                log.warning("removing the owner lease %s failed (%s); it expires by itself", self.workdir, e)


def _renewed_before(blob: Any, generation: int, expires: float, who: str) -> bool:
    """Watch a lease that has not expired: True as soon as its owner renews it (a new generation: a live owner
    renews every lease_s() / 4 s), False once it ran out unrenewed or was removed (a crashed or finished owner).
    So a job restarted right after its predecessor was killed waits at most one lease instead of failing."""
    log.warning("%s is owned by %s, whose lease expires at %s: waiting to see whether it is renewed (a live owner) "
                "or runs out (a crashed one)", blob.name, who, _utc(expires))
    while time.time() < expires:
        time.sleep(min(2.0, max(0.05, expires - time.time())))
        now = blob.bucket.get_blob(blob.name)
        if now is None:
            return False
        if now.generation != generation:
            return True
    return False


def _take_gcs(workdir: str, takeover: bool) -> GcsOwnership:
    from google.api_core import exceptions as gexc

    blob = _gcs_blob(workdir)
    ttl = lease_s()
    record = OwnerRecord.mine(ttl)
    for _ in range(10):
        try:
            blob.upload_from_string(record.to_json(), content_type="application/json", if_generation_match=0)
            return GcsOwnership(workdir, record, blob, blob.generation)
        except gexc.PreconditionFailed:
            pass
        current = blob.bucket.get_blob(blob.name)
        if current is None:
            continue  # released in between: try to create it again
        owner = OwnerRecord.parse(current.download_as_text())
        owner_ttl = float(owner.lease_s) if owner and owner.lease_s else ttl
        renewed = current.updated.timestamp()
        expires = renewed + owner_ttl
        expired = time.time() > expires
        who = owner.describe() if owner else f"an unreadable owner record {workdir}/{OWNER_FILE}"
        if not (expired or takeover):
            if _renewed_before(blob, current.generation, expires, who):
                raise WorkdirInUseError(
                    f"{workdir} is in use by {who}: one trainer per workdir; it renewed its lease while this run "
                    f"waited (a live owner; its lease lasts {owner_ttl:.0f} s from each renewal). Stop that run "
                    "first, or use --takeover if you are sure it is gone")
            continue  # the lease ran out unrenewed (a crashed owner) or was released: look again, take it
        try:
            blob.upload_from_string(record.to_json(), content_type="application/json",
                                    if_generation_match=current.generation)
        except gexc.PreconditionFailed:
            continue  # another starter replaced it first: look again
        log.warning("took over %s from %s (%s)", workdir, who,
                    "its lease expired at " + _utc(expires) if expired else "--takeover")
        return GcsOwnership(workdir, record, blob, blob.generation)
    raise WorkdirInUseError(f"{workdir}: the owner record {OWNER_FILE} kept changing while taking it; another "
                            "trainer is starting on this workdir")


def read_record(workdir: str) -> OwnerRecord | None:
    """The workdir's current owner record, or None (no owner, unreadable, or storage unreachable)."""
    try:
        if is_remote(workdir):
            return OwnerRecord.parse(_gcs_blob(workdir).download_as_text())
        with open(os.path.join(workdir, OWNER_FILE)) as f:
            return OwnerRecord.parse(f.read())
    except Exception:  # noqa: BLE001 - a missing or unreadable record names no owner
        return None


def _take(workdir: str, takeover: bool) -> Ownership:
    return _take_gcs(workdir, takeover) if is_remote(workdir) else _take_local(workdir, takeover)


def take(workdir: str, *, takeover: bool = False, timeout_s: float = 600.0) -> Ownership:
    """Own `workdir` for this run (a context manager that releases it), or raise WorkdirInUseError naming the
    owner. Every process of a job calls it: process 0 decides, the others wait for (and share) its decision."""
    import jax

    workdir = os.fspath(workdir).rstrip("/")
    if not is_remote(workdir):
        workdir = os.path.abspath(workdir)
    if jax.process_count() == 1:
        owner = _take(workdir, takeover)
    else:
        from jax._src import distributed  # the coordination service's client (key-value store)

        client = distributed.global_state.client
        if jax.process_index() == 0:
            try:
                owner = _take(workdir, takeover)
            except WorkdirInUseError as e:
                client.key_value_set(_DECISION_KEY, json.dumps({"refused": str(e)}))
                raise
            except Exception as e:  # e.g. storage unreachable: the others must not wait for a decision
                client.key_value_set(_DECISION_KEY, json.dumps({"failed": f"{type(e).__name__}: {e}"}))
                raise
            client.key_value_set(_DECISION_KEY, json.dumps({"record": owner.record.to_json()}))
        else:
            decision = json.loads(client.blocking_key_value_get(_DECISION_KEY, int(timeout_s * 1000)))
            if "refused" in decision:
                raise WorkdirInUseError(decision["refused"])
            if "failed" in decision:
                raise RuntimeError(f"process 0 could not take the workdir {workdir}: {decision['failed']}")
            owner = Ownership(workdir, OwnerRecord.parse(decision["record"]))  # type: ignore[arg-type]
    _current["owner"] = owner
    return owner


def current() -> Ownership | None:
    """The ownership this process took (or joined), None outside a trainer."""
    return _current.get("owner")


def lost() -> str | None:
    """Why this process's workdir was taken over (process 0 only knows), else None."""
    owner = current()
    return owner.lost() if owner is not None else None


def intruder() -> str | None:
    """When a trainer other than this run owns this run's workdir now: who it is ('pid N on host H (started ..., run
    ...)'); None when this run still owns it, no owner is recorded, or no ownership was taken here."""
    owner = current()
    if owner is None:
        return None
    record = read_record(owner.workdir)
    if record is None or record.run_id == owner.record.run_id:
        return None
    return record.describe()
