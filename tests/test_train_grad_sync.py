"""`train.grad_sync='flat'` (per-device gradients summed in one raveled all-reduce) is the same train step as
the XLA-partitioned one: same random draws, same loss / gradient norm / bucket metrics and parameters after
two steps, with and without gradient accumulation; and it really issues one gradient all-reduce."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from mirage_jax.parallel import checks
from mirage_jax.train import data as data_lib
from mirage_jax.train.setup import RunSetup
from train_cli import fast_config


def setup(grad_sync: str, accum: int, ici: dict[str, int] | None = None):
    gb = 8 * accum
    cfg = fast_config(train__grad_sync=grad_sync, train__grad_accum=accum, train__global_batch_size=gb,
                      train__steps=10, train__clip_norm=1.0, train__seed=0)
    cfg.mesh.ici.update(ici or dict(data=-1, fsdp=1, sequence=1, tensor=1))
    s = RunSetup(cfg, jax.devices())
    mesh, layout, shardings = s.mesh, s.layout, s.batch_shardings
    batches = []
    source = data_lib.make_source(s.run_cfg, data_lib.process_rows(mesh, s.batch_axes, gb), 3)
    for _ in range(2):
        raw = next(source)
        # some padded frames, so that the loss weights differ between devices
        raw["video_mask"] = np.asarray(raw["video_mask"]).copy()
        raw["video_mask"][::3, -1] = 0
        batches.append(data_lib.to_global(raw, shardings, gb))
    return mesh, layout, s.make_step(), batches


def run(grad_sync: str, accum: int):
    mesh, layout, fn, batches = setup(grad_sync, accum)
    with jax.set_mesh(mesh):
        state = layout.create()
        out = []
        for b in batches:
            state, m = fn(state, b)
            out.append(jax.tree.map(np.asarray, m))
        hlo = fn.lower(state, batches[0]).compile().as_text()
        return out, jax.tree.map(np.asarray, state.params), hlo


@pytest.mark.parametrize("accum", [1, 2])
def test_flat_grad_sync_matches_xla(accum):
    ref_metrics, ref_params, ref_hlo = run("xla", accum)
    metrics, params, hlo = run("flat", accum)
    for m_ref, m in zip(ref_metrics, metrics, strict=True):
        for k in ("loss", "grad_norm", "loss_per_bucket", "bucket_counts"):
            np.testing.assert_allclose(m[k], m_ref[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for (path, p_ref), (_, p) in zip(jax.tree_util.tree_leaves_with_path(ref_params),
                                     jax.tree_util.tree_leaves_with_path(params), strict=True):
        np.testing.assert_allclose(p, p_ref, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # 'xla' reduces per-layer gradients inside the scanned backward pass as tuple all-reduces (one collective
    # per buffer on CPU); 'flat' sums every gradient in one 1-D all-reduce over all parameters.
    n_params = sum(p.size for p in jax.tree.leaves(params))
    flat_ars = re.findall(r"= f32\[(\d+)\]\{0\} all-reduce\(", hlo)
    assert any(int(n) >= n_params for n in flat_ars), flat_ars
    tuple_buffers = lambda text: sum(len(re.findall(r"f32\[", line.split("all-reduce(")[0]))  # noqa: E731
                                     for line in text.splitlines() if " all-reduce(" in line)
    assert tuple_buffers(hlo) < 10 < tuple_buffers(ref_hlo)


def test_flat_grad_sync_refuses_sharded_layouts():
    with pytest.raises(checks.LayoutError, match="train.grad_sync='flat'"):
        setup("flat", 1, dict(data=2, fsdp=4, sequence=1, tensor=1))
    with pytest.raises(checks.LayoutError, match="mesh axes .*tensor"):
        setup("flat", 1, dict(data=4, fsdp=1, sequence=1, tensor=2))
    with pytest.raises(ValueError, match="train.grad_sync='bucketed'"):
        setup("bucketed", 1)
