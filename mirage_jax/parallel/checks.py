"""Checks that a parallel layout fits the model and the batch, run BEFORE anything is compiled.

XLA reports these mistakes late (after minutes of compilation on a pod) and in terms of HLO shapes;
here each one names the config field and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from jax.sharding import Mesh

from mirage_base.errors import MirageError
from mirage_jax.parallel.rules import Rules


class LayoutError(MirageError, ValueError):
    """The mesh / rules / batch size do not fit together; the message says which field to change."""


def axes_size(mesh: Mesh, axes: Any) -> int:
    """Product of the mesh sizes of `axes` (a name, a tuple of names, or None)."""
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in names)


def check_layout(mesh: Mesh, activation_rules: Rules, num_heads: int, global_batch: int, grad_accum: int) -> None:
    """Heads split over the attention-head axes; the global batch over micro-batches and batch axes."""
    table = dict(activation_rules)
    for name in ("act_heads", "heads"):
        n = axes_size(mesh, table.get(name))
        if num_heads % n:
            raise LayoutError(
                f"model.num_heads={num_heads} is not divisible by the {n} devices of the mesh axes "
                f"{table.get(name)} that shard `{name}` (mesh {dict(mesh.shape)}); change mesh.ici.tensor / "
                f"mesh.ici.sequence so that their product divides {num_heads}")
    if grad_accum < 1 or global_batch % grad_accum:
        raise LayoutError(f"train.global_batch_size={global_batch} is not divisible by train.grad_accum={grad_accum}")
    micro = global_batch // grad_accum
    n = axes_size(mesh, table.get("batch"))
    if micro % n:
        raise LayoutError(
            f"the micro-batch of {micro} samples (train.global_batch_size={global_batch} / train.grad_accum="
            f"{grad_accum}) is not divisible by the {n} devices of the batch axes {table.get('batch')} "
            f"(mesh {dict(mesh.shape)}); make train.global_batch_size a multiple of {n * grad_accum}")


def check_flat_grad_sync(mesh: Mesh, activation_rules: Rules, param_specs: list[Any]) -> tuple[str, ...]:
    """`train.grad_sync='flat'` computes gradients per device and sums them in one psum over the batch axes:
    that is only the full gradient when the batch axes are the only mesh axes with more than one device
    (no FSDP / tensor / sequence sharding). Returns the batch axes."""
    batch = dict(activation_rules).get("batch")
    axes = () if batch is None else batch if isinstance(batch, tuple) else (batch,)
    others = {a: n for a, n in mesh.shape.items() if a not in axes and n > 1}
    if others:
        raise LayoutError(
            f"train.grad_sync='flat' needs a pure data-parallel mesh, but mesh axes {others} outside the batch "
            f"axes {axes} have more than one device (mesh {dict(mesh.shape)}); set train.grad_sync='xla' or "
            f"make those mesh.ici / mesh.dcn sizes 1")
    for spec in param_specs:
        used = [a for part in spec if part is not None for a in (part if isinstance(part, tuple) else (part,))]
        if any(mesh.shape[a] > 1 for a in used):
            raise LayoutError(
                f"train.grad_sync='flat' needs replicated parameters, but one is sharded as {spec} over mesh "
                f"{dict(mesh.shape)}; set train.grad_sync='xla' or make mesh.ici.fsdp / mesh.dcn.fsdp 1")
    return axes
