"""CheckpointStore's array format (issue 20: the state is written without zstd): checkpoints of the format before
(zstd, Orbax's defaults) restore with the shipped one, whole and partially, and the other way round; the written
chunks' compressor is read back with tensorstore directly (not through Orbax)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from mirage_jax import checkpoint_format
from mirage_jax.run_config import CheckpointConfig
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train.state import TrainState

CKPT = CheckpointConfig(keep_last_n=2, keep_every_k=0, async_save=True, allow_config_change=False)


def random_state(seed: int) -> TrainState:
    k = iter(jax.random.split(jax.random.key(seed), 3))
    params = {"w": {"kernel": jax.random.normal(next(k), (64, 48))}, "b": jax.random.normal(next(k), (48,))}
    ema = {"w": {"kernel": jax.random.normal(next(k), (64, 48))}, "b": jnp.zeros((48,))}
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=jnp.int32(seed), params=params, opt_state=(), ema=ema, nonfinite_streak=zero,
                      nonfinite_total=zero)


def target_of(state: TrainState) -> TrainState:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)


def save(workdir, step: int, state: TrainState, fmt: ckpt_lib.ArrayFormat) -> None:
    store = ckpt_lib.CheckpointStore(str(workdir), CKPT, array_format=fmt)
    store.save(step, state, {"kind": "synthetic", "step": step, "global": True}, {"model": {}}, {"step": step})
    store.wait()
    store.close()


def compressors(state_dir) -> dict[str, object]:
    """Array name -> the `compressor` of its zarr2 metadata, read from the step's OCDBT database by tensorstore."""
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}"}).result()
    out = {}
    for key in kv.list().result():
        name = key.decode()
        if name.endswith("/.zarray"):
            out[name[: -len("/.zarray")]] = json.loads(kv.read(key).result().value)["compressor"]
    return out


def assert_state_equal(got: TrainState, want: TrainState) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("write_fmt, read_fmt", [(ckpt_lib.LEGACY_FORMAT, ckpt_lib.STATE_FORMAT),
                                                 (ckpt_lib.STATE_FORMAT, ckpt_lib.LEGACY_FORMAT)],
                         ids=["zstd-written-read-by-shipped", "shipped-written-read-by-zstd"])
def test_checkpoints_restore_across_formats(tmp_path, write_fmt, read_fmt):
    state = random_state(5)
    save(tmp_path, 5, state, write_fmt)
    step_dir = checkpoint_format.step_dir(str(tmp_path), 5)
    comp = compressors(step_dir / checkpoint_format.STATE)
    assert "params.w.kernel" in comp and len(comp) == len(jax.tree.leaves(state))
    want = {"id": "zstd", "level": 1} if write_fmt.compression else None
    assert all(c == want for c in comp.values()), comp

    store = ckpt_lib.CheckpointStore(str(tmp_path), CKPT, array_format=read_fmt)
    restored, data = store.restore(5, target_of(state))
    assert data["step"] == 5
    assert_state_equal(restored, state)
    # partial restore (generate / export --ema read the EMA this way)
    ema = store.restore_partial(5, {"ema": target_of(state).ema})
    assert_state_equal(ema["ema"], state.ema)
    store.close()


def test_store_resumes_saving_onto_a_zstd_checkpoint_dir(tmp_path):
    """A run resumed after the upgrade keeps saving into the same workdir; both steps restore."""
    save(tmp_path, 1, random_state(1), ckpt_lib.LEGACY_FORMAT)
    save(tmp_path, 2, random_state(2), ckpt_lib.STATE_FORMAT)
    store = ckpt_lib.CheckpointStore(str(tmp_path), CKPT)
    assert store.all_steps() == [1, 2]
    for s in (1, 2):
        assert_state_equal(store.restore(s, target_of(random_state(s)))[0], random_state(s))
    store.close()


def test_restore_casts_to_the_target_dtype(tmp_path):
    """A target leaf of another dtype than the saved one (bfloat16 params over a float32 checkpoint) is restored
    cast to it; the others keep their saved dtype and values."""
    state = random_state(3)
    save(tmp_path, 3, state, ckpt_lib.STATE_FORMAT)
    target = target_of(state)
    bf16 = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, jnp.bfloat16, sharding=t.sharding), target.params)
    target = TrainState(**{**target.as_dict(), "params": bf16})
    store = ckpt_lib.CheckpointStore(str(tmp_path), CKPT, read_only=True)
    got, _ = store.restore(3, target)
    store.close()
    for a, t in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
        assert a.dtype == t.dtype
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
    assert_state_equal(got.ema, state.ema)
