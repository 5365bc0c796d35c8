"""Reading published encoder weights: a folder (or file) of safetensors + config.json, never pickle.

Frozen encoders with learned weights (`mochi_vae`, `wav2vec2`, `t5`) load the layouts their PyTorch owners
publish: diffusers' `vae/diffusion_pytorch_model.safetensors` + `config.json`, transformers'
`model.safetensors` (or sharded `model-0000N-of-0000M.safetensors` + index) + `config.json`. Tensors are
read with the one safetensors reader (`mirage_base.safetensors_reader`: safetensors' memory-mapped
`safe_open`), so bf16/fp16 files work without torch and nothing is ever unpickled; every tensor comes back
as float32 numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from mirage_base.safetensors_reader import SafetensorsReader, weight_files


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
        folder, files = weights, list(weight_files(weights, preferred))
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
    reader = SafetensorsReader(files)
    tensors = {name: np.asarray(reader.read(name), dtype=np.float32) for name in sorted(reader.names())}
    return tensors, config, ", ".join(map(str, files))


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
