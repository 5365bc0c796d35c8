"""Checkpoint integrity without a model: uncommitted (torn) saves are invisible, damaged committed ones
raise naming the step directory, and a failed restore never falls back to a fresh start."""

from __future__ import annotations

import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.run_config import CheckpointConfig
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train import resume
from mirage_jax.train.state import TrainState

CKPT = CheckpointConfig(keep_last_n=2, keep_every_k=4, async_save=True, allow_config_change=False)
CONFIG = {"model": {"num_layers": 2}, "train": {"steps": 10}}


def tiny_state(step: int) -> TrainState:
    params = {"w": {"kernel": jnp.full((4, 2), float(step))}}
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=jnp.int32(step), params=params, opt_state=(), ema=params, nonfinite_streak=zero,
                      nonfinite_total=zero)


def write(workdir, steps) -> None:
    store = ckpt_lib.CheckpointStore(str(workdir), CKPT)
    for s in steps:
        store.save(s, tiny_state(s), {"kind": "synthetic", "step": s, "global": True}, CONFIG, {"step": s})
    store.wait()
    store.close()


def fake_layout() -> types.SimpleNamespace:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny_state(0))
    sharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), abstract)

    def create():
        raise AssertionError("must not start from scratch when checkpoints exist")

    # frozen=None: not a LoRA run (StateLayout.frozen)
    return types.SimpleNamespace(abstract=abstract, abstract_with_shardings=lambda: sharded, create=create,
                                 frozen=None)


def test_keep_latest_n_plus_every_k(tmp_path):
    write(tmp_path, [1, 2, 3, 4, 5, 6, 7])
    assert ckpt_lib.CheckpointStore(str(tmp_path), CKPT, read_only=True).all_steps() == [4, 6, 7]


def test_restore_roundtrip_with_data_state(tmp_path):
    write(tmp_path, [3])
    state, data, step = resume.restore_or_init(ckpt_lib.CheckpointStore(str(tmp_path), CKPT), fake_layout(), CONFIG,
                                               False)
    assert step == 3 and data["step"] == 3
    np.testing.assert_array_equal(np.asarray(state.params["w"]["kernel"]), np.full((4, 2), 3.0))


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--workdir=run`: Orbax itself refuses relative paths
    write("run", [2])
    state, data, step = resume.restore_or_init(ckpt_lib.CheckpointStore("run", CKPT), fake_layout(), CONFIG, False)
    assert step == 2 and data["step"] == 2 and (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_uncommitted_checkpoint_is_ignored_and_cleaned(tmp_path):
    write(tmp_path, [2])
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "2", ckpts / "5.orbax-checkpoint-tmp-1234")
    (ckpts / "5.orbax-checkpoint-tmp-1234" / "state" / "_METADATA").unlink(missing_ok=True)
    store = ckpt_lib.CheckpointStore(str(tmp_path), CKPT)
    assert store.latest_step() == 2
    _, _, step = resume.restore_or_init(store, fake_layout(), CONFIG, False)
    assert step == 2
    assert not (ckpts / "5.orbax-checkpoint-tmp-1234").exists()


def test_damaged_committed_checkpoint_raises_naming_the_step_dir(tmp_path):
    write(tmp_path, [2, 4])
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    for p in list(state_dir.iterdir()):  # the array data goes missing; the directory stays "committed"
        if p.name.startswith("ocdbt") or p.name.startswith("manifest") or p.name == "d":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    store = ckpt_lib.CheckpointStore(str(tmp_path), CKPT)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/4\b.*[Mm]ove"):
        resume.restore_or_init(store, fake_layout(), CONFIG, False)


def test_config_change_of_model_is_refused_naming_the_field(tmp_path):
    write(tmp_path, [2])
    store = ckpt_lib.CheckpointStore(str(tmp_path), CKPT)
    changed = {"model": {"num_layers": 3}, "train": {"steps": 10}}
    with pytest.raises(resume.ConfigChangeError, match=r"model.num_layers: 2 -> 3"):
        resume.restore_or_init(store, fake_layout(), changed, False)
    # a change outside the state (train.steps) is allowed
    _, _, step = resume.restore_or_init(store, fake_layout(), {"model": {"num_layers": 2}, "train": {"steps": 99}},
                                        False)
    assert step == 2


@pytest.mark.parametrize("content", [b"", b"\x00" * 40, b'{"kind": "synth', b"[1, 2]"])
def test_damaged_data_state_names_the_file_and_the_cause(tmp_path, content):
    """An empty, zeroed, cut or wrong-typed data_state.json: one message naming the file and what is wrong
    (json reports an empty file through a StopIteration context, which alone said 'StopIteration: 0')."""
    write(tmp_path, [2])
    path = tmp_path / "checkpoints" / "2" / "data" / ckpt_lib.DataStateHandler.FILE
    path.write_bytes(content)
    store = ckpt_lib.CheckpointStore(str(tmp_path), CKPT)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        resume.restore_or_init(store, fake_layout(), CONFIG, False)
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg and "StopIteration" not in msg and "move" in msg, msg


def test_unretrieved_orbax_write_tasks_are_not_logged_but_others_are(caplog):
    """A failed background save leaves Orbax's other failed write tasks unretrieved; asyncio logs each ('Task
    exception was never retrieved' + traceback) when the task is collected, sometimes before the trainer has
    seen the failure (CI: test_chaos's failed async save printed them). Real asyncio tasks, one whose coroutine
    is defined in a file under orbax/checkpoint/ (as Orbax's write_fragment is) and one elsewhere: only the
    second is logged."""
    import asyncio
    import gc

    namespace: dict = {}
    exec(compile("async def write_fragment():\n    raise ValueError('File too large')\n",
                 "/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), namespace)

    async def elsewhere():
        raise ValueError("a bug of ours")

    async def start_and_drop():
        for fn in (namespace["write_fragment"], elsewhere):
            asyncio.get_running_loop().create_task(fn())
        await asyncio.sleep(0.01)

    assert ckpt_lib.CheckpointStore  # the module (imported above) installs the filter on asyncio's logger
    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(start_and_drop())
        gc.collect()
    logged = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert len(logged) == 1 and "elsewhere" in logged[0], logged
