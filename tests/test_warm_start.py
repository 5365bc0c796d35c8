"""Warm start from random-weight diffusers Mochi models: exact forward parity, strictness, bad files."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mirage_jax.config import ModelConfig  # noqa: E402
from mirage_jax.interop.mochi import convert_mochi_state  # noqa: E402
from mirage_jax.model import MirageDiT  # noqa: E402
from mirage_jax.warm_start import SourceError, WarmStartError, warm_start  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=3, pooled_projection_dim=24,
         in_channels=4, text_embed_dim=16, time_embed_dim=32),
    dict(patch_size=1, num_attention_heads=4, attention_head_dim=8, num_layers=2, pooled_projection_dim=40,
         in_channels=12, text_embed_dim=32, time_embed_dim=64),
]


def make_source(path, kwargs, seed=0, shard="30KB"):
    torch.manual_seed(seed)
    tm = diffusers.MochiTransformer3DModel(**kwargs).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    tm.save_pretrained(os.path.join(path, "transformer"), max_shard_size=shard)
    return tm


def load_params(workdir):
    """The params of checkpoint 0, restored without the runtime (a second code path: plain Orbax)."""
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", "0", "state")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
    state = ckptr.restore(path, target)
    cfg = json.load(open(os.path.join(workdir, "checkpoints", "0", "config", "metadata")))
    return state, ModelConfig.from_config(cfg["model"])


def mirage_from(workdir):
    state, mcfg = load_params(workdir)
    model = MirageDiT(mcfg, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, state["params"]))
    return model, state


def inputs(kwargs, b=2, t=3, h=4, w=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, kwargs["in_channels"], t, h, w)).astype(np.float32)
    text = rng.standard_normal((b, 9, kwargs["text_embed_dim"])).astype(np.float32)
    mask = np.ones((b, 9), bool)
    mask[1, 4:] = False
    return x, text, mask, np.array([250.0, 990.0], np.float32)


@pytest.mark.parametrize("idx", range(len(SMALL)))
def test_warm_started_mirage_equals_mochi(tmp_path, idx):
    kwargs = SMALL[idx]
    tm = make_source(tmp_path / "src", kwargs, seed=idx)
    report = warm_start(str(tmp_path / "src"), None, str(tmp_path / "run"))
    assert report["unused"] == [] and report["missing"] == [] and report["mismatched"] == []
    assert any("audio" in n for n in report["new"]) and not any("video" in n for n in report["new"])
    model, state = mirage_from(tmp_path / "run")
    assert int(state["step"]) == 0
    x, text, mask, ts = inputs(kwargs)
    with torch.no_grad():
        want = tm(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(ts), torch.from_numpy(mask)).sample
    fwd = nnx.jit(lambda m, *a, **k: m(*a, **k))
    got = np.asarray(fwd(model, jnp.asarray(x.transpose(0, 2, 3, 4, 1)), ts, text, mask)).transpose(0, 4, 1, 2, 3)
    err = np.abs(got - want.numpy()).max()
    assert err <= 1e-4, err
    # backward parity: gradients of a weighted sum of the output with respect to the latents and the text
    # embeddings run through every custom VJP (attention, modulated RMSNorm incl. its scale, SwiGLU) and RoPE;
    # PyTorch autograd of diffusers' model is the independent reference
    w = np.random.default_rng(2).standard_normal(want.shape).astype(np.float32)
    tx, tt = torch.tensor(x, requires_grad=True), torch.tensor(text, requires_grad=True)
    (tm(tx, tt, torch.from_numpy(ts), torch.from_numpy(mask)).sample * torch.from_numpy(w)).sum().backward()

    graphdef, params = nnx.split(model)

    def weighted(xj, textj, params):
        out = nnx.merge(graphdef, params)(xj, ts, textj, mask)
        return jnp.sum(out * jnp.asarray(w.transpose(0, 2, 3, 4, 1)))

    gx, gt, gp = jax.jit(jax.grad(weighted, argnums=(0, 1, 2)))(jnp.asarray(x.transpose(0, 2, 3, 4, 1)),
                                                                 jnp.asarray(text), params)
    pairs = ((np.asarray(gx).transpose(0, 4, 1, 2, 3), tx.grad.numpy()), (np.asarray(gt), tt.grad.numpy()))
    for got_g, want_g in pairs:
        scale = np.abs(want_g).max()
        assert scale > 0 and np.abs(got_g - want_g).max() <= 1e-4 * max(scale, 1.0), (
            np.abs(got_g - want_g).max(), scale)
    # ... and every weight's gradient (the dense layers' own VJP writes the kernels' gradients), mapped to
    # Mirage's layout by the warm start's converter (transposes, reshapes and splits: linear re-layouts)
    torch_grads = {n: p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
                   for n, p in tm.named_parameters()}
    got_p = {k: np.asarray(v.get_value() if hasattr(v, "get_value") else v) for k, v in nnx.to_flat_state(gp)}
    want_p = convert_mochi_state(torch_grads, model.cfg)
    assert len(want_p) > 20 and set(want_p) <= set(got_p)
    for key, want_g in want_p.items():
        scale = np.abs(want_g).max()
        assert np.abs(got_p[key] - want_g).max() <= 1e-4 * max(scale, 1.0), (key, np.abs(got_p[key] - want_g).max())
    # audio present at step 0: values start at zero, so audio only dilutes attention slightly
    a = np.random.default_rng(1).standard_normal((2, 6, model.cfg.audio_feature_dim)).astype(np.float32)
    with_audio = np.asarray(fwd(model, jnp.asarray(x.transpose(0, 2, 3, 4, 1)), ts, text, mask, audio=a))
    rel = np.abs(with_audio.transpose(0, 4, 1, 2, 3) - want.numpy()).max() / np.abs(want.numpy()).max()
    assert 0 < rel < 0.2, rel
    np.testing.assert_array_equal(np.asarray(state["params"]["audio_pos_frequencies"])[0],
                                  np.asarray(state["params"]["pos_frequencies"])[0])


def test_config_mismatch_lists_every_field(tmp_path):
    from configs import tiny

    make_source(tmp_path / "src", SMALL[0])
    with pytest.raises(WarmStartError) as e:
        warm_start(str(tmp_path / "src"), tiny.get_config(), str(tmp_path / "run"))
    msg = str(e.value)
    for field in ("model.num_heads", "model.max_text_len", "model.num_layers", "model.latent_channels",
                  "model.text_embed_dim"):
        assert field in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fields_diffusers_fixes_in_code_are_checked(tmp_path):
    """A head count of the text pool, a RoPE base or an MLP ratio changes no tensor shape (or not always) but the
    function: a config that differs from what diffusers hard-codes is refused by field name, nothing written."""
    from mirage_jax.warm_start.core import check_dimensions, derive_config
    from mirage_jax.warm_start.source import TensorSource

    make_source(tmp_path / "src", SMALL[0])
    src = TensorSource(tmp_path / "src")
    # the derived config (the parity test's) passes
    check_dimensions(src, ModelConfig.from_config(derive_config(src).model))
    # diffusers' own values, read from a built model (independent of Mirage's table)
    tm = diffusers.MochiTransformer3DModel(**SMALL[0])
    assert tm.time_embed.pooler.num_attention_heads == 8 and tm.rope.target_area == 192 * 192
    for field, value in (("pool_heads", 4), ("rope_base_height", 96), ("rope_base_width", 256)):
        cfg = derive_config(src)
        cfg.model[field] = value
        with pytest.raises(WarmStartError, match=f"model.{field}: config has {value}") as e:
            warm_start(str(tmp_path / "src"), cfg, str(tmp_path / "run"))
        assert "MochiTransformer3DModel fixes" in str(e.value)
        assert not (tmp_path / "run" / "checkpoints").exists()
    # a config.json key diffusers reads but MirageDiT cannot compute (geglu has SwiGLU's shapes)
    cj = tmp_path / "src" / "transformer" / "config.json"
    cj.write_text(json.dumps({**json.loads(cj.read_text()), "activation_fn": "geglu"}))
    with pytest.raises(WarmStartError, match="config.json: activation_fn='geglu' is not supported"):
        warm_start(str(tmp_path / "src"), None, str(tmp_path / "run"))


def test_genmo_single_file_layout_is_recognised_by_its_tensor_names(tmp_path):
    """genmo's original `dit.safetensors` (names as diffusers' scripts/convert_mochi_to_diffusers.py reads them),
    with no config.json beside it: named as genmo's layout, the folder or the file itself."""
    from safetensors.numpy import save_file

    z = np.zeros((2, 2), np.float32)
    names = ("x_embedder.proj.weight", "t5_y_embedder.to_kv.weight", "t5_yproj.weight", "blocks.0.attn.qkv_x.weight",
             "blocks.0.mod_x.weight", "final_layer.linear.weight")
    (tmp_path / "genmo").mkdir()
    save_file({n: z for n in names}, str(tmp_path / "genmo" / "dit.safetensors"))
    for source in (tmp_path / "genmo", tmp_path / "genmo" / "dit.safetensors"):
        with pytest.raises(SourceError, match="genmo's original Mochi layout.*convert_mochi_to_diffusers"):
            warm_start(str(source), None, str(tmp_path / "run"))
    save_file({"other.weight": z}, str(tmp_path / "genmo" / "dit.safetensors"))  # not genmo: config.json missing
    with pytest.raises(SourceError, match="config.json: missing"):
        warm_start(str(tmp_path / "genmo"), None, str(tmp_path / "run"))


def test_bad_sources_name_the_file_and_leave_nothing(tmp_path):
    src = tmp_path / "src"
    make_source(src, SMALL[0])
    tdir = src / "transformer"
    index = json.loads((tdir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]

    # 1. truncated shard
    data = (tdir / shard).read_bytes()
    (tdir / shard).write_bytes(data[:-7])
    with pytest.raises(SourceError, match=shard):
        warm_start(str(src), None, str(tmp_path / "run1"))
    (tdir / shard).write_bytes(data)

    # 2. a shard the index names is missing
    os.rename(tdir / shard, tmp_path / "away")
    with pytest.raises(SourceError, match=shard):
        warm_start(str(src), None, str(tmp_path / "run2"))
    os.rename(tmp_path / "away", tdir / shard)

    # 3. a wrong-shape tensor (rewritten in its shard): strict refuses, naming it and its file
    from safetensors.numpy import load_file, save_file

    name = "transformer_blocks.1.attn1.to_q.weight"
    fname = index["weight_map"][name]
    tensors = load_file(str(tdir / fname))
    tensors[name] = np.zeros((32, 31), np.float32)
    save_file(tensors, str(tdir / fname), metadata={"format": "pt"})
    with pytest.raises(WarmStartError, match=name) as e:
        warm_start(str(src), None, str(tmp_path / "run3"))
    assert fname in str(e.value)
    for run in ("run1", "run2", "run3"):
        assert not (tmp_path / run / "checkpoints").exists()
    # --allow-partial initializes it instead and says so
    report = warm_start(str(src), None, str(tmp_path / "run4"), allow_partial=True)
    assert report["mismatched"] and "blocks.video.q.kernel" in report["new"]


@pytest.mark.multiprocess
def test_two_process_warm_start_writes_the_same_checkpoint(tmp_path):
    make_source(tmp_path / "src", SMALL[0])
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "mirage_jax.warm_start", f"--source={tmp_path / 'src'}"]
    subprocess.run(cmd + [f"--out={tmp_path / 'one'}"], env={**env, "XLA_FLAGS":
                   "--xla_force_host_platform_device_count=8"}, check=True, cwd=ROOT, timeout=600,
                   capture_output=True)
    subprocess.run([sys.executable, "launch/local.py", "--processes=2", "--devices-per-process=4", "--"]
                   + cmd + [f"--out={tmp_path / 'two'}"], env=env, check=True, cwd=ROOT, timeout=600,
                   capture_output=True)
    one, _ = load_params(tmp_path / "one")
    two, _ = load_params(tmp_path / "two")
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
