"""The sharded computation equals the unsharded one: loss and gradients on 8 CPU devices laid out as
fsdp x sequence x tensor (and sequence=4) match a 1-device mesh within fp32 tolerance."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from helpers import make_eval_loss
from mirage_jax.train import data as data_lib
from mirage_jax.train.setup import RunSetup
from train_cli import fast_config


@functools.lru_cache(maxsize=1)
def reference() -> tuple[float, dict, object]:
    return loss_and_grads(dict(data=1, fsdp=1, sequence=1, tensor=1), jax.devices()[:1])


def loss_and_grads(ici: dict[str, int], devices) -> tuple[float, dict, object]:
    cfg = fast_config(train__steps=10, train__seed=0)
    cfg.mesh.ici.update(ici)
    setup = RunSetup(cfg, devices)
    mesh, layout = setup.mesh, setup.layout
    state = layout.create()
    rows = data_lib.process_rows(mesh, setup.batch_axes, 8)
    batch = data_lib.to_global(next(data_lib.make_source(setup.run_cfg, rows, 3)), setup.batch_shardings, 8)
    fn = make_eval_loss(layout, setup.dcfg, 0, setup.act_rules)
    with jax.set_mesh(mesh):
        loss, grads = fn(state.params, batch, np.int32(3))
        hlo = fn.lower(state.params, batch, np.int32(3)).compile().as_text() if ici["sequence"] > 1 else ""
    if ici["sequence"] > 1:  # Ulysses: tokens re-shard to heads by all-to-all, not by gathering the sequence
        assert "all-to-all" in hlo
    # the layout really is sharded: the big video kernels are split
    kernel = state.params["blocks"]["video"]["mlp"]["up"]["kernel"]
    return float(loss), jax.tree.map(np.asarray, grads), kernel.sharding.spec


ICIS = [dict(data=1, fsdp=2, sequence=2, tensor=2), dict(data=2, fsdp=1, sequence=4, tensor=1)]


@pytest.mark.parametrize("ici", ICIS)
def test_sharded_loss_and_grads_match_one_device(ici):
    ref_loss, ref_grads, _ = reference()
    loss, grads, spec = loss_and_grads(ici, jax.devices())
    if ici["fsdp"] > 1:
        assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    assert len(flat) == len(flat_ref)
    for path, g_ref in flat_ref:
        g = flat[path]
        scale = float(np.abs(g_ref).max()) + 1e-12
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * scale + 1e-7, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
