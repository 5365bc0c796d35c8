"""2 processes x 4 CPU devices through launch/local.py: train, checkpoint (the same parameters as 1 process
x 8 devices trained on the same batches), then resume the checkpoint on 1 process x 8 devices under two
different meshes (equal parameters, same next loss)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mirage_jax.checkpoint_format import path_names
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train.setup import RunSetup
from train_cli import fast_config, load_params, loss_at, run_cli

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp() / "jax_cache")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("mp")
    result = run_cli(workdir, processes=2, devices=4, cache_dir=cache, train__steps=20,
                     mesh__ici__data=2, mesh__ici__fsdp=-1)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "[p0] " in result.stdout and "[p1] " in result.stdout
    assert "over 8 devices in 2 process(es)" in result.stdout  # the launcher's --devices-per-process is honoured
    assert "[launcher] exit statuses [0, 0]" in result.stdout
    return workdir


def test_two_processes_train_and_checkpoint(two_process_run):
    steps = sorted(int(p.name) for p in (two_process_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20]
    assert np.isfinite(loss_at(two_process_run, 20))


def test_two_processes_train_exactly_like_one(two_process_run, tmp_path, cache):
    """Data parallelism across processes adds nothing but summation order: 1 process x 8 devices, same mesh,
    same (global-row-deterministic) synthetic batches, ends at the same parameters after 20 steps."""
    one = tmp_path / "one"
    result = run_cli(one, processes=1, devices=8, cache_dir=cache, train__steps=20, mesh__ici__data=2,
                     mesh__ici__fsdp=-1)
    assert result.returncode == 0, result.stdout[-4000:]
    want, got = load_params(two_process_run, 20), load_params(one, 20)
    assert sorted(want) == sorted(got)
    # atol: leaves whose true gradient is 0 (e.g. the pool's key bias: softmax ignores it) get Adam steps of
    # float noise / sqrt(noise), ~1e-6 here in either run
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


ICIS = [dict(data=2, fsdp=2, sequence=1, tensor=2), dict(data=1, fsdp=4, sequence=2, tensor=1)]


@pytest.mark.parametrize("ici", ICIS)
def test_restore_into_one_process_and_another_mesh_gives_equal_params(two_process_run, ici):
    cfg = fast_config(train__steps=20)
    cfg.mesh.ici.update(ici)
    setup = RunSetup(cfg)
    mesh = setup.mesh
    store = ckpt_lib.CheckpointStore(str(two_process_run), setup.run_cfg.checkpoint, read_only=True)
    state, data_state = store.restore(20, setup.layout.abstract_with_shardings())
    assert data_state["step"] == 20 and int(state.step) == 20
    saved = load_params(two_process_run, 20)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        key = "/".join(path_names(path))
        assert leaf.sharding.mesh.shape == mesh.shape
        assert np.array_equal(np.asarray(leaf), saved[key]), key


def test_resume_on_one_process_two_meshes_same_next_loss(two_process_run, tmp_path, cache):
    import shutil

    losses = []
    for i, ici in enumerate([dict(data=8, fsdp=1), dict(data=1, fsdp=2, sequence=2, tensor=2)]):
        workdir = tmp_path / f"r{i}"
        shutil.copytree(two_process_run, workdir)
        overrides = {f"mesh__ici__{k}": v for k, v in ici.items()}
        result = run_cli(workdir, processes=1, devices=8, cache_dir=cache, train__steps=21, **overrides)
        assert result.returncode == 0, result.stdout[-4000:]
        assert "resumed from checkpoint at step 20 of 21" in result.stdout
        losses.append(loss_at(workdir, 21))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_launcher_saves_on_every_process_and_exits_zero(tmp_path, cache):
    import os
    import sys

    from mirage_jax.demo import preempt as drill
    from train_cli import ROOT, cli_args

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes=2", "--devices-per-process=4", "--",
           sys.executable, *cli_args(tmp_path, train__steps=10_000, checkpoint__save_every=10_000,
                                     mesh__ici__data=2, mesh__ici__fsdp=-1)]
    r = drill.preempt_at_step(cmd, tmp_path, 3, cwd=ROOT, env=env, timeout=400, poll_s=0.5)
    out = r.output
    assert r.returncode == 0, out[-4000:]
    assert out.count("PREEMPTED (clean exit)") == 2 and "[launcher] exit statuses [0, 0]" in out
    steps = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and int(steps[0]) >= 3


@pytest.mark.slow  # two LoRA runs (2 processes x 4 devices, 1 x 8) and two exports: ~2 min on 2 cores
def test_lora_on_two_processes_trains_like_one_and_its_adapter_exports(two_process_run, tmp_path, cache):
    """LoRA chained with the pod journey: rank-4 adapters over the base that the 2-process run wrote, trained by
    2 processes x 4 devices, equal the same LoRA run on 1 process x 8 devices (summation order only: measured
    1.5e-8 apart after 10 steps), and `export --lora=adapter` of the 2-process checkpoint writes the same PEFT
    adapter as the 1-process one's (peft's loading of such a folder is tests/test_lora.py's)."""
    import os
    import subprocess
    import sys

    from safetensors.numpy import load_file

    from train_cli import ROOT

    common = dict(train__steps=4, checkpoint__save_every=4, lora__rank=4, lora__base=str(two_process_run),
                  mesh__ici__data=2, mesh__ici__fsdp=-1)
    runs = {"two": (2, 4), "one": (1, 8)}
    for name, (processes, devices) in runs.items():
        r = run_cli(tmp_path / name, processes=processes, devices=devices, cache_dir=cache, **common)
        assert r.returncode == 0, r.stdout[-4000:]
    two, one = load_params(tmp_path / "two", 4), load_params(tmp_path / "one", 4)
    assert sorted(two) == sorted(one) and all("/lora/" in k for k in two)  # the adapters, not the base
    for key in two:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-7, err_msg=key)
    exported = {}
    for name in runs:
        out = tmp_path / f"export_{name}"
        r = subprocess.run([sys.executable, "-m", "mirage_jax.export", f"--checkpoint={tmp_path / name}",
                            f"--out={out}", "--lora=adapter"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
        assert r.returncode == 0, r.stderr[-3000:]
        exported[name] = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(exported["two"]) == sorted(exported["one"]) and exported["two"]
    for key, v in exported["two"].items():
        np.testing.assert_allclose(v, exported["one"][key], rtol=1e-4, atol=1e-7, err_msg=key)
