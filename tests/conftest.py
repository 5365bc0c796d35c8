"""Every test sees 8 CPU devices (multi-device code is tested on CPU) and a quiet, CPU-only JAX."""

import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# where libtpu is installed, the in-process AOT tests hold its host lockfile for the whole session and the
# `python -m mirage_jax.aot` children would be refused; they only compile (no TPU here), so several may load it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI a missing espeak-ng is a failure, not ten skipped modules (the Makefile's sysdeps installs it)."""
    import shutil

    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and shutil.which("espeak-ng") is None:
        pytest.exit("espeak-ng is not installed under CI: `make sysdeps` (apt-get install espeak-ng) must run first",
                    returncode=1)


@pytest.fixture(scope="session")
def prepared_shards(tmp_path_factory):
    """3 synthetic sources x 3 s cut into 1 s clips: 9 records of 25 frames (64x64) in 3 shards (4, 4, 1).
    Shared by the loader tests; read-only (a test that damages shards copies them first). Needs espeak-ng."""
    from data_pipeline.ingest.per_source import IngestConfig
    from data_pipeline.prepare import run
    from data_pipeline.synthesize import synthesize

    raw = str(tmp_path_factory.mktemp("raw"))
    synthesize(raw, clips=3, seconds=3.0, seed=11, size=(64, 64), progress=False)
    out = str(tmp_path_factory.mktemp("prepared"))
    run(raw, out, IngestConfig(clip_seconds=1.0), records_per_shard=4, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A one-step run of configs/tiny.py:fast (data.source 'synthetic') with its checkpoint at step 1; read-only
    (a test that edits it copies it first). Its model fits `prepared_shards`' encoders (s2d 64x64, log-mel, hash)."""
    from train_cli import run_cli

    work = tmp_path_factory.mktemp("tiny") / "run"
    r = run_cli(work, devices=1, **{"train.steps": 1, "checkpoint.save_every": 1, "checkpoint.async_save": False})
    assert r.returncode == 0, r.stdout[-3000:]
    return work


@pytest.fixture(scope="session")
def bucketed_raw(tmp_path_factory):
    """4 synthetic 3 s sources: a/ two at 64x64 (aspect 1), b/ two at 96x64 (aspect 1.5). Needs espeak-ng."""
    from data_pipeline.synthesize import synthesize

    raw = tmp_path_factory.mktemp("bucket_raw")
    synthesize(str(raw / "a"), clips=2, seconds=3.0, seed=21, size=(64, 64), progress=False)
    synthesize(str(raw / "b"), clips=2, seconds=3.0, seed=22, size=(96, 64), progress=False)
    return str(raw)


@pytest.fixture(scope="session")
def bucketed_shards(bucketed_raw, tmp_path_factory):
    """`bucketed_raw` prepared as 4 shape buckets: clip lengths 0.2 s and 0.4 s (5 and 10 frames: short, so that the
    train tests compile and step in seconds) x sizes 64x64 and 80x48 (b/ is nearest 80x48's aspect: covered to
    80x53, centre-cropped). Records: 0.2s_*: 30 each (15 per 3 s source), 0.4s_*: 14 each."""
    from data_pipeline import buckets
    from data_pipeline.ingest.per_source import IngestConfig

    out = str(tmp_path_factory.mktemp("bucketed"))
    buckets.run(bucketed_raw, out, IngestConfig(), [0.2, 0.4], [(64, 64), (80, 48)], records_per_shard=8,
                progress=False)
    return out
