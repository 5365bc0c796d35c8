"""Laying a config out on a slice: the one function that sets a layout (mesh axes, parameter rules, batch,
remat policy, splash's backward kernel) on a config.

Used by the layout search (`aot.search.configure`, one call per sweep point) and by the configs that ship
measured layouts (configs/mirage_10b.py: its `LAYOUTS` table is the 10B numbers; the library never imports
configs/). Both lay the state out the same way: fsdp takes the rest of the slice, and the parameters'
`embed` (FSDP) dimension is split over fsdp AND sequence, so the state is not replicated across the
sequence axis (with the default rules, `embed` on fsdp alone, every sequence group would hold a full copy
of its fsdp shard: `sequence` times the state memory).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

STATE_AXES = ("fsdp", "sequence")  # the mesh axes the parameters' `embed` dimension is split over


def params_sharded_over(rules: Iterable[Sequence[Any]],
                        axes: tuple[str, ...] = STATE_AXES) -> tuple[tuple[str, Any], ...]:
    """`rules` (a parameter rule table: (logical name, mesh axes) pairs) with the `embed` dimension split over
    `axes` instead of its own entry; every other entry unchanged."""
    return tuple((name, axes if name == "embed" else mesh_axes) for name, mesh_axes in rules)


def apply_layout(cfg: Any, *, sequence: int, global_batch: int, grad_accum: int = 1, remat: str = "full",
                 fused_bwd: bool = False, tensor: int = 1) -> Any:
    """Set a layout on `cfg` (an ml_collections.ConfigDict of a run config; changed in place and returned).

    Mesh: data 1, fsdp -1 (the rest of the slice), `sequence`, `tensor`; the parameter rules' `embed` over
    fsdp x sequence (`params_sharded_over`); `train.global_batch_size` = `global_batch` (samples per step),
    `train.grad_accum`; `model.remat_policy` and `model.splash_fused_bwd` (splash's fused backward kernel).
    """
    cfg.mesh.ici.update(dict(data=1, fsdp=-1, sequence=sequence, tensor=tensor))
    cfg.mesh.rules.params = params_sharded_over(cfg.mesh.rules.params)
    cfg.train.global_batch_size = global_batch
    cfg.train.grad_accum = grad_accum
    cfg.model.remat_policy = remat
    cfg.model.splash_fused_bwd = fused_bwd
    return cfg
