"""Every runtime section is typed and validated once, before anything compiles: a bad value or a misspelt
field is one line naming the `--config.` override, exit 2 (the CLI), or a ConfigError (the library)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mirage_base.errors import ConfigArgError, MirageError
from mirage_jax.config import ConfigError
from mirage_jax.run_config import RunConfig, parse_arg
from train_cli import ROOT, fast_config


@pytest.mark.parametrize("field, value, needle", [
    ("checkpoint.save_every", 0, "--config.checkpoint.save_every=0: must be >= 1"),
    ("train.log_every", 0, "--config.train.log_every=0: must be >= 1"),
    ("checkpoint.keep_last_n", 0, "--config.checkpoint.keep_last_n=0: must be >= 1"),
    ("train.grad_sync", "ring", "--config.train.grad_sync='ring'"),
    ("data.verify", "md5", "--config.data.verify='md5'"),
    ("optim.b2", 1.0, "--config.optim.b2=1.0: must be in [0, 1)"),
    ("data.prefetch", 0, "--config.data.prefetch=0"),
])
def test_out_of_range_fields_are_named(field, value, needle):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_config(fast_config(**{field.replace(".", "__"): value}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_missing_and_mistyped_fields_are_named():
    cfg = fast_config()
    cfg.train.stepz = 3
    with pytest.raises(ConfigError, match=r"--config\.train\.stepz: `train` has no such field; did you mean `steps`"):
        RunConfig.from_config(cfg)
    cfg = fast_config()
    del cfg.shapes["text_len"]
    with pytest.raises(ConfigError, match=r"--config\.shapes\.text_len: missing"):
        RunConfig.from_config(cfg)
    run = RunConfig.from_config(fast_config())  # the shipped values themselves validate
    assert (run.checkpoint.keep_last_n, run.checkpoint.save_every, run.train.log_every, run.shapes.ref_frames) == (
        3, 10, 1, 1)  # base default, tiny.py:fast, tiny.py:fast, tiny.py
    with pytest.raises(ConfigError, match=r"--config\.train\.steps=True: must be a int"):
        RunConfig.from_config(fast_config(train__steps=True))


def test_config_file_arguments():
    assert dict(parse_arg("seconds=8,layout=v6e256", "f.py", seconds=4, layout="v5p256")) == {
        "seconds": 8, "layout": "v6e256"}
    assert parse_arg("demo", "f.py", demo=False, mochi=False).demo is True
    with pytest.raises(ConfigArgError, match="unknown argument `secs`; did you mean `seconds`"):
        parse_arg("secs=8", "f.py", seconds=4)
    with pytest.raises(ConfigArgError, match="`seconds` takes a int, got 'eight'"):
        parse_arg("seconds=eight", "f.py", seconds=4)
    assert issubclass(ConfigArgError, MirageError) and not issubclass(ConfigArgError, ValueError)


def _train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "mirage_jax.train", "--config=configs/tiny.py",
                           "--workdir=/nonexistent/never-written", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, line", [
    ("--config.checkpoint.save_every=0", "CONFIG ERROR: --config.checkpoint.save_every=0: must be >= 1"),
    ("--config.train.stepz=3", "CONFIG ERROR: --config.train.stepz=3: the config has no field `stepz` in `train`; "
                               "did you mean `train.steps`?"),
])
def test_cli_refuses_in_one_line_with_exit_2(override, line):
    """Before any compile or write: the workdir is never created, and the error is one line, no traceback."""
    r = _train(override)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == line, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not os.path.exists("/nonexistent/never-written")


@pytest.mark.parametrize("arg, batch, sequence, remat, latents, tokens", [
    ("", 32, 4, ("save_splash_down", True), 20, 75_956), ("layout=v6e256", 32, 8, ("save_splash", True), 20, 75_956),
    ("seconds=8,layout=v5p512", 32, 8, ("save_splash_down", True), 40, 148_056),
    # 8 s on v5p-256: save_splash + the fused backward were compiled at 4 s only, so full remat, split backward
    ("8s", 32, 4, ("full", False), 40, 148_056), ("seconds=8", 32, 4, ("full", False), 40, 148_056)])
def test_mirage_10b_layouts_are_the_measured_ones(arg, batch, sequence, remat, latents, tokens):
    """The compiled rows of docs/scaling.md (global batch, fsdp x sequence, remat policy and splash backward,
    tokens per sample)."""
    from configs.mirage_10b import get_config
    from mirage_jax.describe import count_tokens

    cfg = get_config(arg)
    run = RunConfig.from_config(cfg)
    assert (run.train.global_batch_size, cfg.mesh.ici.sequence, cfg.mesh.ici.fsdp, run.shapes.latent_frames) == (
        batch, sequence, -1, latents)
    assert (run.model.remat_policy, run.model.splash_fused_bwd) == remat
    assert dict(cfg.mesh.rules.params)["embed"] == ("fsdp", "sequence")
    assert count_tokens(run.model, cfg.shapes.to_dict())["total"] == tokens


def test_bad_config_file_argument_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "mirage_jax.describe", "--config=configs/mirage_10b.py:layout=v7"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "CONFIG ERROR: configs/mirage_10b.py:layout=v7: unknown layout 'v7'; one of ['v5p256', 'v5p512', 'v6e256']")


def test_mirage_10b_seconds_list_is_the_reports_mix():
    """`seconds=4,8`: both buckets listed (prepare's names), full remat (8 s is above the fused layouts' 4 s), and
    the token budget gives the v5p-256 layout's 32 x 8 s and 64 x 4 s: the fsdp axis (32 of the 128 chips)
    divides both, and each device holds ~37k tokens in either bucket."""
    from configs.mirage_10b import get_config
    from mirage_jax.train.shape_buckets import config_buckets

    cfg = get_config("seconds=4,8,layout=v5p256")
    run = RunConfig.from_config(cfg)
    assert cfg.data.buckets == "4s_720x1280=20x160x90,8s_720x1280=40x160x90"
    assert (run.model.remat_policy, run.model.splash_fused_bwd, run.shapes.latent_frames) == ("full", False, 20)
    got = {b.name: (b.batch, b.tokens, b.shapes.audio_frames) for b in config_buckets(run, 32)}
    assert got == {"4s_720x1280": (64, 75_956, 100), "8s_720x1280": (32, 148_056, 200)}
    per_device = [b * t / 128 for b, t, _ in got.values()]
    assert max(per_device) / min(per_device) < 1.03
    assert get_config("seconds=4").data.buckets == "" and get_config().to_dict() == get_config("seconds=4").to_dict()
    with pytest.raises(ConfigArgError, match="distinct clips"):
        get_config("seconds=4,4")


@pytest.mark.parametrize("overrides, needle", [
    ({"data__buckets": "a=4x8x8,b=4x7x8"}, "--config.data.buckets='a=4x8x8,b=4x7x8': bucket 'b': latent 7x8"),
    ({"shapes__latent_width": 5}, "--config.shapes.latent_height/latent_width: latent 8x5"),
])
def test_latent_sizes_the_patch_embedding_cannot_cut_are_named(overrides, needle):
    """A latent height or width that is not a multiple of model.patch_size (the model itself refuses it, with a
    traceback from inside the trace: describe and aot reached it) is one ConfigError line naming the field, and
    describe (which used to count floor(7 / 2) patches silently) exits 2 with that line."""
    import jax.numpy as jnp
    from flax import nnx

    from mirage_jax.model import MirageDiT

    run = RunConfig.from_config(fast_config())
    p = run.model.patch_size
    assert 7 % p and 5 % p
    model = nnx.eval_shape(lambda: MirageDiT(run.model, rngs=nnx.Rngs(0)))
    for h, w in ((7, 8), (8, 5)):
        with pytest.raises(ValueError, match="divisible by model.patch_size"):  # the model's own rule, independent
            model.patchify(jnp.zeros((1, 2, h, w, run.model.latent_channels), jnp.float32))
    model.patchify(jnp.zeros((1, 2, 8, 8, run.model.latent_channels), jnp.float32))  # and 8 x 8 is cut
    with pytest.raises(ConfigError) as e:
        RunConfig.from_config(fast_config(**overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)
    flag = ",".join(f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items())
    out = subprocess.run([sys.executable, "-m", "mirage_jax.describe", "--config=configs/tiny.py:fast", flag],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and needle in out.stderr + out.stdout, out.stderr[-2000:]
