"""The one safetensors reader (against safetensors' own loaders) and the naming table's Transforms (each hook
against another: slice reads vs the whole-tensor forward, inverse vs forward)."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mirage_base.safetensors_reader import SafetensorsError, SafetensorsReader, weight_files
from mirage_jax.config import ModelConfig
from mirage_jax.interop.mochi import CONV_PATCH, GATE, ID, UP, T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sharded(folder, prefix="model"):
    """Two shards + index with bf16, f16, f32 and int tensors; returns {name: array} as written."""
    rng = np.random.default_rng(0)
    parts = [
        {"a": rng.standard_normal((5, 7)).astype(np.float32),
         "b": rng.standard_normal((4, 3, 2)).astype(ml_dtypes.bfloat16)},
        {"c": rng.standard_normal((6,)).astype(np.float16), "d": np.arange(12, dtype=np.int32).reshape(3, 4)},
    ]
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"{prefix}-{i + 1:05d}-of-00002.safetensors"
        save_file(part, os.path.join(folder, fname))
        weight_map.update(dict.fromkeys(part, fname))
    with open(os.path.join(folder, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    return {k: v for part in parts for k, v in part.items()}


def test_reader_equals_safetensors_loaders_whole_and_sliced(tmp_path):
    written = _sharded(tmp_path)
    files = weight_files(tmp_path, ("model.safetensors",))
    assert len(files) == 2 and all(names for names in files.values())
    r = SafetensorsReader(files)
    assert r.names() == set(written)
    peer = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        peer.update(load_file(str(f)))
    for name, want in peer.items():
        assert r.shape(name) == want.shape and r.file(name).name.startswith("model-")
        got = r.read(name)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(r.read("a", (slice(1, 4), slice(2, 7))), peer["a"][1:4, 2:7])
    assert np.array_equal(r.read("b", (slice(2, 4),)), peer["b"][2:4])
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch

    rt = SafetensorsReader(files, framework="pt")
    for f in sorted(tmp_path.glob("*.safetensors")):
        for name, want in load_torch(str(f)).items():
            assert torch.equal(rt.read(name), want)


def test_reader_errors_name_the_file(tmp_path):
    _sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])  # truncated
    with pytest.raises(SafetensorsError, match=shard.name):
        SafetensorsReader(weight_files(tmp_path, ("model.safetensors",)))
    shard.unlink()  # named by the index, missing
    with pytest.raises(SafetensorsError, match=shard.name):
        weight_files(tmp_path, ("model.safetensors",))
    shard.write_bytes(data)
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "extra.safetensors"))  # "a" twice
    with pytest.raises(SafetensorsError, match="'a' also appears"):
        SafetensorsReader(sorted(tmp_path.glob("*.safetensors")))


@pytest.mark.parametrize("fn,shape", [(ID, (6, 5)), (T, (6, 5)), (CONV_PATCH, (5, 3, 2, 2)), (UP, (8, 6)),
                                      (GATE, (8, 6))])
def test_transform_hooks_agree(fn, shape):
    """read_slice == forward(w)[block] for every block of a 2x2 shard grid; shape == forward's shape; inverse
    undoes forward (for the SwiGLU halves: the two inverses stacked give the fused tensor back)."""
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    full = fn.forward(w)
    assert fn.shape(shape) == full.shape
    reads = []

    def read(idx):
        reads.append(w[idx].size)
        return w[idx].copy()

    halves = [(slice(0, n // 2), slice(n // 2, n)) for n in full.shape]
    for a in halves[0]:
        for b in halves[1]:
            assert np.array_equal(fn.read_slice(read, shape, (a, b)), full[a, b])
    if fn is not CONV_PATCH:  # blocked reads together touch the tensor (or its half) once
        assert sum(reads) == full.size
    cfg = ModelConfig(patch_size=2, latent_channels=3)
    if fn.parts == 1:
        assert np.array_equal(fn.inverse(full, cfg), w)
    else:
        other = GATE if fn is UP else UP
        stacked = [None, None]
        stacked[fn.part], stacked[other.part] = fn.inverse(full, cfg), other.inverse(other.forward(w), cfg)
        assert np.array_equal(np.concatenate(stacked, axis=0), w)


def test_torch_export_module_imports_without_jax():
    code = "import sys, mirage_jax.export.torch_model; assert 'jax' not in sys.modules, 'jax imported'"
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
