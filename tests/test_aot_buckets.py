"""`mirage_jax.aot` on a config with shape buckets (`data.buckets`): one compile per bucket at the batch training
would use, the fit being the worst bucket's. libtpu-free: the tiny model compiled on this host's CPU devices (a
v5e slice's HBM as the budget); the 10B 4 s + 8 s mix on v5p-256 is in bench/aot/ (docs/scaling.md)."""

from __future__ import annotations

import pytest

from mirage_jax.aot import plan as aot


def _report(compiled: bool, fits: bool, headroom: float | None) -> dict:
    return {"compiled": compiled, "fits": fits, "headroom_fraction": headroom}


def test_the_worst_bucket_decides_the_fit():
    ok, tight, over, oom = (_report(True, True, 0.5), _report(True, True, 0.2), _report(True, False, 0.05),
                            _report(False, False, None))
    assert aot.worst_bucket([ok, tight]) is tight
    assert aot.worst_bucket([over, ok]) is over
    assert aot.worst_bucket([ok, over, oom]) is oom
    assert aot.worst_bucket([_report(False, False, -0.5), oom]) is oom  # no numbers: still worst of the two


def _tiny(**shapes):
    from configs.tiny import get_config

    cfg = get_config("fast")
    cfg.model.update(num_layers=2, video_dim=32, num_heads=2, text_embed_dim=32, time_embed_dim=32, pool_heads=2)
    cfg.shapes.update(shapes)
    return cfg


def test_plan_compiles_each_bucket_at_its_batch(monkeypatch):
    """Without compiling (the compile of one shape is `_plan_one`, the slow test below runs it): plan hands each
    bucket's batch and shapes to it, in the listed order, and the top level is the worst bucket's report."""
    import jax

    calls = []

    def fake(setup, topology, topo, devices, gb, shapes, hlo_path, *, mfu, min_headroom, batch_shapes=None):
        calls.append((gb, shapes.latent_frames, shapes.audio_frames, batch_shapes["video"][0]))
        headroom = 1.0 - gb * shapes.latent_frames**2 / 100  # attention-like: the longest bucket is the largest
        return {"compiled": True, "fits": headroom >= min_headroom, "headroom_fraction": headroom,
                "global_batch_size": gb}

    monkeypatch.setattr(aot, "_plan_one", fake)
    cfg = _tiny()
    cfg.data.buckets = "short=2x8x8,long=4x8x8,longest=8x8x8"
    cfg.train.tokens_per_batch = 8 * (2 * 16 + 16 + 2 + 32)
    r = aot.plan(cfg, "v5e:1x2", devices=jax.devices()[:2])
    # budget 656 tokens: 8 x 82 short; 5 x 116 long -> 4 (the fsdp axis' 2); 3 x 180 longest -> 2
    assert calls == [(8, 2, 2, (2, 8, 8, 192)), (4, 4, 4, (4, 8, 8, 192)), (2, 8, 8, (8, 8, 8, 192))]
    assert [b["bucket"] for b in r["buckets"]] == ["short", "long", "longest"]
    assert [b["headroom_fraction"] for b in r["buckets"]] == pytest.approx([0.68, 0.36, -0.28])
    assert r["bucket"] == "longest" and not r["fits"] and r["headroom_fraction"] == pytest.approx(-0.28)


@pytest.mark.slow
def test_each_bucket_compiles_at_its_batch_as_a_single_shape_config_would():
    """Two buckets (2 and 4 latent frames) under a token budget of 8 short samples on 2 devices: batches 8 and 4
    (5 long samples fit the budget, rounded down to the fsdp axis' 2). The long bucket's report equals the plan
    of the same config with that shape and batch and no buckets (an independent compile)."""
    import jax

    devices = jax.devices()[:2]
    tokens = {2: 2 * 16 + 16 + 2 + 32, 4: 4 * 16 + 16 + 4 + 32}  # video + reference + audio + text, 4 x 4 patches
    cfg = _tiny()
    cfg.data.buckets = "short=2x8x8,long=4x8x8"
    cfg.train.tokens_per_batch = 8 * tokens[2]
    r = aot.plan(cfg, "v5e:1x2", devices=devices)
    by = {b["bucket"]: b for b in r["buckets"]}
    assert [b["bucket"] for b in r["buckets"]] == ["short", "long"]
    assert (by["short"]["global_batch_size"], by["long"]["global_batch_size"]) == (8, 4)
    assert (by["short"]["tokens_per_sample"], by["long"]["tokens_per_sample"]) == (tokens[2], tokens[4])
    assert all(b["compiled"] and b["fits"] for b in r["buckets"])
    worst = min(r["buckets"], key=lambda b: b["headroom_fraction"])
    assert r["bucket"] == worst["bucket"] and r["memory_per_device_bytes"] == worst["memory_per_device_bytes"]
    assert r["fits"] and r["mfu_ceiling"] == worst["mfu_ceiling"]

    single = _tiny(latent_frames=4, audio_frames=4)
    single.train.global_batch_size = 4
    s = aot.plan(single, "v5e:1x2", devices=devices)
    assert "buckets" not in s and "bucket" not in s  # a config without buckets: the report as before
    for key in ("memory_per_device_bytes", "compiled_flops", "analytic_flops", "mesh", "tokens_per_sample"):
        assert by["long"][key] == s[key], key


def test_a_bucket_batch_of_zero_leaves_it_out_and_unknown_names_are_refused():
    from mirage_jax.config import ConfigError
    from mirage_jax.run_config import RunConfig
    from mirage_jax.train.shape_buckets import config_buckets

    cfg = _tiny()
    cfg.data.buckets = "short=2x8x8,long=4x8x8"
    cfg.data.bucket_batch = "long=0,short=6"
    assert [(b.name, b.batch) for b in config_buckets(RunConfig.from_config(cfg), 2)] == [("short", 6)]
    cfg.data.bucket_batch = "medium=4,short=2"
    with pytest.raises(ConfigError) as e:
        config_buckets(RunConfig.from_config(cfg), 2)
    assert str(e.value) == ("--config.data.bucket_batch names ['medium'], not buckets of data.buckets="
                            "'short=2x8x8,long=4x8x8' (its buckets: short, long): give each NAME=B one of those "
                            "names, or drop it")
    cfg.data.buckets = "short=2x8"
    with pytest.raises(ConfigError, match="--config.data.buckets='short=2x8': expected NAME=TxHxW"):
        RunConfig.from_config(cfg)


@pytest.mark.slow
def test_cli_compiles_each_bucket_for_a_tpu_topology():
    """With libtpu: `python -m mirage_jax.aot --json` of the tiny config with two buckets for v5e:2x2 (4 chips):
    one JSON object, the worst bucket's report on top with both buckets' under `buckets`, exit 0 (fits)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("libtpu", reason="libtpu not installed: pip install -r requirements-tpu.txt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "mirage_jax.aot", "--config=configs/tiny.py:fast", "--topology=v5e:2x2", "--json",
         "--config.data.buckets=short=2x8x8,long=4x8x8", "--config.train.tokens_per_batch=656"],
        cwd=root, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    by = {b["bucket"]: b for b in r["buckets"]}
    assert {n: b["global_batch_size"] for n, b in by.items()} == {"short": 8, "long": 4}  # 656 / 82, 656 / 116 -> 4
    assert all(b["device_kind"] == "TPU v5 lite" and b["compiled"] and b["fits"] for b in by.values())
    assert r["bucket"] == min(by.values(), key=lambda b: b["headroom_fraction"])["bucket"] and r["fits"]
