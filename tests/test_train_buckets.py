"""Training on shape buckets (mirage_jax/train/shape_buckets.py): a dataset of 1 s and 2 s clips at two frame sizes
trains at batch > 1 on 8 CPU devices, every step on its bucket's shape (one compiled step per bucket, compiled
before the first step), buckets in proportion, and a resumed run continues the bucket sequence bitwise."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from train_cli import fast_config, read_metrics

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

# the fast config's mesh: fsdp over 8 devices, so global batches are multiples of 8. Tokens per sample (patch 2,
# video + 1 reference frame + audio + 32 text): 0.2s_64x64 (5+1)*16+5+32 = 133, 0.2s_80x48 (5+1)*15+5+32 = 127,
# 0.4s_64x64 218, 0.4s_80x48 207; a budget of 2400 tokens -> 18, 18, 11, 11 samples, rounded down to multiples of
# 8: 16, 16, 8, 8
BATCH = {"0.2s_64x64": 16, "0.2s_80x48": 16, "0.4s_64x64": 8, "0.4s_80x48": 8}
STEPS = 8
# the trained runs keep two buckets (two lengths, two sizes; B=0 leaves a bucket out), to compile two steps, not four
TWO = dict(data__bucket_batch="0.4s_64x64=0,0.2s_80x48=0")


def _cfg(data, steps=STEPS, **kw):
    return fast_config(data__source=data, data__worker_count=0, train__tokens_per_batch=2400, train__steps=steps,
                       checkpoint__save_every=4, metrics__tensorboard=False, **kw)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs (each compiles the same 4 bucket steps)."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(keys[1], 0)
    jax.config.update(keys[2], -1)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def _train(cfg, workdir, hooks=()):
    from mirage_jax.train.loop import Trainer

    t = Trainer(cfg, str(workdir), hooks=hooks)
    t.run()
    return t


def test_plan_batches_and_a_too_small_bucket_is_left_out_naming_it(bucketed_shards):
    from mirage_jax.config import ConfigError
    from mirage_jax.train.setup import RunSetup

    plan = RunSetup(_cfg(bucketed_shards)).buckets
    assert {b.name: b.batch for b in plan.buckets} == BATCH
    assert "0.2s_64x64: batch 16, 30 records" in plan.describe()
    small = RunSetup(_cfg(bucketed_shards, data__bucket_batch="0.4s_80x48=16")).buckets
    assert [b.name for b in small.buckets] == ["0.2s_64x64", "0.4s_64x64", "0.2s_80x48"]
    assert any("0.4s_80x48: left out: 14 records, fewer than its global batch 16" in n for n in small.notes)
    with pytest.raises(ConfigError, match="0.4s_80x48=3 is not a multiple of 8"):
        RunSetup(_cfg(bucketed_shards, data__bucket_batch="0.4s_80x48=3"))
    with pytest.raises(ConfigError) as e:  # the message config_buckets gives for data.buckets (test_aot_buckets)
        RunSetup(_cfg(bucketed_shards, data__bucket_batch="0.4s_80x48=16,4s_64x64=8,0.2s=8"))
    assert str(e.value) == (f"--config.data.bucket_batch names ['0.2s', '4s_64x64'], not buckets of data.source="
                            f"{bucketed_shards} (its buckets: 0.2s_64x64, 0.4s_64x64, 0.2s_80x48, 0.4s_80x48): give "
                            "each NAME=B one of those names, or drop it")


@pytest.fixture(scope="module")
def uninterrupted(bucketed_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("buckets_run")
    shapes = []  # the shape of each batch the compiled steps receive
    from mirage_jax.train import shape_buckets

    real = shape_buckets.BucketSteps.__call__

    def spy(self, state, batch):
        shapes.append((tuple(batch["video"].shape), tuple(batch["audio"].shape)))
        return real(self, state, batch)

    shape_buckets.BucketSteps.__call__ = spy
    logs, absl_log = _Records(), logging.getLogger("absl")
    level = absl_log.level
    absl_log.addHandler(logs)
    absl_log.setLevel(logging.INFO)
    try:
        trainer = _train(_cfg(bucketed_shards, data__row_hash_log=str(workdir / "rows"), **TWO), workdir)
    finally:
        shape_buckets.BucketSteps.__call__ = real
        absl_log.removeHandler(logs)
        absl_log.setLevel(level)
    trainer.log_lines = logs.lines
    return workdir, trainer, shapes


class _Records(logging.Handler):
    """The messages logged while attached (a module fixture cannot use caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_the_start_line_names_the_rows_each_bucket_feeds(uninterrupted):
    """One process over the 8 devices feeds every row of each bucket's own batch (16 and 8, BATCH), not of
    train.global_batch_size (8: the line said 'feeds batch rows [0, 8)' for the batch-16 bucket too)."""
    line = next(x for x in uninterrupted[1].log_lines if " parameters; process 0 feeds " in x)
    assert line.endswith("process 0 feeds rows [0, 16) of bucket 0.2s_64x64's batch 16, rows [0, 8) of "
                         "0.4s_80x48's batch 8"), line


def test_every_step_has_its_buckets_shape_and_rows_say_so(bucketed_shards, uninterrupted):
    workdir, trainer, shapes = uninterrupted
    top = json.load(open(os.path.join(bucketed_shards, "manifest.json")))
    entry = {e["name"]: e for e in top["buckets"]}
    rows = [r for r in read_metrics(workdir) if "bucket" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert len(shapes) == STEPS
    for r, (video, audio) in zip(rows, shapes, strict=True):
        e, b = entry[r["bucket"]], BATCH[r["bucket"]]
        assert r["batch"] == b
        assert video[:4] == (b, e["latent_frames"], e["latent_height"], e["latent_width"])
        assert audio[:2] == (b, e["audio_frames"])
        assert np.isfinite(r["loss"])
    assert {r["bucket"] for r in rows} == {"0.2s_64x64", "0.4s_80x48"}
    assert any(k.startswith("bucket/") and k.endswith("/loss") for k in rows[-1])


def test_buckets_in_proportion_over_many_steps(bucketed_shards):
    """The plan's schedule over 4000 steps: each bucket's share within 4 binomial sigmas of N_b / B_b normalised
    (records / batch: 30/16, 14/8, 30/16, 14/8 -> 1.875/7.25 = 0.259, 1.75/7.25 = 0.241)."""
    from mirage_jax.train.setup import RunSetup

    plan = RunSetup(_cfg(bucketed_shards)).buckets
    n = 4000
    got = np.bincount([plan.schedule.bucket(s) for s in range(n)], minlength=4) / n
    want = np.array([e.records / e.batch for e in plan.buckets])
    want = want / want.sum()
    np.testing.assert_allclose(want, [1.875 / 7.25, 1.75 / 7.25] * 2)
    assert np.all(np.abs(got - want) < 4 * np.sqrt(want * (1 - want) / n)), got


def test_resume_continues_the_bucket_sequence_bitwise(bucketed_shards, uninterrupted, tmp_path):
    """Killed after step 4's checkpoint (an exception from a step hook, the in-process stand-in for kill -9; the
    CLI's kill -9 and 2 x 4 -> 1 x 8 resume are the slow test below): resumed, steps 5..8 give the uninterrupted
    run's losses and batch rows bitwise."""
    base, _, _ = uninterrupted
    workdir = tmp_path / "resumed"

    class Stop(Exception):
        pass

    def stop_after(step):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        _train(_cfg(bucketed_shards, data__row_hash_log=str(workdir / "rows"), **TWO), workdir, hooks=[stop_after])
    _train(_cfg(bucketed_shards, data__row_hash_log=str(workdir / "rows2"), **TWO), workdir)
    want = {r["step"]: (r["bucket"], r["loss"]) for r in read_metrics(base) if "bucket" in r}
    got = {r["step"]: (r["bucket"], r["loss"]) for r in read_metrics(workdir) if "bucket" in r and r["step"] > 4}
    assert got == {s: want[s] for s in range(5, STEPS + 1)}
    rows = lambda p: [json.loads(x) for x in open(p).read().splitlines()]  # noqa: E731
    assert rows(workdir / "rows2.p0.jsonl") == [r for r in rows(base / "rows.p0.jsonl") if r["step"] >= 4]


def test_changing_the_bucket_list_is_refused_like_a_dataset_change(bucketed_shards, uninterrupted, tmp_path):
    from data_pipeline.loader.order import DataStateError

    base, _, _ = uninterrupted
    workdir = tmp_path / "changed"
    shutil.copytree(base, workdir)
    for f in workdir.glob("rows*"):
        f.unlink()
    cfg = _cfg(bucketed_shards, steps=STEPS + 1, data__bucket_batch="0.4s_64x64=0,0.2s_80x48=0,0.4s_80x48=0")
    with pytest.raises(DataStateError, match="buckets then: .*0.4s_80x48.*allow_dataset_change"):
        _train(cfg, workdir)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill9_of_2x4_processes_resumed_as_1x8_is_bitwise_the_uninterrupted_run(bucketed_shards, tmp_path):
    """The CLI: 2 processes x 4 devices killed (SIGKILL) after step 5, resumed as 1 process x 8 devices: every loss
    and every batch row (sha256, data.row_hash_log) from the resume point on equals an uninterrupted 1 x 8 run's."""
    from train_cli import run_cli

    common = dict(data__source=bucketed_shards, data__worker_count=0, train__tokens_per_batch=2400,
                  checkpoint__save_every=4, metrics__tensorboard=False, cache_dir=str(tmp_path / "cache"), **TWO)
    base = run_cli(tmp_path / "base", train__steps=STEPS, data__row_hash_log=str(tmp_path / "base" / "rows"),
                   **common)
    assert base.returncode == 0, base.stdout[-4000:]
    assert "compiled the train step of bucket 0.2s_64x64" in base.stdout
    killed = run_cli(tmp_path / "run", processes=2, devices=4, train__steps=STEPS, kill_at_step=5, **common)
    assert killed.returncode != 0 and "SIGKILL after step 5" in killed.stdout, killed.stdout[-4000:]
    assert ("[p1] " in killed.stdout and "process 1 feeds rows [8, 16) of bucket 0.2s_64x64's batch 16, rows [4, 8) "
            "of 0.4s_80x48's batch 8" in killed.stdout), killed.stdout[-4000:]
    resumed = run_cli(tmp_path / "run", train__steps=STEPS, data__row_hash_log=str(tmp_path / "run" / "rows"),
                      **common)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    want = {r["step"]: (r["bucket"], r["batch"], r["loss"]) for r in read_metrics(tmp_path / "base") if "bucket" in r}
    got = {r["step"]: (r["bucket"], r["batch"], r["loss"]) for r in read_metrics(tmp_path / "run") if "bucket" in r}
    assert sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == want[s] for s in got if s > 5), (got, want)
    rows = lambda p: {(r["step"], r["start"] + i): h for r in map(json.loads, open(p).read().splitlines())  # noqa
                      for i, h in enumerate(r["sha256"])}
    a, b = rows(tmp_path / "base" / "rows.p0.jsonl"), rows(tmp_path / "run" / "rows.p0.jsonl")
    assert b and all(a[k] == h for k, h in b.items())


def test_heldout_loss_per_bucket_is_each_buckets_own_eval(bucketed_shards, uninterrupted):
    """`mirage_jax.eval`'s held-out loss on the bucketed dataset: one entry per bucket (all four, the two not trained
    too: the model takes any shape), each equal to the loss of eval pointed at that bucket's folder alone."""
    from mirage_jax.eval.heldout import bucket_losses, heldout_loss, read_heldout
    from mirage_jax.inference import load_run
    from mirage_jax.run_encoders import load_encoders

    workdir, _, _ = uninterrupted
    run = load_run(str(workdir))
    encs = load_encoders(run.config.data)
    got = bucket_losses(run, encs, bucketed_shards, clips=2)
    top = json.load(open(os.path.join(bucketed_shards, "manifest.json")))
    assert list(got) == [e["name"] for e in top["buckets"]]
    for name in ("0.2s_64x64", "0.4s_80x48"):  # one of each length and size
        held = read_heldout(os.path.join(bucketed_shards, name), 2, encs)
        want = heldout_loss(run, held.batch)
        assert got[name]["per_level"] == {f"{t:.1f}": v for t, v in want.items()}
        assert got[name]["clips"] == 2 and got[name]["loss"] == pytest.approx(np.mean(list(want.values())))
    assert len({round(b["loss"], 6) for b in got.values()}) == 4  # four shapes, four problems
    assert bucket_losses(run, encs, os.path.join(bucketed_shards, "0.2s_64x64"), clips=2) is None


def test_describe_lists_the_buckets_tokens(bucketed_shards):
    """`describe` on a bucketed data.source: each bucket's tokens per sample, counted by hand in BATCH's comment."""
    import dataclasses

    from mirage_jax.describe import describe_buckets, source_problem
    from mirage_jax.run_config import RunConfig

    run = RunConfig.from_config(_cfg(bucketed_shards))
    assert source_problem(bucketed_shards) is None  # no "used the config's shapes" line for a real dataset
    got = describe_buckets(run.model, dataclasses.asdict(run.shapes), bucketed_shards)
    assert {k: v["tokens"] for k, v in got.items()} == {"0.2s_64x64": 133, "0.2s_80x48": 127, "0.4s_64x64": 218,
                                                        "0.4s_80x48": 207}
    assert got["0.4s_64x64"]["train_flops_per_sample"] > got["0.2s_64x64"]["train_flops_per_sample"] > 0
    assert describe_buckets(run.model, dataclasses.asdict(run.shapes), "synthetic") is None


def test_bucket_metrics_rates_by_hand():
    """BucketMetrics on fake steps: the first (compile) step is kept out of the rates; the window's rates are the
    buckets' own tokens and FLOPs over their own seconds (numbers chosen so the sums are done by hand)."""
    from types import SimpleNamespace

    from mirage_jax.train.hooks import StepInfo
    from mirage_jax.train.shape_buckets import BucketMetrics

    a = SimpleNamespace(name="a", batch=2, tokens=10, flops=100.0)
    b = SimpleNamespace(name="b", batch=1, tokens=30, flops=400.0)
    seq = [a, a, b, a]
    hook = BucketMetrics(SimpleNamespace(bucket_of=lambda s: seq[s]), log_every=4, n_devices=2, peak=50.0)
    infos = [StepInfo(step=s, new_step=s + 1, total_steps=4, metrics={"loss": float(s)}, first=s == 0,
                      step_time_s=[9.0, 1.0, 2.0, 1.0][s]) for s in range(4)]
    for info in infos:
        hook.on_step(info)
    last = infos[-1].scalars
    assert [i.scalars["bucket"] for i in infos] == ["a", "a", "b", "a"] and infos[2].scalars["batch"] == 1
    assert last["bucket/a/loss"] == (0 + 1 + 3) / 3 and last["bucket/b/loss"] == 2.0
    assert last["bucket/a/tokens_per_s"] == 2 * 10 * 2 / 2.0  # steps 1 and 3: 40 tokens in 2 s
    assert last["bucket/b/tokens_per_s"] == 30 / 2.0
    assert last["samples_per_s"] == 5 / 4.0  # 2 + 1 + 2 samples in 4 s
    assert last["tokens_per_s_per_device"] == 70 / 4.0 / 2
    assert last["mfu"] == (2 * 100 + 400 + 2 * 100) / 4.0 / 2 / 50.0


def test_generate_takes_the_longest_clip_of_the_first_size(bucketed_shards):
    """generate/eval's encoders of a bucketed run: the 0.4 s (10-frame) clip at 64x64, so speech up to the longest
    trained clip is one window."""
    from mirage_jax.run_config import DataConfig
    from mirage_jax.run_encoders import load_encoders

    encs = load_encoders(DataConfig(source=bucketed_shards))
    assert encs.clip_frames == 10 and encs.frame_size == (64, 64)
    assert encs.source.endswith("0.4s_64x64")


def test_a_bucket_the_patch_cannot_cut_is_one_line_before_compiling(bucketed_shards, tmp_path):
    """A bucket whose latent height or width model.patch_size does not divide (here 0.2s_80x48's manifest says 7
    latent rows, as `prepare --size=80x56` writes): data_fit names the bucket and the way out before anything is
    built (it used to surface only once the buckets before it had compiled); leaving it out (batch 0) passes."""
    from mirage_jax.config import ConfigError
    from mirage_jax.run_config import RunConfig
    from mirage_jax.train import data_fit

    data = tmp_path / "odd"
    shutil.copytree(bucketed_shards, data)
    f = data / "0.2s_80x48" / "manifest.json"
    m = json.loads(f.read_text())
    assert m["keys"]["video"]["shape"][1:3] == [6, 10]  # (frames, height, width, channels): 48 / 8, 80 / 8
    m["keys"]["video"]["shape"][1] = 7
    f.write_text(json.dumps(m))
    with pytest.raises(ConfigError, match=r"bucket 0.2s_80x48 has latent 7x10 .*model.patch_size=2; .*"
                                          r"--config.data.bucket_batch=0.2s_80x48=0"):
        data_fit.check(RunConfig.from_config(_cfg(str(data))))
    data_fit.check(RunConfig.from_config(_cfg(str(data), data__bucket_batch="0.2s_80x48=0")))
    data_fit.check(RunConfig.from_config(_cfg(str(bucketed_shards))))
