"""Elastic resume of a Grain-fed run (issue 19): 2 processes x 4 devices train K steps on prepared shards;
the checkpoint resumes as 1 process x 8 devices and as 2 processes x 2 devices (a mesh of 4 devices). Every
global batch (sha256 of each row, logged by each process via data.row_hash_log) and every loss equals an
uninterrupted 1 x 8 run's. The slow test adds the other direction on the CLI (1 x 8's state resumed by 2
processes); tests/test_elastic_data.py covers both directions at the loader level in the default run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_pipeline.synthetic import speech
from train_cli import loss_at, run_cli

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")]

K, T = 2, 4  # checkpoint at step K, train to T
MESH = {"mesh__ici__data": 2, "mesh__ici__fsdp": -1}


@pytest.fixture(scope="module")
def shards(prepared_shards):
    """9 records of 25 frames in 3 shards (tests/conftest.py): epochs end mid-batch (the global batch is 8)."""
    return prepared_shards


def _train(root, shards, name, processes, devices, steps):
    workdir = root / name
    result = run_cli(workdir, processes=processes, devices=devices, cache_dir=str(root / "jax_cache"),
                     train__steps=steps, data__row_hash_log=str(workdir / "rows"), data__source=shards,
                     data__worker_count=0, checkpoint__save_every=K, **MESH)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def _resume(root, shards, name, src, processes, devices):
    """Copy run `src` as it stood at step K (no row logs, no later checkpoint) and train it on to T."""
    shutil.copytree(root / src, root / name)
    for f in (root / name).glob("rows.p*.jsonl"):
        f.unlink()
    shutil.rmtree(root / name / "checkpoints" / str(T), ignore_errors=True)
    out = _train(root, shards, name, processes, devices, T)
    assert f"resumed from checkpoint at step {K} of {T}" in out, out[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """workdir per run: 'two' (2 x 4 to K), 'base' (1 x 8 to T), 'one'/'small' ('two' resumed as 1 x 8 / 2 x 2)."""
    root = tmp_path_factory.mktemp("elastic")
    _train(root, shards, "two", 2, 4, K)
    _train(root, shards, "base", 1, 8, T)
    _resume(root, shards, "one", "two", 1, 8)
    _resume(root, shards, "small", "two", 2, 2)
    return root


def _rows(workdir):
    """(step, global row) -> sha256, from every process's log; a row logged twice must agree."""
    out = {}
    for f in sorted(workdir.glob("rows.p*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            for r, h in enumerate(rec["sha256"]):
                key = (rec["step"], rec["start"] + r)
                assert out.setdefault(key, h) == h, key
    return out


def test_resumed_runs_see_the_uninterrupted_batches_bitwise(runs):
    base = _rows(runs / "base")
    assert sorted(base) == [(s, r) for s in range(T) for r in range(8)]
    assert len(set(base.values())) > 8  # distinct examples (crops differ), not one batch repeated
    two = _rows(runs / "two")
    assert two == {k: v for k, v in base.items() if k[0] < K}
    for name in ("one", "small"):
        assert _rows(runs / name) == {k: v for k, v in base.items() if k[0] >= K}, name


def test_resumed_runs_have_the_uninterrupted_losses(runs):
    for step in range(1, K + 1):  # 2 x 4 vs 1 x 8: the same batches, summation order aside
        np.testing.assert_allclose(loss_at(runs / "two", step), loss_at(runs / "base", step), rtol=1e-4)
    for name in ("one", "small"):
        for step in range(K + 1, T + 1):
            np.testing.assert_allclose(loss_at(runs / name, step), loss_at(runs / "base", step), rtol=1e-4,
                                       err_msg=f"{name} step {step}")


def test_the_data_state_is_one_global_position(runs, shards):
    for name in ("two", "base"):
        files = sorted(p.name for p in (runs / name / "checkpoints" / str(K) / "data").glob("*.json"))
        assert files == ["data_state.json"], files
        state = json.loads((runs / name / "checkpoints" / str(K) / "data" / "data_state.json").read_text())
        assert {k: state[k] for k in ("kind", "step", "next_sample", "global_batch_size", "seed")} == {
            "kind": "grain", "step": K, "next_sample": 8 * K, "global_batch_size": 8, "seed": 0}


@pytest.mark.slow
def test_one_process_state_resumes_in_two_processes(runs, shards):
    _resume(runs, shards, "back", "base", 2, 2)
    base = _rows(runs / "base")
    assert _rows(runs / "back") == {k: v for k, v in base.items() if k[0] >= K}
    for step in range(K + 1, T + 1):
        np.testing.assert_allclose(loss_at(runs / "back", step), loss_at(runs / "base", step), rtol=1e-4)
