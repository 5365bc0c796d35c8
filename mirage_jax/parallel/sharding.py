"""Logical sharding constraints for activations.

The model names activation axes logically (`batch`, `seq`, `embed`, `act_heads`, `mlp`); the runtime
binds names to mesh axes with `flax.core.spmd.logical_axis_rules(rules)` and activates a mesh with
`jax.set_mesh(mesh)`. Outside such a context (unit tests, a single device) `constrain` is a no-op,
so the model never depends on the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec | None:
    """PartitionSpec for logical `axes` under the active rules, or None when no rules are set.

    As flax's `logical_to_mesh_axes`, a mesh axis already used by an earlier dimension is dropped from a
    later one: `("batch", "seq", "act_heads", None)` with seq -> sequence and act_heads -> (sequence,
    tensor) shards heads over `tensor` only, the layout that follows the Ulysses all-to-all back."""
    rules = core_spmd.get_logical_axis_rules()
    if not rules:
        return None
    table = dict(rules)
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for a in axes:  # a mesh axis shards at most one dimension: later dimensions drop axes already used
        mapped = table.get(a) if a is not None else None
        names = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
        keep = tuple(n for n in names if n not in used)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; a no-op without rules or an active mesh."""
    spec = logical_to_spec(axes)
    if spec is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, spec)
