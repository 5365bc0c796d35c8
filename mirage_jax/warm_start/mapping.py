"""Build MirageDiT parameters from a Mochi source, slice by slice, straight into target shardings.

Every target leaf covered by the naming table (`mirage_jax.interop.mochi`) becomes a global jax.Array
from `jax.make_array_from_callback`: each process reads, for each of its devices, only the part of the
source tensor(s) that device's shard needs (stacked layers read only their layers, transposed tensors
only the transposed block). Nothing else of the source is ever in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mirage_jax.config import ModelConfig
from mirage_jax.interop.mochi import Transform, mochi_rows, unit_slice
from mirage_jax.warm_start.source import TensorSource

Path = tuple[str, ...]
Row = tuple[str, Transform, int | None]  # (source name, transform, layer or None if unstacked)


def read_transformed(src: TensorSource, name: str, fn: Transform, index: tuple[slice, ...]) -> np.ndarray:
    """fn.forward(tensor)[index], reading only what that block needs."""
    return fn.read_slice(lambda idx: src.read(name, idx), src.shape(name), index)


@dataclasses.dataclass
class Plan:
    """Which target leaves come from which source tensors, and what could not be mapped."""

    rows: dict[Path, list[Row]]  # target -> [(source, transform, layer)]
    mapped_sources: set[str]
    missing: list[str]  # sources the table needs that the file lacks
    mismatched: list[str]  # "name: source shape -> target shape"
    unused: list[str]  # source tensors no row reads


def plan(src: TensorSource, cfg: ModelConfig, target_shapes: Mapping[Path, tuple[int, ...]]) -> Plan:
    rows: dict[Path, list[Row]] = {}
    missing, mismatched = [], []
    for name, dst, fn, layer in mochi_rows(cfg.num_layers):
        if name not in src.names():
            missing.append(name)
            continue
        rows.setdefault(dst, []).append((name, fn, layer))
    for dst, rs in list(rows.items()):
        want = target_shapes.get(dst)
        for name, fn, layer in rs:
            got = fn.shape(src.shape(name))
            exp = None if want is None else (want[1:] if layer is not None else want)
            if exp is None or tuple(got) != tuple(exp):
                mismatched.append(f"{name} (in {src.file(name).name}): source {src.shape(name)} -> "
                                  f"{tuple(got)}, target {'.'.join(dst)} expects {exp}")
                rows.pop(dst, None)
                break
        else:
            layers = sorted(layer for _, _, layer in rs if layer is not None)
            if layers and layers != list(range(want[0])):
                mismatched.append(f"{'.'.join(dst)}: source has layers {layers}, target stacks {want[0]}")
                rows.pop(dst, None)
    used = {name for rs in rows.values() for name, _, _ in rs}
    unused = sorted(src.names() - {name for name, _, _, _ in mochi_rows(cfg.num_layers)})
    return Plan(rows=rows, mapped_sources=used, missing=sorted(missing), mismatched=sorted(mismatched),
                unused=unused)


def leaf_callback(src: TensorSource, rs: list[Row], stacked: bool
                  ) -> Callable[[tuple[slice, ...]], np.ndarray]:
    if not stacked:
        (name, fn, _), = rs
        return lambda index: read_transformed(src, name, fn, tuple(index))
    by_layer = {layer: (name, fn) for name, fn, layer in rs}

    def cb(index: tuple[slice, ...]) -> np.ndarray:
        layers = range(*unit_slice(index[0], len(by_layer)).indices(len(by_layer)))
        return np.stack([read_transformed(src, *by_layer[i], tuple(index[1:])) for i in layers])

    return cb


def build_mapped(src: TensorSource, p: Plan, shardings: Mapping[Path, jax.sharding.Sharding],
                 dtypes: Mapping[Path, Any], shapes: Mapping[Path, tuple[int, ...]]) -> dict[Path, jax.Array]:
    """Global arrays for every planned target leaf, each device reading only its shard."""
    out = {}
    for dst, rs in p.rows.items():
        stacked = rs[0][2] is not None
        cb = leaf_callback(src, rs, stacked)
        dtype = dtypes[dst]
        out[dst] = jax.make_array_from_callback(shapes[dst], shardings[dst],
                                                lambda idx, cb=cb, dtype=dtype: cb(idx).astype(dtype))
    return out
