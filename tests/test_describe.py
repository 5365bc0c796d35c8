"""describe's numbers against the instantiated model and against diffusers' own count."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mirage_jax.config import ModelConfig
from mirage_jax.describe import count_params, count_tokens, describe
from mirage_jax.model import MirageDiT

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__file__))


def test_counts_equal_the_instantiated_tiny_model():
    cfg = ModelConfig.from_config(tiny.model_config())
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
    total = sum(math.prod(v.shape) for _, v in leaves)
    audio = sum(math.prod(v.shape) for p, v in leaves if "audio" in "/".join(map(str, p)))
    counts = count_params(cfg)
    assert counts["total"] == total
    assert counts["audio"] == audio > 0
    assert counts["video"] + counts["text"] + counts["audio"] + counts["conditioning"] == total


def test_mirage_10b_without_audio_is_exactly_mochi():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        mochi = diffusers.MochiTransformer3DModel()
    want = sum(p.numel() for p in mochi.parameters())
    assert want == 10_027_677_744
    out = subprocess.run([sys.executable, "-m", "mirage_jax.describe", "--config=configs/mirage_10b.py", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["params"]["total"] - info["params"]["audio"] == want
    assert info["tokens"]["video"] == 72_000 and info["tokens"]["audio"] == 100 and info["tokens"]["text"] == 256
    assert info["train_flops_per_sample"] > 6 * 10e9 * 72_000  # at least 6 N D


def test_flops_match_a_jax_cost_analysis_of_the_forward():
    """Analytic forward FLOPs vs XLA's count for the tiny model (matmuls dominate; within 10%)."""
    import jax
    import jax.numpy as jnp

    # unrolled layers: XLA's cost analysis counts a scan body once
    cfg = ModelConfig.from_config({**tiny.model_config().to_dict(), "scan_layers": False})
    shapes = dict(latent_frames=4, latent_height=8, latent_width=8, audio_frames=4, text_len=8, ref_frames=1)
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    gd, state = nnx.split(model)
    b = 1
    args = dict(
        video=jnp.zeros((b, 4, 8, 8, cfg.latent_channels)), timestep=jnp.zeros((b,)),
        text=jnp.zeros((b, 8, cfg.text_embed_dim)), text_mask=jnp.ones((b, 8), bool),
        audio=jnp.zeros((b, 4, cfg.audio_feature_dim)), ref=jnp.zeros((b, 1, 8, 8, cfg.latent_channels)),
    )

    def fwd(state, a):
        m = nnx.merge(gd, state)
        return m(a["video"], a["timestep"], a["text"], a["text_mask"], audio=a["audio"], ref=a["ref"])

    cost = jax.jit(fwd).lower(state, args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = describe(cfg, shapes)["forward_flops_per_sample"]
    assert count_tokens(cfg, shapes)["total"] == 4 * 16 + 16 + 4 + 8
    np.testing.assert_allclose(cost["flops"], analytic, rtol=0.1)


def test_config_buckets_count_as_the_single_length_configs():
    """configs/mirage_10b.py:seconds=4,8 lists two buckets (data.buckets); describe counts each as the config of
    that length alone (`seconds=4`, `seconds=8`: shapes from clip_shapes, not from the bucket list)."""
    import dataclasses

    from configs.mirage_10b import get_config
    from mirage_jax.describe import count_flops, count_tokens, describe_buckets
    from mirage_jax.run_config import RunConfig

    mix = RunConfig.from_config(get_config("seconds=4,8"))
    got = describe_buckets(mix.model, dataclasses.asdict(mix.shapes), "synthetic", mix.data.buckets)
    assert list(got) == ["4s_720x1280", "8s_720x1280"]
    for name, seconds in (("4s_720x1280", 4), ("8s_720x1280", 8)):
        one = get_config(f"seconds={seconds}").shapes.to_dict()
        assert got[name]["tokens"] == count_tokens(mix.model, one)["total"]
        assert got[name]["train_flops_per_sample"] == count_flops(mix.model, one)
        assert got[name]["latent"] == [one["latent_frames"], 160, 90] and "records" not in got[name]
    assert describe_buckets(mix.model, dataclasses.asdict(mix.shapes), "synthetic") is None


def test_a_missing_data_source_is_one_line_and_the_configs_counts(tmp_path):
    """describe with a data.source that does not exist answers from the config (its counts need no data), as it
    does for 'synthetic', and says so in ONE stderr line naming the field (it used to fall back silently);
    exit 0, and --json's stdout still parses."""
    import dataclasses

    from mirage_jax.run_config import RunConfig

    missing = tmp_path / "prepared"  # never written
    out = subprocess.run([sys.executable, "-m", "mirage_jax.describe", "--config=configs/tiny.py", "--json",
                          f"--config.data.source={missing}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"describe: --config.data.source: {missing}: matches no files; point at a data_pipeline.prepare output "
        "directory; counted the config's shapes instead"]
    run = RunConfig.from_config(tiny.get_config())
    got = json.loads(out.stdout)
    assert got["tokens"] == count_tokens(run.model, dataclasses.asdict(run.shapes)) and "buckets" not in got


def test_source_problem_names_what_the_loader_would(prepared_shards, tmp_path):
    """`describe.source_problem`: None for a prepared dataset (its directory, a glob of its shards), 'synthetic'
    and ''; the loader's own reason for a path that matches nothing and a directory with no manifest.json."""
    from mirage_jax.describe import source_problem

    for ok in (prepared_shards, f"{prepared_shards}/*.array_record", "synthetic", ""):
        assert source_problem(ok) is None, ok
    assert source_problem(str(tmp_path / "nope")) == (
        f"{tmp_path / 'nope'}: matches no files; point at a data_pipeline.prepare output directory")
    assert "no manifest.json" in source_problem(str(tmp_path))
