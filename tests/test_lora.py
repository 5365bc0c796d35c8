"""LoRA fine-tuning (docs/lora.md): a frozen base, trained adapters, merged and PEFT exports, sharding, resume.

The independent sides: the adapters' gradients are the chain rule through the merged kernel written here over
autodiff of the plain network; the merged export runs in PyTorch (`MirageTransformer`); the adapter export runs
through peft's own LoRA layers; the sharded step is compared with one device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_inputs, small_config
from mirage_jax.checkpoint_format import ParamReader, config_to_dict, flatten, resolve_step_dir, unflatten
from mirage_jax.lora import adapter as lora_adapter
from mirage_jax.model.build import abstract_model
from mirage_jax.run_config import LoraConfig, RunConfig
from train_cli import ROOT, fast_config, load_params, read_metrics

RANK, ALPHA = 4, 8.0


def _random_tree(tree, seed: int, scale: float = 0.2):
    """Random normal values (times `scale`) in the shapes, dtypes and shardings of `tree` (arrays or abstract)."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)  # numpy: no per-shape program to compile
    return jax.tree.unflatten(treedef, [
        jax.device_put((scale * rng.standard_normal(x.shape, np.float32)).astype(x.dtype), x.sharding)
        for x in leaves])


def _write_checkpoint(workdir, cfg, params_seed: int | None, meta_fn=None) -> None:
    """Step 0 of a run of `cfg` whose params (and EMA) are random (seed `params_seed`), through the trainer's store."""
    from mirage_jax.train import checkpoint as ckpt_lib
    from mirage_jax.train.setup import RunSetup

    setup = RunSetup(cfg)
    with jax.set_mesh(setup.mesh):  # eager: no init program to compile
        state = setup.layout.fresh_state(_random_tree(setup.layout.abstract_with_shardings().params, params_seed))
    store = ckpt_lib.CheckpointStore(str(workdir), setup.run_cfg.checkpoint)
    store.save(0, state, None, config_to_dict(cfg), meta_fn(setup) if meta_fn else {})
    store.wait()
    store.close()


def _lora_cfg(base, **kw):
    return fast_config(lora__rank=RANK, lora__alpha=ALPHA, lora__base=str(base), **kw)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two random-weight bases of configs/tiny.py:fast (the second for the refusals) and a LoRA run on the first
    whose adapters are random too (B != 0), written as a LoRA run writes its checkpoints."""
    root = tmp_path_factory.mktemp("lora")
    _write_checkpoint(root / "base", fast_config(), 1)
    _write_checkpoint(root / "base2", fast_config(), 2)
    _write_checkpoint(root / "adapters", _lora_cfg(root / "base"), 3, lambda s: s.layout.checkpoint_meta())
    return root


def _forward_inputs(cfg):
    return random_inputs(cfg, h=8, w=8, t=2, audio_len=2, text_len=5)


def _jax_lora_forward(root, inp):
    """The LoRA network (x @ W + s x @ A @ B in every adapted layer) on the base and adapters as saved."""
    run = RunConfig.from_config(_lora_cfg(root / "base"))
    graphdef, _, _ = lora_adapter.abstract_model(run.model, 0, run.lora)
    base = unflatten({tuple(k.split("/")): v for k, v in ParamReader(resolve_step_dir(str(root / "base")))
                      .read_all().items()})
    adapters = unflatten({tuple(k.split("/")): v for k, v in ParamReader(resolve_step_dir(str(root / "adapters")))
                          .read_all().items()})
    return np.asarray(_forward(nnx.merge(graphdef, lora_adapter.combine(base, adapters)), inp))


@nnx.jit
def _jit_forward(model, video, timestep, text, text_mask, audio):
    return model(video, timestep, text, text_mask, audio=audio)


def _forward(model, inp):
    return _jit_forward(model, inp["video"], inp["timestep"], inp["text"], inp["text_mask"], inp["audio"])


def test_adapter_gradients_are_the_chain_rule_through_the_merged_kernel():
    """d loss / dA = s dW' B^T and d loss / dB = s A^T dW', with dW' autodiff of the plain network at W' = W + s A B."""
    cfg = small_config(num_layers=2)
    lcfg = LoraConfig(rank=3, alpha=5.0, base="unused")
    graphdef, abs_adapters, abs_base = lora_adapter.abstract_model(cfg, 0, lcfg)
    base = _random_tree(jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), nnx.to_pure_dict(abs_base)), 4)
    adapters = _random_tree(jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), nnx.to_pure_dict(abs_adapters)), 5)
    inp = random_inputs(cfg)
    cot = jax.random.normal(jax.random.key(6), inp["video"].shape)

    def out(model):
        return jnp.sum(cot * model(inp["video"], inp["timestep"], inp["text"], inp["text_mask"], audio=inp["audio"]))

    g_lora = jax.jit(jax.grad(lambda a: out(nnx.merge(graphdef, lora_adapter.combine(base, a)))))(adapters)
    plain_graphdef, _ = abstract_model(cfg)
    s = lcfg.scale
    merged = jax.tree.map(lambda x: x, base)
    pairs = lora_adapter.adapter_modules(adapters)
    assert len(pairs) == 3 * 7 + 7 + 2 * 3  # stacked: 3 streams x (q k v o up gate down); last: video's 7, q k v
    for path, (a, b) in pairs.items():
        node = merged
        for k in path:
            node = node[k]
        node["kernel"] = node["kernel"] + s * jnp.einsum("...ir,...ro->...io", a, b)
    g_plain = jax.jit(jax.grad(lambda p: out(nnx.merge(plain_graphdef, p))))(merged)
    for path, (a, b) in pairs.items():
        gw, ga = g_plain, g_lora
        for k in path:
            gw, ga = gw[k], ga[k]
        gw = gw["kernel"]
        want_a = s * jnp.einsum("...io,...ro->...ir", gw, b)
        want_b = s * jnp.einsum("...ir,...io->...ro", a, gw)
        for got, want in ((ga["lora"]["lora_a"], want_a), (ga["lora"]["lora_b"], want_b)):
            scale = float(jnp.abs(want).max()) + 1e-12
            np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4, err_msg="/".join(path))


def test_training_changes_only_the_adapters_and_resume_refuses_another_base(bases, tmp_path):
    """2 steps of a LoRA run: the state holds adapters (and their moments) only, every B left zero but those whose
    output nothing reads (the last block's text and audio queries: those streams end there), the base the step saw
    is bitwise the base checkpoint's; a restart on the same base resumes, on another base it is refused naming both,
    before compiling."""
    from mirage_jax.lora.base import LoraBaseError
    from mirage_jax.train.loop import Trainer

    work = tmp_path / "run"
    tr = Trainer(_lora_cfg(bases / "base", train__steps=2, lora__dropout=0.1), str(work))  # dropout keys in scan
    assert tr.run() == 2
    base_ckpt = ParamReader(resolve_step_dir(str(bases / "base"))).read_all()
    seen = {"/".join(k): np.asarray(v) for k, v in flatten(tr.setup.layout.frozen.value()).items()}
    assert set(seen) == set(base_ckpt)
    for k, v in base_ckpt.items():
        assert np.array_equal(seen[k], v), k  # never donated, never updated
    saved = ParamReader(resolve_step_dir(str(work))).read_all()
    assert saved and all(k.endswith(("/lora/lora_a", "/lora/lora_b")) for k in saved)
    moved = {k.removesuffix("/lora/lora_b") for k, v in saved.items() if k.endswith("lora_b") and np.abs(v).max() > 0}
    b_paths = {k.removesuffix("/lora/lora_b") for k in saved if k.endswith("lora_b")}
    assert b_paths - moved == {"last_block/text/q", "last_block/audio/q"}  # B starts at 0
    opt = [k for k, v in flatten(tr.setup.layout.abstract.opt_state).items() if getattr(v, "ndim", 0) > 0]
    assert opt and all(k[-1] in ("lora_a", "lora_b") for k in opt)
    # a restart on the same base passes the base check (restored, fingerprinted again: nothing left to train)
    assert Trainer(_lora_cfg(bases / "base", train__steps=2, lora__dropout=0.1), str(work)).run() == 2
    with pytest.raises(LoraBaseError, match=r"refusing to resume .*base .*base/checkpoints/0.*lora.base is .*base2"):
        Trainer(_lora_cfg(bases / "base2", train__steps=3, lora__dropout=0.1), str(work)).run()


def test_a_lora_run_as_the_base_is_refused_in_one_line_before_compiling(bases, tmp_path):
    """lora.base naming a LoRA run (its checkpoints hold adapters only) is refused naming that run's own base, before
    the step compiles (it used to compile, then fail in the first step on the base leaves Orbax's partial restore
    handed back unrestored); restore_subtree itself names leaves a checkpoint does not hold."""
    from mirage_base.errors import CheckpointError
    from mirage_jax.checkpoint_format import restore_subtree
    from mirage_jax.lora.base import LoraBaseError
    from mirage_jax.train.loop import Trainer

    with pytest.raises(LoraBaseError, match=r"lora.base=.*adapters: .* is a LoRA run .*trained on base .*/base\)"):
        Trainer(_lora_cfg(bases / "adapters", train__steps=1), str(tmp_path / "run")).run()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, abs_params = abstract_model(RunConfig.from_config(fast_config()).model)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev), nnx.to_pure_dict(abs_params))
    with pytest.raises(CheckpointError, match=r"holds no .* \(and \d+ more\): it is not the train state"):
        restore_subtree(resolve_step_dir(str(bases / "adapters")), {"params": target})


def _base_moved_on(bases, tmp_path, after: bool = True):
    """(base workdir, LoRA workdir) copies in `tmp_path`: adapters trained on the base's step 0 (config and meta
    name the copy); with `after`, the base then "trained on": its step 1 holds other weights (base2's)."""
    base, adapters = tmp_path / "base", tmp_path / "adapters"
    shutil.copytree(bases / "base", base)
    shutil.copytree(bases / "adapters", adapters)
    step = resolve_step_dir(str(adapters))
    for item, edit in (("config", lambda c: c["lora"].update(base=str(base))),
                       ("meta", lambda m: m["lora_base"].update(path=str(base / "checkpoints" / "0")))):
        f = step / item / "metadata"
        d = json.loads(f.read_text())
        edit(d)
        f.write_text(json.dumps(d))
    if after:
        shutil.copytree(bases / "base2" / "checkpoints" / "0", base / "checkpoints" / "1")
    return base, adapters


def test_adapter_export_names_the_base_step_the_adapters_were_trained_on(bases, tmp_path):
    """`--lora=adapter` of a LoRA run whose base workdir trained on since: adapter_config.json's
    base_model_name_or_path is the step the adapters were trained on (step 0), not lora.base (the workdir, whose
    newest step is now 1). With step 0 gone, lora.base's newest step is named only if it holds the trained base
    (its fingerprint): refused naming both while it is base2's weights, named once it is step 0's copy."""
    base, adapters = _base_moved_on(bases, tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "mirage_jax.export", f"--checkpoint={adapters}", "--lora=adapter",
                          f"--out={tmp_path / 'adapter'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base / "checkpoints" / "0")
    assert json.loads(out.stdout.splitlines()[-1])["base"] == str(base / "checkpoints" / "0")

    from mirage_jax.checkpoint_format import read_item
    from mirage_jax.export.lora import adapter_base
    from mirage_jax.lora.base import LoraBaseError

    step = resolve_step_dir(str(adapters))
    run, meta = RunConfig.from_config(_lora_cfg(base)), read_item(step, "meta")
    shutil.rmtree(base / "checkpoints" / "0")
    with pytest.raises(LoraBaseError, match=r"its adapters were trained on base .*base/checkpoints/0.* lora.base is "
                                            r".*base/checkpoints/1"):
        adapter_base(run.lora, meta, str(step))
    shutil.rmtree(base / "checkpoints" / "1")
    shutil.copytree(bases / "base" / "checkpoints" / "0", base / "checkpoints" / "1")  # the trained base, moved
    assert adapter_base(run.lora, meta, str(step)) == str(base / "checkpoints" / "1")


def test_generate_and_export_read_the_base_step_the_adapters_were_trained_on(bases, tmp_path):
    """lora.base names a workdir that has trained on since (its newest step now holds other weights): load_run
    (generate, eval) reads the step the checkpoint's meta records, and gives the model it gave before the base moved
    on (it used to refuse: the newest step's fingerprint is not the adapters' base); with that step gone, the
    fingerprint check still refuses, naming both."""
    from mirage_jax.inference import load_run
    from mirage_jax.lora.base import LoraBaseError

    base, adapters = _base_moved_on(bases, tmp_path, after=False)

    def params(run):
        return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(run.model, nnx.Param))).items()}

    want = params(load_run(str(bases / "adapters")))  # the untouched run: its base never moved
    shutil.copytree(bases / "base2" / "checkpoints" / "0", base / "checkpoints" / "1")  # the base "trained on"
    got = params(load_run(str(adapters)))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    shutil.rmtree(base / "checkpoints" / "0")
    with pytest.raises(LoraBaseError, match=r"its adapters were trained on base .*base/checkpoints/0.* lora.base is "
                                            r".*base/checkpoints/1"):
        load_run(str(adapters))


def test_merged_export_peft_adapter_and_load_run_equal_the_jax_lora_forward(bases, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from mirage_jax.export import MirageTransformer
    from mirage_jax.export.lora import export_adapter
    from mirage_jax.export.writer import export_params
    from mirage_jax.inference import load_run

    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "mirage_jax.export", f"--checkpoint={bases / 'adapters'}",
                          f"--out={tmp_path / 'merged'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = RunConfig.from_config(_lora_cfg(bases / "base"))
    cfg = run.model
    export_params(ParamReader(resolve_step_dir(str(bases / "base"))), cfg, str(tmp_path / "base_export"))
    export_adapter(ParamReader(resolve_step_dir(str(bases / "adapters"))).read_all(), cfg, run.lora,
                   str(tmp_path / "adapter"))

    inp = _forward_inputs(cfg)
    want = _jax_lora_forward(bases, inp).transpose(0, 4, 1, 2, 3)

    def torch_forward(m):
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
        with torch.no_grad():
            return m(t(inp["video"].transpose(0, 4, 1, 2, 3)), t(inp["text"]), t(inp["timestep"]),
                     t(inp["text_mask"]), audio_features=t(inp["audio"])).sample.numpy()

    merged = torch_forward(MirageTransformer.from_pretrained(tmp_path / "merged"))
    base_only = torch_forward(MirageTransformer.from_pretrained(tmp_path / "base_export"))
    tol = 1e-5 * np.abs(want).max()  # fp32: 1e-5 of the output's scale (x W + s x A B vs x (W + s A B) rounds)
    assert np.abs(want - base_only).max() > 1e3 * tol  # the adapters matter at this scale
    assert np.abs(merged - want).max() <= tol, np.abs(merged - want).max()
    peft_model = peft.PeftModel.from_pretrained(MirageTransformer.from_pretrained(tmp_path / "base_export"),
                                                str(tmp_path / "adapter"))
    assert np.abs(torch_forward(peft_model.base_model.model) - merged).max() <= tol

    loaded = load_run(str(bases / "adapters"))  # what generate and eval load
    got = np.asarray(_forward(loaded.model, inp))
    assert np.abs(got.transpose(0, 4, 1, 2, 3) - want).max() <= tol


def _lora_loss_and_grads(ici, devices, base_root):
    from mirage_jax.train import data as data_lib
    from mirage_jax.train import step as step_lib
    from mirage_jax.train.setup import RunSetup

    cfg = _lora_cfg(base_root)
    cfg.mesh.ici.update(ici)
    setup = RunSetup(cfg, devices)
    layout = setup.layout
    with jax.set_mesh(setup.mesh):
        params = _random_tree(layout.abstract_with_shardings().params, 7)
        base = _random_tree(layout.frozen.abstract, 8)
        rows = data_lib.process_rows(setup.mesh, setup.batch_axes, 8)
        batch = data_lib.to_global(next(data_lib.make_source(setup.run_cfg, rows, 3)), setup.batch_shardings, 8)
        grads_fn = step_lib._xla_grads(layout.graphdef, setup.dcfg, 1, setup.batch_axes, layout.shardings.params)

        @jax.jit
        def fn(p, b, bs):
            from flax.core import spmd as core_spmd

            with core_spmd.logical_axis_rules(setup.act_rules):
                loss, _, g = grads_fn(p, b, jax.random.key(3), bs)
            return loss, g

        loss, grads = fn(params, batch, base)
    a = params["blocks"]["video"]["mlp"]["up"]["lora"]
    return float(loss), jax.tree.map(np.asarray, grads), (a["lora_a"].sharding.spec, a["lora_b"].sharding.spec)


def test_sharded_lora_equals_one_device(bases):
    """fsdp x sequence x tensor on 8 CPU devices: loss and adapter gradients equal one device's; A and B are sharded
    like their kernel's in and out axes, the rank unsharded."""
    ref_loss, ref_grads, _ = _lora_loss_and_grads(dict(data=1, fsdp=1, sequence=1, tensor=1), jax.devices()[:1],
                                                  bases / "base")
    loss, grads, (spec_a, spec_b) = _lora_loss_and_grads(dict(data=1, fsdp=2, sequence=2, tensor=2), jax.devices(),
                                                         bases / "base")
    assert spec_a == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert spec_b == jax.sharding.PartitionSpec(None, None, "tensor")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat_ref, flat = flatten(ref_grads), flatten(grads)
    assert set(flat) == set(flat_ref)
    for k, g_ref in flat_ref.items():
        scale = float(np.abs(g_ref).max()) + 1e-12
        np.testing.assert_allclose(flat[k], g_ref, atol=1e-5 * scale + 1e-7, rtol=1e-4, err_msg="/".join(k))


def test_dropout_masks_the_adapter_input_without_bias():
    """lora.dropout = p: one key zeroes inputs (the output moves), and the mean over many keys is the output without
    dropout (inverted dropout keeps the expectation), within 5 standard errors."""
    from mirage_jax.model.layers import dense

    layer = dense(16, 8, ("embed", "heads"), rngs=nnx.Rngs(0), bias=False)
    lora = lora_adapter.LoRA(layer.kernel, 4, 2.0, 0.5, jax.random.key(1))
    lora.lora_b.set_value(jax.random.normal(jax.random.key(2), lora.lora_b.shape))
    x = jax.random.normal(jax.random.key(3), (3, 16))
    want = np.asarray(lora(x))  # no key: no dropout
    graphdef, state = nnx.split(lora)

    def one(k):
        m = nnx.merge(graphdef, state)
        m.key = nnx.Variable(k)
        return m(x)

    outs = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(4), 4000)))
    assert np.abs(outs[0] - want).max() > 1e-2
    stderr = outs.std(axis=0) / np.sqrt(len(outs))
    assert np.all(np.abs(outs.mean(axis=0) - want) <= 5 * stderr + 1e-6)


def test_config_mistakes_are_one_line_config_errors():
    from mirage_jax.config import ConfigError
    from mirage_jax.train.state import StateLayout

    with pytest.raises(ConfigError, match=r"--config.lora.base=''"):
        RunConfig.from_config(fast_config(lora__rank=4))
    with pytest.raises(ConfigError, match=r"--config.lora.targets='\(': not a regular expression"):
        RunConfig.from_config(fast_config(lora__rank=4, lora__base="x", lora__targets="("))
    run = RunConfig.from_config(fast_config(lora__rank=4, lora__base="x", lora__targets="blocks/video/qq"))
    with pytest.raises(ConfigError, match=r"--config.lora.targets='blocks/video/qq': matches no dense layer"):
        StateLayout(run.model, None, None, (), 0, run.lora)
    assert not RunConfig.from_config(fast_config()).lora.enabled  # absent / rank 0: a full run


@pytest.mark.slow  # three short runs (~50 s idle): `make test-slow`
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make sysdeps)")
def test_lora_on_shape_buckets_resumes_bitwise(bases, bucketed_shards, tmp_path):
    """LoRA x shape buckets: a LoRA run on two buckets (two lengths, two sizes: tests/test_train_buckets.py's TWO),
    stopped after step 5 (a step hook raises: the in-process stand-in for kill -9) and resumed from step 4's
    checkpoint, gives the uninterrupted run's bucket, loss and batch rows for steps 5..6 bitwise, and the same
    adapters at step 6; every step ran on its bucket's shape (both buckets seen)."""
    from mirage_jax.train.loop import Trainer

    def cfg(workdir, rows):
        return _lora_cfg(bases / "base", data__source=bucketed_shards, data__worker_count=0,
                         train__tokens_per_batch=2400, train__steps=6, checkpoint__save_every=4,
                         checkpoint__async_save=False, metrics__tensorboard=False,
                         data__bucket_batch="0.4s_64x64=0,0.2s_80x48=0", data__row_hash_log=str(workdir / rows))

    class Stop(Exception):
        pass

    def stop_after(step):
        if step == 5:
            raise Stop

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (str(tmp_path / "jax_cache"), 0, -1), strict=True):
        jax.config.update(k, v)  # the three runs compile the same two bucket steps: compile them once
    try:
        Trainer(cfg(tmp_path / "base", "rows"), str(tmp_path / "base")).run()
        with pytest.raises(Stop):
            Trainer(cfg(tmp_path / "run", "rows"), str(tmp_path / "run"), hooks=[stop_after]).run()
        Trainer(cfg(tmp_path / "run", "rows2"), str(tmp_path / "run")).run()
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
    want = {r["step"]: (r["bucket"], r["loss"]) for r in read_metrics(tmp_path / "base") if "bucket" in r}
    got = {r["step"]: (r["bucket"], r["loss"]) for r in read_metrics(tmp_path / "run") if "bucket" in r}
    assert {b for b, _ in want.values()} == {"0.2s_64x64", "0.4s_80x48"}
    assert {s: got[s] for s in (5, 6)} == {s: want[s] for s in (5, 6)}
    rows = lambda p: [json.loads(x) for x in open(p).read().splitlines()]  # noqa: E731
    assert rows(tmp_path / "run" / "rows2.p0.jsonl") == [r for r in rows(tmp_path / "base" / "rows.p0.jsonl")
                                                         if r["step"] >= 4]
    a, b = load_params(tmp_path / "base", 6), load_params(tmp_path / "run", 6)
    assert a.keys() == b.keys() and all(k.endswith(("/lora/lora_a", "/lora/lora_b")) for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
