"""Logical axis names -> mesh axes, for parameters (state shardings) and activations (constraints).

Parameters carry logical names in their `out_sharding` metadata (`nnx.with_partitioning`). A name maps
through the `mesh.rules.params` table of the validated `MeshConfig` (`normalize_rules`); a mesh axis already
used by an earlier dimension is skipped, and a dimension the mesh axes do not divide falls back to fewer axes
(finally replicated) so that every model size gets a valid layout; `param_specs` reports every such
fallback. Activations resolve through `mesh.rules.activations` inside `flax.core.spmd.logical_axis_rules`
(see `sharding.constrain`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mirage_base.errors import MirageError
from mirage_jax.run_config import MeshConfig

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]


class RulesError(MirageError, ValueError):
    """A logical axis name has no rule, or a rule names an axis the mesh does not have."""


def normalize_rules(mesh_cfg: MeshConfig, table: str, mesh: Mesh | None = None) -> Rules:
    """The rule table `table` ('params' or 'activations') of the validated `mesh` section as (name, axes) pairs;
    with `mesh`, every mesh axis a rule names must be one of its axes. RulesError names `mesh.rules.TABLE`."""
    return parse_rules(mesh_cfg.rules[table], f"mesh.rules.{table}", mesh)


def parse_rules(rules: Iterable[Sequence[Any]], field: str, mesh: Mesh | None = None) -> Rules:
    """Rules as a config or a checkpoint's JSON give them (lists or tuples) as a tuple of (name, axes) pairs;
    `field` names them in a RulesError."""
    out = []
    for item in rules:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise RulesError(f"{field}: each rule is (logical_name, mesh_axes), got {item!r}")
        name, axes = item
        if isinstance(axes, list | tuple):
            axes = tuple(axes) if len(axes) else None
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and mesh is not None and a not in mesh.axis_names:
                raise RulesError(f"{field}: rule {name!r} -> {a!r} names no mesh axis; mesh axes are "
                                 f"{tuple(mesh.axis_names)}")
        out.append((str(name), axes))
    return tuple(out)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return axes if isinstance(axes, tuple) else (axes,)


def resolve_spec(logical: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh_shape: Mapping[str, int],
                 *, field: str = "mesh.rules.params") -> tuple[PartitionSpec, bool]:
    """PartitionSpec for one array; the flag says a dimension fell back to fewer mesh axes."""
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    fell_back = False
    for name, dim in zip(logical, shape, strict=True):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise RulesError(f"{field}: no rule for logical axis {name!r}; add ({name!r}, <mesh axis or None>)")
        want = [a for a in _as_tuple(table[name]) if a not in used]
        while want and dim % math.prod(mesh_shape[a] for a in want):
            want.pop()
            fell_back = True
        used.update(want)
        out.append(None if not want else want[0] if len(want) == 1 else tuple(want))
    return PartitionSpec(*out), fell_back


def param_specs(abstract_state: Any, rules: Rules, mesh: Mesh) -> tuple[Any, list[str]]:
    """PartitionSpec for every Variable of an nnx State (pure-dict tree), plus the fallback paths."""
    fallbacks: list[str] = []

    def spec(path: tuple[Any, ...], var: Any) -> PartitionSpec:
        logical = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        shape = var.shape if hasattr(var, "shape") else ()
        if not logical:
            return PartitionSpec()
        s, fb = resolve_spec(tuple(logical), tuple(shape), rules, dict(mesh.shape))
        if fb:
            fallbacks.append(f"{jax.tree_util.keystr(path)} {tuple(shape)} {tuple(logical)} -> {s}")
        return s

    specs = jax.tree_util.tree_map_with_path(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return specs, fallbacks


def named(mesh: Mesh, specs: Any) -> Any:
    """NamedSharding tree for a PartitionSpec tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
