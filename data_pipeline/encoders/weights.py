"""Reading published encoder weights: a folder (or file) of safetensors + config.json, never pickle.

Frozen encoders with learned weights (`mochi_vae`, `wav2vec2`, `t5`) load the layouts their PyTorch owners
publish: diffusers' `vae/diffusion_pytorch_model.safetensors` + `config.json`, transformers'
`model.safetensors` (or sharded `model-0000N-of-0000M.safetensors` + index) + `config.json`. Tensors are
read with our own small safetensors parser over a memory map, so bf16/fp16 files work without torch and
nothing is ever unpickled; every tensor comes back as float32 numpy.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 by a 16-bit shift
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as float32 numpy arrays (bf16/fp16 widened), keyed by name."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
        lo, hi = info["data_offsets"]
        raw = np.frombuffer(data[lo:hi], dtype=dt).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32)
        out[name] = arr
    return out


def _safetensors_files(folder: str, preferred: Iterable[str]) -> list[str]:
    for name in preferred:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return [p]
        index = p + ".index.json"
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    return [os.path.join(folder, n) for n in found]


def load_weights(
    weights: str, preferred: Iterable[str], what: str
) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """(tensors, config.json dict, description) from a weights folder, or from one .safetensors file
    with config.json beside it. `preferred` names the file(s) to look for first; `what` names the
    encoder in errors. Pickle files (.bin/.pt/.ckpt) are refused with a pointer to conversion."""
    if not weights:
        raise ValueError(f"{what}: no weights given; pass weights=<folder with config.json + *.safetensors>")
    weights = os.path.expanduser(weights)
    if os.path.isfile(weights):
        if not weights.endswith(".safetensors"):
            raise ValueError(
                f"{what}: {weights} is not a .safetensors file; this code never unpickles (.bin/.pt/.ckpt). "
                "Convert it once in a trusted environment: load it with its library and save_pretrained("
                "..., safe_serialization=True)"
            )
        folder, files = os.path.dirname(weights) or ".", [weights]
    elif os.path.isdir(weights):
        folder, files = weights, _safetensors_files(weights, preferred)
        if not files:
            pickles = [n for n in os.listdir(weights) if n.endswith((".bin", ".pt", ".ckpt", ".pth"))]
            hint = (
                f" (it has {pickles}: convert once with save_pretrained(..., safe_serialization=True))"
                if pickles
                else ""
            )
            raise FileNotFoundError(f"{what}: no .safetensors file in {weights}{hint}")
    else:
        raise FileNotFoundError(f"{what}: weights path {weights} does not exist")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{what}: {cfg_path} is missing; the weights folder needs its config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    tensors: dict[str, np.ndarray] = {}
    for p in files:
        tensors.update(read_safetensors(p))
    return tensors, config, ", ".join(files)


def take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    """tensors[name], checked against `shape`; errors name the tensor and the file(s) it should be in."""
    if name not in tensors:
        raise KeyError(f"{source}: tensor {name!r} is missing (is this the right model / config.json?)")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}; "
            "the config and the weights do not belong together"
        )
    return t
