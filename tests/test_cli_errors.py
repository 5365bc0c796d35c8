"""A user's wrong path gets one line naming it and exit 2 (prepare: 1, its SystemExit), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from train_cli import ROOT, run_cli


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_train_on_a_missing_data_source(tmp_path):
    r = run_cli(tmp_path / "run", **{"data.source": str(tmp_path / "nowhere"), "train.steps": 1})
    assert r.returncode == 2 and "Traceback" not in r.stdout, r.stdout[-3000:]
    assert f"DATA ERROR: {tmp_path / 'nowhere'}" in r.stdout


@pytest.mark.parametrize("args", [
    ("mirage_jax.generate", "--checkpoint={missing}", "--out={tmp}/x.mp4", "--say=hello"),
    ("mirage_jax.eval", "--checkpoint={missing}", "--data={missing}"),
    ("data_pipeline.prepare", "--input={missing}", "--output={tmp}/out"),
])
def test_missing_paths_are_one_line(tmp_path, args):
    r = _cli(*(a.format(missing=tmp_path / "nowhere", tmp=tmp_path) for a in args))
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(tmp_path / "nowhere") in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, names", [
    (("mirage_jax.train", "--config=configs/tiny.py", "--workdir={tmp}/w", "--config.train.steps=abc"),
     "--config.train.steps=abc"),
    (("mirage_jax.train", "--config=configs/tiny.py", "--workdir={tmp}/w", "--config.checkpoint.async_save=maybe"),
     "--config.checkpoint.async_save=maybe"),
    (("mirage_jax.train", "--config=configs/tiny.py", "--work-dir={tmp}/w"), "work_dir"),
    (("mirage_jax.train", "--config=configs/tiny.py"), "--workdir"),
    (("mirage_jax.train", "--config=configs/nope.py", "--workdir={tmp}/w"), "configs/nope.py"),
    (("mirage_jax.describe", "--config=configs/mirage_10b.py:seconds=-4"), "seconds=-4"),
    (("mirage_jax.describe", "--config=configs/tiny.py", "--config.shapes.latent_frames=-5"),
     "--config.shapes.latent_frames=-5"),
    (("mirage_jax.eval", "--checkpoint={tmp}", "--data={tmp}", "--seeds=0"), "--seeds=0"),
    (("data_pipeline.synthesize", "--out={tmp}/raw", "--clips=0"), "--clips=0"),
    (("mirage_jax.export", "--checkpoint={tmp}", "--out={tmp}/e", "--dtype=fp16"), "--dtype"),
])
def test_bad_flags_and_config_values_are_one_line_exit_2(tmp_path, args, names):
    """Flags absl or ml_collections cannot parse, and values out of range, as a new user typed them: one line
    naming the flag, exit 2, nothing written."""
    r = _cli(*(a.format(tmp=tmp_path) for a in args))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert names in last, last
    assert not (tmp_path / "w").exists() and not (tmp_path / "raw").exists()


def test_dashed_config_override_is_accepted(tmp_path):
    r = run_cli(tmp_path / "run", extra=["--config.train.log-every=1"], **{"train.steps": 0})
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-3000:]
