"""Each benchmark function at a minimal size: result structure and sanity (positive, finite, ratio = x / y),
and the results.md renderer. No timing assertions: performance claims come from `python -m bench`, never
from a unit test."""

from __future__ import annotations

import math
from typing import Any

import pytest

# One block, one latent frame: compiles in seconds on a 2-core CPU.
MINI = {"model.num_layers": 1, "shapes.latent_frames": 1, "shapes.audio_frames": 1, "train.global_batch_size": 2}
RESULTS: dict[str, dict[str, Any]] = {}


def _pos(*xs: float) -> None:
    for x in xs:
        assert math.isfinite(x) and x > 0, x


def test_train_step() -> None:
    from bench import train_step

    r = train_step.measure(batch=1, layers=1, heads=2, frames=1, rounds=1, steps=1, profile=True)
    _pos(r["jax_samples_per_s"], r["torch_samples_per_s"], r["jax_gflops_per_s"], r["step_flops_analytic"])
    assert r["ratio"] == pytest.approx(r["jax_samples_per_s"] / r["torch_samples_per_s"])
    assert r["profile"]["torch_top_ops"] and r["profile"]["jax_cost_analysis"]["flops"] > 0
    RESULTS["train_step"] = r


def test_efficiency() -> None:
    from bench import efficiency

    r = efficiency.measure(rounds=1, matmul=256, overrides=MINI, reps=1)
    _pos(r["step_flops_per_s"], r["matmul_flops_per_s"], r["step_flops_compiled_corrected"])
    assert r["efficiency"] == pytest.approx(r["step_flops_per_s"] / r["matmul_flops_per_s"])
    RESULTS["efficiency"] = r


def test_seq_parallel() -> None:
    from bench import seq_parallel

    r = seq_parallel.measure(sizes=(2,), rounds=1, overrides=MINI, devices=2)  # one compile
    assert [x["sequence"] for x in r["rows"]] == [2]
    for x in r["rows"]:
        _pos(x["step_s"], x["memory_per_device_bytes"], x["step_time_vs_first"], x["memory_vs_first"])
    assert r["rows"][0]["all_to_all"] > 0  # Ulysses: tokens <-> heads by all-to-all
    RESULTS["seq_parallel"] = r


def test_checkpoint(tmp_path) -> None:
    from bench import checkpoint

    r = checkpoint.measure(rounds=1, video_dim=32, layers=1, directory=str(tmp_path))
    _pos(r["save_GBps"], r["restore_GBps"], r["raw_write_GBps"], r["raw_read_GBps"], r["save_blocking_s"])
    assert r["save_vs_raw_write"] == pytest.approx(r["save_GBps"] / r["raw_write_GBps"])
    assert r["restore_vs_raw_read"] == pytest.approx(r["restore_GBps"] / r["raw_read_GBps"])
    assert r["save_blocking_s"] <= r["save_commit_s"] <= r["save_fsync_s"]
    assert list(tmp_path.iterdir()) == []  # cleaned up
    RESULTS["checkpoint"] = r


def test_data() -> None:
    from bench import data_loader

    r = data_loader.loader_vs_step(clips=1, batch=2, rounds=1, batches_per_round=1, step_overrides=MINI)
    _pos(r["loader_samples_per_s"], r["step_samples_per_s"])
    assert r["ratio"] == pytest.approx(r["loader_samples_per_s"] / r["step_samples_per_s"])
    RESULTS["data"] = r


def test_report(tmp_path) -> None:
    """results.md renders every section from real (minimal) results, and a failure is reported, not hidden."""
    import bench.__main__ as run_all
    from bench import common

    results = dict(RESULTS)
    results["broken"] = {"error": "exit 1: boom"}
    out = tmp_path / "results.md"
    text = run_all.write_report(results, common.machine_info(), str(out), quick=True, findings="found x")
    assert out.read_text() == text
    assert "## Machine" in text and "found x" in text
    for name in RESULTS:
        assert name in text
