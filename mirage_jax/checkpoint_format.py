"""The on-disk format of a mirage_jax training checkpoint, read by train, export, inference and the drills.

A workdir holds `checkpoints/<step>/` folders (Orbax CheckpointManager, see train/checkpoint.py), each with
the items `state` (the train state: step, params, opt_state, ema, NaN counters, as nested dicts; optimizer
namedtuples are stored as dicts keyed by field), `data` (the data position), `config` (the run's config as
JSON) and `meta` (JSON). A leaf of a state tree is named by its path of string keys, the same whether the
tree is a live `TrainState` (namedtuple fields, dict keys) or Orbax metadata: `path_names`.

This module only reads; it imports neither the trainer nor the model (Orbax and JAX are imported by the
functions that restore arrays).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

from mirage_base.errors import CheckpointError, root_cause
from mirage_jax.config import ConfigError, ModelConfig
from mirage_jax.paths import orbax_path
from mirage_jax.run_config import RunConfig

Names = tuple[str, ...]
CHECKPOINTS = "checkpoints"  # WORKDIR/checkpoints/<step>/
STATE, CONFIG = "state", "config"  # the step items every reader needs


# ---- step-folder layout ------------------------------------------------------------------------------------

def step_dir(workdir: str, step: int) -> epath.Path:
    """WORKDIR/checkpoints/<step> (absolute, `paths.orbax_path`)."""
    return orbax_path(workdir) / CHECKPOINTS / str(step)


def resolve_step_dir(path: str) -> epath.Path:
    """WORKDIR (latest committed step), WORKDIR/checkpoints, or WORKDIR[/checkpoints]/STEP -> the step folder
    (absolute, `paths.orbax_path`). Raises CheckpointError naming `path` when there is no committed step."""
    p = orbax_path(path)
    if p.name.isdigit() and not p.exists() and (p.parent / CHECKPOINTS / p.name).exists():
        return p.parent / CHECKPOINTS / p.name  # WORKDIR/STEP names WORKDIR/checkpoints/STEP
    if not p.exists():
        raise CheckpointError(f"--checkpoint {p}: does not exist")
    if (p / STATE).exists() and (p / CONFIG).exists():
        return p
    import orbax.checkpoint as ocp

    root = p / CHECKPOINTS if (p / CHECKPOINTS).exists() else p
    # Orbax's own notion of committed: on GCS a step folder is written in place and committed only by its
    # commit_success.txt (a save killed midway leaves a torn `<step>/`); locally by the rename from tmp
    committed = set(ocp.path.step.checkpoint_steps(root))
    steps = sorted((int(d.name) for d in root.iterdir() if d.name.isdigit() and int(d.name) in committed
                    and (d / STATE).exists() and (d / CONFIG).exists()), reverse=True)
    if not steps:
        raise CheckpointError(f"--checkpoint {p}: no committed checkpoint (expected {root}/<step>/{STATE})")
    return root / str(steps[0])


# ---- the JSON items (config, meta) -------------------------------------------------------------------------

def config_to_dict(cfg: Any) -> dict[str, Any]:
    """An ml_collections config as plain JSON data (tuples become lists): the `config` item of every step."""
    return json.loads(cfg.to_json_best_effort())


def read_item(step: epath.Path, item: str) -> dict[str, Any]:
    """The JSON item `item` ("config" or "meta") of step folder `step`, as saved.
    Raises CheckpointError naming the file when it is missing or not JSON."""
    path = step / item / "metadata"
    try:
        return json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"cannot read {path} ({e}): {step} is not a mirage_jax training checkpoint, "
                              "or a damaged one") from e


def read_config(step: epath.Path) -> RunConfig:
    """The run's config saved with step folder `step`, parsed back into a validated `RunConfig` (an older
    version's model fields upgraded, sections and fields added since then at their defaults). Raises
    CheckpointError, one line naming the saved file and the field, when it is unreadable or does not parse."""
    config = read_item(step, CONFIG)
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{step}: its config has no `model` section; not a mirage_jax training run")
    try:
        return RunConfig.from_config(config)
    except ConfigError as e:  # `--config.shapes.text_len: missing ...`: the field, as the saved config names it
        raise CheckpointError(f"{step / CONFIG / 'metadata'}: the run's saved config does not parse: "
                              f"{str(e).removeprefix('--config.')} (a checkpoint of another mirage_jax version, or "
                              "a damaged one)") from None


def read_model_config(step: epath.Path) -> ModelConfig:
    """The validated `ModelConfig` of the run that wrote step folder `step`."""
    return read_config(step).model


# ---- tree paths and shapes ---------------------------------------------------------------------------------

def key_name(k: Any) -> str:
    """One JAX path entry as a string: DictKey.key, GetAttrKey.name (namedtuple field), SequenceKey.idx."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_names(path: tuple[Any, ...]) -> Names:
    """A JAX key path as a tuple of strings (the same for a TrainState and for Orbax's saved tree)."""
    return tuple(key_name(k) for k in path)


def flatten(tree: Any) -> dict[Names, Any]:
    """Path names -> leaf for every leaf of `tree`."""
    import jax

    return {path_names(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict[Names, Any]) -> dict[str, Any]:
    """Nested dicts from path names -> leaf (the inverse of `flatten` for trees of dicts)."""
    out: dict[str, Any] = {}
    for names, leaf in flat.items():
        node = out
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = leaf
    return out


def replace_leaves(tree: Any, flat: dict[Names, Any]) -> Any:
    """`tree` with every leaf whose path names are a key of `flat` replaced by that value (same structure)."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda p, leaf: flat.get(path_names(p), leaf), tree)


def tree_shapes(tree: Any) -> dict[Names, tuple[tuple[int, ...], str]]:
    """Path names -> (shape, dtype) for every array-like leaf (namedtuple fields and dict keys alike)."""
    return {names: (tuple(leaf.shape), str(getattr(leaf, "dtype", "")))
            for names, leaf in flatten(tree).items() if hasattr(leaf, "shape")}


def describe_tree_diff(saved: dict[Names, Any], current: dict[Names, Any], limit: int = 6) -> list[str]:
    """Human-readable differences between two `tree_shapes` tables (missing, new, reshaped leaves)."""
    lines = []
    for p in sorted(set(saved) - set(current))[:limit]:
        lines.append(f"only in checkpoint: {'/'.join(p)} {saved[p][0]}")
    for p in sorted(set(current) - set(saved))[:limit]:
        lines.append(f"only in this config: {'/'.join(p)} {current[p][0]}")
    for p in sorted(set(saved) & set(current)):
        if saved[p][0] != current[p][0] or saved[p][1] != current[p][1]:
            lines.append(f"changed: {'/'.join(p)} {saved[p]} -> {current[p]}")
            if len(lines) >= 3 * limit:
                break
    return lines


# ---- arrays ----------------------------------------------------------------------------------------------

def restore_subtree(step: epath.Path, target: dict[str, Any]) -> dict[str, Any]:
    """Orbax partial restore of step folder `step`'s train state: only the leaves of `target`, a sub-tree of
    the saved state as nested dicts of `jax.ShapeDtypeStruct`s carrying the shardings to restore into.
    Raises CheckpointError naming the step, the subtree and the root cause (e.g. a damaged chunk), or the leaves
    the checkpoint does not hold (Orbax's partial restore hands those back unrestored, as the abstract leaf)."""
    import jax
    import orbax.checkpoint as ocp

    try:
        out = ocp.PyTreeCheckpointer().restore(step / STATE, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    except Exception as e:  # noqa: BLE001 - re-raised as one line
        raise CheckpointError(
            f"restoring `{'`, `'.join(target)}` from {step / STATE} failed: {root_cause(e)}. If this checkpoint is "
            f"damaged, move {step} away (or name another step) to use the previous one") from e
    missing = ["/".join(names) for names, leaf in flatten(out).items() if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise CheckpointError(
            f"{step / STATE} holds no {', '.join(missing[:3])}" + (f" (and {len(missing) - 3} more)" if
                                                                   len(missing) > 3 else "")
            + ": it is not the train state this run's config expects (another model, or a LoRA run's adapters)")
    return out


# ---- parameters as numpy, on one host ----------------------------------------------------------------------

class ParamReader:
    """The `params` (or `ema`) subtree of a step's train state, restored onto this host's first device.

    `reader(path)` restores one leaf (memory bounded by the largest leaf: the exporter's use);
    `reader.read_all()` restores the whole subtree at once. Raises CheckpointError when the subtree is absent.
    """

    def __init__(self, step: epath.Path, *, ema: bool = False):
        import jax
        import orbax.checkpoint as ocp

        self._jax = jax
        self.step, self.path = step, step / STATE
        self.root = "ema" if ema else "params"
        meta = ocp.StandardCheckpointer().metadata(self.path)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
        if tree is None:  # Orbax returns empty metadata for a folder that holds no checkpoint (or no folder)
            raise CheckpointError(f"{self.path}: no saved train state here (a step folder holds state/ once its "
                                  f"save has committed); list the run's checkpoints/ for its steps")
        if self.root not in tree:
            raise CheckpointError(f"{self.path}: the train state has no `{self.root}` subtree")
        self.meta = tree[self.root]
        self.device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def _restore(self, meta: dict[Names, Any]) -> dict[Names, np.ndarray]:
        target = {self.root: unflatten({names: self._jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=self.device)
                                        for names, m in meta.items()})}
        return {names[1:]: np.asarray(leaf) for names, leaf in flatten(restore_subtree(self.step, target)).items()}

    def __call__(self, path: Names) -> np.ndarray:
        node: Any = self.meta
        for k in path:
            node = node[k]
        return self._restore({path: node})[path]

    def read_all(self) -> dict[str, np.ndarray]:
        """Every leaf of the subtree as numpy, keyed 'a/b/c'."""
        meta = flatten(self.meta)
        return {"/".join(names): v for names, v in self._restore(meta).items()}
