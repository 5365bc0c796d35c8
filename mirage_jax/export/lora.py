"""A LoRA run's export: merged weights (the default) or a PEFT adapter folder (`--lora=adapter`).

Merged: every adapted kernel becomes W + (alpha / rank) * A @ B (`lora.adapter.merge_into`'s formula, per
leaf), the rest of the base unchanged; the export is then an ordinary one (`writer.export_params`: the naming
table's inverse, `MirageTransformer.from_pretrained`). The base is read leaf by leaf and fingerprinted as it is
read; an export whose base is not the one the adapters were trained on (the checkpoint meta's `lora_base`) is
refused before anything is moved into place.

Adapter: `adapter_config.json` + `adapter_model.safetensors` in PEFT's LoRA layout for `MirageTransformer`'s
module names (the naming table's source names without `.weight`), loaded with
`peft.PeftModel.from_pretrained(MirageTransformer.from_pretrained(BASE_EXPORT), DIR)`. A (in, r) and B (r, out)
become `lora_A.weight` (r, in) and `lora_B.weight` (out, r). SwiGLU's up and gate are one fused torch Linear
(`ff.net.0.proj`, rows value then gate): their two adapters are one adapter of rank 2r on it, A stacked and B
block-diagonal ([B_up 0; 0 B_gate] [A_up; A_gate] = [B_up A_up; B_gate A_gate]), with PEFT's `rank_pattern` /
`alpha_pattern` (2r, 2 alpha) keeping the scale alpha / r. Only kernels the table maps with a plain transpose or
a SwiGLU half have a PEFT form; others (the conv patch embedding) are refused (export merged instead).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from mirage_jax.checkpoint_format import ParamReader, flatten, unflatten
from mirage_jax.config import ModelConfig
from mirage_jax.export.writer import ExportError, write_folder
from mirage_jax.interop.mochi import SwiGLUHalf, Transpose, mochi_rows
from mirage_jax.lora import adapter as lora_adapter
from mirage_jax.lora import base as lora_base
from mirage_jax.run_config import LoraConfig

Path = tuple[str, ...]
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PEFT prepends to the module names in adapter_model.safetensors


def adapters_by_kernel(adapter_leaves: dict[str, np.ndarray]) -> dict[Path, tuple[np.ndarray, np.ndarray]]:
    """{kernel path: (A, B)} from a LoRA checkpoint's `params` leaves ('a/b/lora/lora_a' keys)."""
    tree = unflatten({tuple(k.split("/")): v for k, v in adapter_leaves.items()})
    return {(*path, "kernel"): ab for path, ab in lora_adapter.adapter_modules(tree).items()}


class MergedReader:
    """`path -> array` of the merged parameters: the base's leaf (read through `base`) plus the adapter delta for
    adapted kernels. Every base leaf read is fingerprinted; `check(expected)` compares the whole base."""

    def __init__(self, base: Callable[[Path], np.ndarray], adapters: dict[Path, tuple[np.ndarray, np.ndarray]],
                 scale: float):
        self.base, self.adapters, self.scale = base, adapters, scale
        self.digests: dict[str, str] = {}

    def __call__(self, path: Path) -> np.ndarray:
        w = np.asarray(self.base(path))
        self.digests["/".join(path)] = lora_base.leaf_digest("/".join(path), w)
        if path not in self.adapters:
            return w
        a, b = self.adapters[path]
        return (w.astype(np.float32) + lora_adapter.delta(a, b, self.scale)).astype(w.dtype)

    def check(self, meta: dict[str, Any], base_dir: str, step_dir: str) -> None:
        """Raise LoraBaseError unless the base read is the one the checkpoint `meta`'s `lora_base` records."""
        lora_base.check_base(meta, lora_base.combine_digests(self.digests), base_dir, step_dir)


def adapter_base(lcfg: LoraConfig, meta: dict[str, Any], step_dir: str) -> str:
    """The base step folder a `--lora=adapter` export names (`base_model_name_or_path`): the step the adapters were
    trained on, as the merged export reads it (`lora.base.trained_base_dir`: the one the checkpoint `meta`
    records, not `lora.base`'s newest step). When that step is gone, `lora.base` resolved now, named only once its
    fingerprint is the trained base's (read leaf by leaf as the merged export does; LoraBaseError naming both
    bases otherwise): the recorded step costs no base read."""
    base_dir = lora_base.trained_base_dir(lcfg.base, meta)
    if lora_base.recorded_base_dir(meta) is None:
        base = ParamReader(base_dir)
        reader = MergedReader(base, {}, lcfg.scale)
        for path in flatten(base.meta):
            reader(path)
        reader.check(meta, str(base_dir), step_dir)
    return str(base_dir)


def peft_tensors(adapters: dict[Path, tuple[np.ndarray, np.ndarray]], cfg: ModelConfig, rank: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(PEFT state dict without the adapter name, {module: rank} for modules whose rank is not `rank`).
    Raises ExportError for an adapted kernel that has no PEFT form."""
    fused: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    out: dict[str, np.ndarray] = {}
    mapped: set[Path] = set()
    for src, dst, fn, layer in mochi_rows(cfg.num_layers, audio=cfg.use_audio):
        if dst not in adapters:
            continue
        a, b = (np.asarray(x if layer is None else x[layer], np.float32) for x in adapters[dst])
        module = src.removesuffix(".weight")
        mapped.add(dst)
        if isinstance(fn, SwiGLUHalf):
            fused.setdefault(module, []).append((fn.part, a, b))
        elif isinstance(fn, Transpose):
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        else:
            raise ExportError(f"--lora=adapter: the adapted kernel {'/'.join(dst)} is `{src}` ({fn.name}) in "
                              "MirageTransformer, which has no PEFT LoRA form; export merged weights (--lora=merged) "
                              "or leave it out of lora.targets")
    for dst in sorted(set(adapters) - mapped):
        raise ExportError(f"--lora=adapter: the adapted kernel {'/'.join(dst)} is not in the naming table")
    ranks: dict[str, int] = {}
    for module, parts in fused.items():
        parts.sort(key=lambda p: p[0])
        hidden = parts[0][2].shape[1]
        big_a = np.concatenate([a.T for _, a, _ in parts], axis=0)  # (n * r, in)
        big_b = np.zeros((2 * hidden, rank * len(parts)), np.float32)  # (2 * hidden, n * r): value rows, gate rows
        for j, (part, _, b) in enumerate(parts):
            big_b[part * hidden:(part + 1) * hidden, j * rank:(j + 1) * rank] = b.T
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(big_a)
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = big_b
        if len(parts) != 1:
            ranks[module] = rank * len(parts)
    return out, ranks


def export_adapter(adapter_leaves: dict[str, np.ndarray], cfg: ModelConfig, lcfg: LoraConfig, out_dir: str, *,
                   dtype: Any = np.float32, overwrite: bool = False, base: str = "") -> dict[str, Any]:
    """Write the PEFT adapter folder whole or not at all (`writer.write_folder`, gs:// too); returns its config."""
    tensors, ranks = peft_tensors(adapters_by_kernel(adapter_leaves), cfg, lcfg.rank)
    modules = sorted({k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    alpha = float(lcfg.alpha or lcfg.rank)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base or None, "r": lcfg.rank,
        "lora_alpha": alpha, "lora_dropout": lcfg.dropout, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items()},
        "alpha_pattern": {re.escape(m): alpha * r / lcfg.rank for m, r in ranks.items()},
    }

    def fill(tmp: str) -> dict[str, Any]:
        save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()},
                  os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=1)
        return config

    return write_folder(out_dir, fill, last=ADAPTER_CONFIG, overwrite=overwrite)
