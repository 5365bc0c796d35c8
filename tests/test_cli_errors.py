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
