"""`python -m mirage_jax.aot --search`: the Pareto front (hand-worked points), the sweep's candidates, and
with libtpu one real sweep of configs/tiny.py on v5e:2x2 (3 compiles)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mirage_jax.aot import search as aot_search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 2**30


def _p(mem_gib: float, ceiling: float | None, fits: bool = True) -> dict:
    return {"fits": fits, "memory_per_device_bytes": mem_gib * G, "mfu_ceiling": ceiling}


def test_pareto_front_by_hand() -> None:
    points = [
        _p(20, 0.56),  # 0: least memory -> on the front
        _p(30, 0.56),  # 1: more memory, same ceiling as 0 -> dominated
        _p(30, 0.68),  # 2: on the front
        _p(80, 0.70),  # 3: on the front (highest ceiling that fits)
        _p(90, 0.71, fits=False),  # 4: does not fit -> never on the front
        _p(85, 0.69),  # 5: dominated by 3
        _p(25, None),  # 6: no ceiling (did not compile) -> ignored
        _p(30, 0.68),  # 7: a tie with 2: neither dominates the other
    ]
    assert aot_search.pareto(points) == [0, 2, 7, 3]


def test_candidates_follow_the_slice() -> None:
    from configs.mirage_10b import get_config

    cfg = get_config()
    pts = aot_search.candidates(cfg, 128, ["full", "save_splash"], [3, 4], [1], [1, 2])
    assert {p["sequence"] for p in pts} == {4}  # 3 does not divide 128 devices
    assert [(p["remat"], p["accum"], p["global_batch"]) for p in pts] == [
        ("full", 1, 32), ("full", 2, 64), ("save_splash", 1, 32), ("save_splash", 2, 64)]
    c = aot_search.configure(cfg, pts[1])
    assert (c.model.remat_policy, c.mesh.ici.sequence, c.mesh.ici.fsdp, c.train.global_batch_size,
            c.train.grad_accum) == ("full", 4, -1, 64, 2)
    assert cfg.train.grad_accum == 1  # the original is untouched
    assert {p["fused_bwd"] for p in pts} == {cfg.model.splash_fused_bwd}  # the config's backward kernel
    both = aot_search.candidates(cfg, 128, ["save_splash"], [4], [1], [1], [False, True])
    assert [aot_search.configure(cfg, p).model.splash_fused_bwd for p in both] == [False, True]


def test_tiny_search_on_a_tpu_topology() -> None:
    pytest.importorskip("libtpu", reason="libtpu not installed: pip install -r requirements-tpu.txt")
    out = subprocess.run(
        [sys.executable, "-m", "mirage_jax.aot", "--config=configs/tiny.py", "--topology=v5e:2x2", "--search",
         "--search_remat=none,full", "--search_accum=1,2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    assert "4 points" in table and "Highest MFU ceiling that fits" in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "GiB" in ln]
    assert len(rows) == 4 and any(ln.startswith("| * |") for ln in rows)


def test_search_point_lays_out_like_the_shipped_layout() -> None:
    """A search point with a shipped layout's numbers gives that layout's config (one place applies a layout:
    the state over fsdp x sequence, not replicated across the sequence axis), starting from the default
    rules of a config that was laid out for another slice."""
    from configs.mirage_10b import LAYOUTS, get_config
    from mirage_jax.run_config import PARAM_RULES

    base = get_config("layout=v5p512")  # another layout (save_splash_down)
    base.mesh.rules.params = PARAM_RULES  # the default rules: `embed` on fsdp alone
    want = get_config("layout=v6e256")
    sequence, batch, remat, fused = LAYOUTS["v6e256"]
    got = aot_search.configure(base, {"remat": remat, "fused_bwd": fused, "sequence": sequence, "micro": 1,
                                      "accum": 1, "global_batch": batch})
    for field in ("mesh", "train", "model"):
        assert got[field].to_dict() == want[field].to_dict(), field
    assert dict(got.mesh.rules.params)["embed"] == ("fsdp", "sequence")
