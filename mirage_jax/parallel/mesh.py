"""Build the 4-axis device mesh (data, fsdp, sequence, tensor) from the validated `mesh` section (`MeshConfig`).

Per-slice (ICI) and across-slice (DCN) sizes come from config with -1 meaning "the rest". Axis types
are `AxisType.Auto`: the rules-based sharding used here breaks under `jax.make_mesh`'s default
Explicit axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from mirage_base.errors import MirageError
from mirage_jax.run_config import MeshConfig

AXES = ("data", "fsdp", "sequence", "tensor")


class MeshConfigError(MirageError, ValueError):
    """The mesh section does not fit the devices; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Resolved per-slice and across-slice sizes, one entry per axis in AXES order."""

    ici: tuple[int, ...]
    dcn: tuple[int, ...]

    @property
    def sizes(self) -> dict[str, int]:
        return {a: i * d for a, i, d in zip(AXES, self.ici, self.dcn, strict=True)}


def _resolve(section: str, sizes: Mapping[str, int], total: int, what: str) -> tuple[int, ...]:
    """Replace a single -1 by `total / product(others)`; check the product equals `total`."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise MeshConfigError(f"mesh.{section}: unknown axis {unknown}; axes are {AXES}")
    vals = [sizes.get(a, 1) for a in AXES]
    free = [a for a, v in zip(AXES, vals, strict=True) if v == -1]
    if len(free) > 1:
        raise MeshConfigError(f"mesh.{section}: at most one axis may be -1, got {free}")
    for a, v in zip(AXES, vals, strict=True):
        if v == 0 or v < -1:
            raise MeshConfigError(f"mesh.{section}.{a}={v}: sizes are >= 1, or -1 for 'the rest'")
    known = math.prod(v for v in vals if v != -1)
    if free:
        if total % known:
            raise MeshConfigError(
                f"mesh.{section}: the fixed sizes {dict(zip(AXES, vals, strict=True))} multiply to {known}, "
                f"which does not divide the {total} {what}; change the sizes so their product divides {total}")
        vals[AXES.index(free[0])] = total // known
    elif known != total:
        raise MeshConfigError(
            f"mesh.{section}: sizes {dict(zip(AXES, vals, strict=True))} multiply to {known} but there are "
            f"{total} {what}; make the product {total} or set one axis to -1")
    return tuple(vals)


def num_slices(devices: Sequence[Any]) -> int:
    """Number of TPU slices (devices carry `slice_index` on multi-slice TPU); 1 elsewhere."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def resolve_shape(mesh_cfg: MeshConfig, devices: Sequence[Any]) -> MeshShape:
    """Sizes of every axis for these devices, or a MeshConfigError naming the field at fault."""
    slices = num_slices(devices)
    if len(devices) % slices:
        raise MeshConfigError(f"{len(devices)} devices do not split evenly into {slices} slices")
    dcn = _resolve("dcn", mesh_cfg.dcn, slices, "slices (DCN)")
    ici = _resolve("ici", mesh_cfg.ici, len(devices) // slices, "devices per slice (ICI)")
    return MeshShape(ici=ici, dcn=dcn)


def build_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The training mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(mesh_cfg, devices)
    if math.prod(shape.dcn) > 1:
        arr = mesh_utils.create_hybrid_device_mesh(shape.ici, shape.dcn, devices, allow_split_physical_axes=True)
    elif devices[0].platform == "tpu":
        arr = mesh_utils.create_device_mesh(shape.ici, devices, allow_split_physical_axes=True)
    else:
        # CPU/GPU: keep each process's devices contiguous (sorted by process, then id) so a process
        # holds whole batch rows and its local data maps onto its own devices.
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
        arr = np.asarray(devices, dtype=object).reshape(shape.ici)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    """One line: axis sizes and device/process counts."""
    sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in AXES)
    return f"mesh {sizes} over {mesh.size} devices in {jax.process_count()} process(es)"
