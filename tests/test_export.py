"""Export: JAX MirageDiT -> safetensors -> MirageTransformer (PyTorch) / diffusers / back to JAX."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from helpers import random_inputs, randomize, small_config  # noqa: E402
from mirage_jax.export import MirageTransformer  # noqa: E402
from mirage_jax.export.writer import ExportError, export_params  # noqa: E402
from mirage_jax.interop.mochi import assign_params, convert_mochi_state  # noqa: E402
from mirage_jax.model import MirageDiT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
forward = nnx.jit(lambda m, *a, **k: m(*a, **k))


def _model(cfg, seed=3):
    m = MirageDiT(cfg, rngs=nnx.Rngs(0))
    randomize(m, seed)
    return m


def _flat(m):
    return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def _load_all(d):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("overrides", [{}, dict(num_layers=2, num_heads=4, head_dim=8, patch_size=1, audio_dim=24,
                                                time_map="causal:6/7")])  # chunked map: audio and ref times
def test_torch_module_equals_jax_with_audio_and_reference(tmp_path, overrides):
    cfg = small_config(**overrides)
    m = _model(cfg)
    export_params(_flat(m), cfg, str(tmp_path / "exp"), max_shard_size="40KB")
    tm = MirageTransformer.from_pretrained(tmp_path / "exp")
    inp = random_inputs(cfg)
    inp["audio_mask"][1, 4:] = False
    got = forward(m, inp["video"], inp["timestep"], inp["text"], inp["text_mask"], audio=inp["audio"],
                  audio_mask=inp["audio_mask"], ref=inp["ref"], ref_time=inp["ref_time"], ref_mask=inp["ref_mask"])
    with torch.no_grad():
        out = tm(_t(inp["video"].transpose(0, 4, 1, 2, 3)), _t(inp["text"]), _t(inp["timestep"]),
                 _t(inp["text_mask"]), audio_features=_t(inp["audio"]), audio_attention_mask=_t(inp["audio_mask"]),
                 reference_latents=_t(inp["ref"].transpose(0, 4, 1, 2, 3)), reference_time=_t(inp["ref_time"]),
                 reference_mask=_t(inp["ref_mask"])).sample.numpy()
    want = np.asarray(got).transpose(0, 4, 1, 2, 3)
    assert np.abs(want).max() > 0.1
    err = np.abs(out - want).max()
    assert err <= 1e-4, err  # measured ~2.4e-6


def test_round_trip_is_bitwise_and_shards_are_indexed(tmp_path):
    cfg = small_config()
    m = _model(cfg)
    flat = _flat(m)
    index = export_params(flat, cfg, str(tmp_path / "exp"), max_shard_size="30KB")
    files = set(index["weight_map"].values())
    assert len(files) > 3 and files == {os.path.basename(f) for f in glob.glob(str(tmp_path / "exp/*.safetensors"))}
    tensors = _load_all(tmp_path / "exp")
    assert sum(v.nbytes for v in tensors.values()) == index["metadata"]["total_size"]
    m2 = MirageDiT(cfg, rngs=nnx.Rngs(1))
    assign_params(m2, convert_mochi_state(tensors, cfg, audio=True))
    for k, v in _flat(m2).items():
        np.testing.assert_array_equal(v, flat[k], err_msg=".".join(k))
    # bf16 halves the bytes
    idx16 = export_params(flat, cfg, str(tmp_path / "exp16"), dtype="bf16")
    assert idx16["metadata"]["total_size"] * 2 == index["metadata"]["total_size"]


def test_mochi_part_loads_into_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = small_config(use_audio=False, pool_heads=8, rope_base_height=192, rope_base_width=192)
    m = _model(cfg)
    export_params(_flat(m), cfg, str(tmp_path / "exp"))
    c = json.loads((tmp_path / "exp" / "config.json").read_text())
    keys = ["patch_size", "num_attention_heads", "attention_head_dim", "num_layers", "pooled_projection_dim",
            "in_channels", "text_embed_dim", "time_embed_dim"]
    dm = diffusers.MochiTransformer3DModel(**{k: c[k] for k in keys}).eval()
    dm.load_state_dict({k: torch.from_numpy(v) for k, v in _load_all(tmp_path / "exp").items()}, strict=True)
    inp = random_inputs(cfg)
    with torch.no_grad():
        want = dm(_t(inp["video"].transpose(0, 4, 1, 2, 3)), _t(inp["text"]), _t(inp["timestep"]),
                  _t(inp["text_mask"])).sample.numpy()
    got = np.asarray(forward(m, inp["video"], inp["timestep"], inp["text"], inp["text_mask"]))
    assert np.abs(got.transpose(0, 4, 1, 2, 3) - want).max() <= 1e-4


def test_refuses_non_empty_out_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    cfg = small_config()
    flat = _flat(_model(cfg))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_params(flat, cfg, str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"

    import mirage_jax.export.writer as writer

    calls = {"n": 0}
    real = writer.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(writer, "save_file", failing)
    with pytest.raises(OSError):
        export_params(flat, cfg, str(tmp_path / "exp"), max_shard_size="20KB")
    assert not os.path.exists(tmp_path / "exp")
    assert not glob.glob(str(tmp_path / "exp.tmp-*"))


def test_cli_exports_a_training_checkpoint(tmp_path, monkeypatch):
    """train (fast tiny) -> export CLI -> MirageTransformer equals the JAX model restored from the checkpoint."""
    from mirage_jax.checkpoint_format import CheckpointError, ParamReader, read_model_config, resolve_step_dir
    from train_cli import run_cli

    run = run_cli(tmp_path / "run", devices=8, **{"train.steps": 2, "checkpoint.save_every": 2})
    assert run.returncode == 0, run.stdout[-3000:]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "mirage_jax.export", f"--checkpoint={tmp_path / 'run'}",
                          f"--out={tmp_path / 'exp'}", "--ema"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.chdir(tmp_path)  # a relative --checkpoint (Orbax itself only takes absolute paths)
    step_dir = resolve_step_dir("run")
    assert resolve_step_dir("run/2") == step_dir  # the README's WORKDIR/STEP form names WORKDIR/checkpoints/STEP
    mask = os.umask(0)
    os.umask(mask)
    for p in [tmp_path / "exp", *(tmp_path / "exp").iterdir()]:  # readable by a serving process of another user
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p
    cfg = read_model_config(step_dir)
    reader = ParamReader(step_dir, ema=True)
    with pytest.raises(CheckpointError, match="no saved train state"):  # was a TypeError from Orbax's None
        ParamReader(step_dir.parent / "99")
    m = MirageDiT(cfg, rngs=nnx.Rngs(0))
    assign_params(m, {p: reader(p) for p in _flat(m)})
    tm = MirageTransformer.from_pretrained(tmp_path / "exp")
    inp = random_inputs(cfg, h=8, w=8, t=2, audio_len=2, text_len=5)
    got = np.asarray(forward(m, inp["video"], inp["timestep"], inp["text"], inp["text_mask"], audio=inp["audio"]))
    with torch.no_grad():
        want = tm(_t(inp["video"].transpose(0, 4, 1, 2, 3)), _t(inp["text"]), _t(inp["timestep"]),
                  _t(inp["text_mask"]), audio_features=_t(inp["audio"])).sample.numpy()
    assert np.abs(got.transpose(0, 4, 1, 2, 3) - want).max() <= 1e-4
    bad = subprocess.run([sys.executable, "-m", "mirage_jax.export", f"--checkpoint={tmp_path / 'nowhere'}",
                          f"--out={tmp_path / 'exp2'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nowhere" in bad.stderr


def test_documented_cached_loop_on_the_export_equals_the_jax_cached_sampler(tmp_path):
    """docs/export.md's cached sampling loop (`export.cached_sampling.cached_sample`, quoted there verbatim) on the
    PyTorch export, with a schedule file (read by `cache_masks`), against
    `diffusion.cache.cached_euler_sample` on the JAX model: 12 steps, cosine guidance over audio and text, mode
    cfg+mag (full, reused-guidance and skipped steps all occur). Within 1e-4 of the latents' scale (fp32; one
    forward differs by ~2e-6); the cache's own effect is >100x that, so a wrong branch cannot pass."""
    import inspect
    import re

    import jax
    import jax.numpy as jnp

    from mirage_jax.cache_masks import mag_skip_mask
    from mirage_jax.cache_schedule import CacheSchedule
    from mirage_jax.diffusion.cache import cached_euler_sample, make_plan
    from mirage_jax.diffusion.sampler import model_velocity_fn
    from mirage_jax.diffusion.schedules import linear_quadratic_schedule
    from mirage_jax.export.cached_sampling import cache_masks, cached_sample, mirage_velocity

    doc = open(os.path.join(ROOT, "docs", "export.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert any(inspect.getsource(cached_sample) in b for b in blocks), "docs/export.md must quote cached_sample"

    cfg = small_config(num_layers=2)
    m = _model(cfg)
    export_params(_flat(m), cfg, str(tmp_path / "exp"))
    tm = MirageTransformer.from_pretrained(tmp_path / "exp")
    inp = random_inputs(cfg, t=3, h=10, w=10)  # low band: |f| <= 2
    cond = {k: jnp.asarray(v) for k, v in inp.items() if k not in ("video", "timestep")}
    steps, kw = 12, dict(cfg_text=1.5, cfg_audio=3.0, schedule="cosine")
    ratios = [1.0] * steps  # a steady trajectory: MagCache skips one in two after the retained 3 steps
    sched = CacheSchedule(steps=steps, threshold=0.06, max_skips=1, retention=0.2, ratios=tuple(ratios),
                          skip=mag_skip_mask(ratios, 0.06, 1, 0.2), checkpoint={}, calibration=kw)
    sched.write(tmp_path / "exp" / "cache_schedule.json")
    skip, run_guidance = cache_masks("cfg+mag", steps, tmp_path / "exp" / "cache_schedule.json")
    assert skip == list(sched.skip) and 3 <= sum(skip) and not all(run_guidance)
    pairs = list(zip(run_guidance, skip, strict=True))
    assert (True, True) in pairs and (False, False) in pairs  # a skip on a full step, a reused-guidance step

    noise = jax.random.normal(jax.random.key(1), inp["video"].shape, jnp.float32)
    fn, state = model_velocity_fn(m, cond)
    want = np.asarray(cached_euler_sample(fn, noise, make_plan("cfg+mag", steps, sched.skip), state=state,
                                          **kw)).transpose(0, 4, 1, 2, 3)
    tcond = {"encoder_hidden_states": _t(inp["text"]), "encoder_attention_mask": _t(inp["text_mask"]),
             "audio_features": _t(inp["audio"]), "audio_attention_mask": _t(inp["audio_mask"]),
             "reference_latents": _t(inp["ref"].transpose(0, 4, 1, 2, 3)), "reference_time": _t(inp["ref_time"]),
             "reference_mask": _t(inp["ref_mask"])}
    velocity = mirage_velocity(tm, tcond)
    sigmas = linear_quadratic_schedule(steps, 0.025)  # the JAX sampler's default threshold
    x0 = _t(np.asarray(noise).transpose(0, 4, 1, 2, 3))
    got = cached_sample(velocity, x0, sigmas, skip, run_guidance, **kw).numpy()
    plain = cached_sample(velocity, x0, sigmas, *cache_masks("none", steps), **kw).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale
    assert np.abs(got - plain).max() > 1e-2 * scale  # the cache changes the output: the comparison can fail
