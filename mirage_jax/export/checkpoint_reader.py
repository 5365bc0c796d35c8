"""Read parameters out of a mirage_jax training checkpoint (Orbax) on one host, a few leaves at a time.

Only Orbax is used (the exporter does not import the trainer): the step's `config` item gives the model
config and the `state` item's metadata gives every array's shape; leaves are restored by partial restore
onto this host's first device, one at a time, so memory stays bounded by the largest leaf.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

from data_pipeline.errors import MirageError
from mirage_jax.config import ModelConfig
from mirage_jax.paths import orbax_path

Path = tuple[str, ...]


class CheckpointError(MirageError, ValueError):
    """The checkpoint path is not a committed mirage_jax checkpoint; the message names it."""

    exit_code = 2


def resolve_step_dir(path: str) -> epath.Path:
    """WORKDIR (latest committed step), WORKDIR/checkpoints, or WORKDIR[/checkpoints]/STEP -> the step folder
    (absolute, `paths.orbax_path`)."""
    p = orbax_path(path)
    if p.name.isdigit() and not p.exists() and (p.parent / "checkpoints" / p.name).exists():
        return p.parent / "checkpoints" / p.name  # WORKDIR/STEP names WORKDIR/checkpoints/STEP
    if not p.exists():
        raise CheckpointError(f"--checkpoint {p}: does not exist")
    if (p / "state").exists() and (p / "config").exists():
        return p
    import orbax.checkpoint as ocp

    root = p / "checkpoints" if (p / "checkpoints").exists() else p
    # Orbax's own notion of committed: on GCS a step folder is written in place and committed only by its
    # commit_success.txt (a save killed midway leaves a torn `<step>/`); locally by the rename from tmp
    committed = set(ocp.path.step.checkpoint_steps(root))
    steps = sorted((int(d.name) for d in root.iterdir() if d.name.isdigit() and int(d.name) in committed
                    and (d / "state").exists() and (d / "config").exists()), reverse=True)
    if not steps:
        raise CheckpointError(f"--checkpoint {p}: no committed checkpoint (expected {root}/<step>/state)")
    return root / str(steps[0])


def read_model_config(step_dir: epath.Path) -> ModelConfig:
    path = step_dir / "config" / "metadata"
    try:
        cfg = json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read the run's config ({e})") from e
    return ModelConfig.from_config(cfg["model"])


class ParamReader:
    """Callable path -> numpy array for the `params` (or `ema`) subtree of a checkpoint's train state."""

    def __init__(self, step_dir: epath.Path, *, ema: bool = False):
        import jax
        import orbax.checkpoint as ocp

        self._jax, self._ocp = jax, ocp
        self.path = step_dir / "state"
        self.root = "ema" if ema else "params"
        meta = ocp.StandardCheckpointer().metadata(self.path)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
        if self.root not in tree:
            raise CheckpointError(f"{self.path}: the train state has no `{self.root}` subtree")
        self.meta = tree[self.root]
        self.device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def __call__(self, path: Path) -> np.ndarray:
        node: Any = self.meta
        for k in path:
            node = node[k]
        target: dict[str, Any] = {}
        cur = target.setdefault(self.root, {})
        for k in path[:-1]:
            cur = cur.setdefault(k, {})
        cur[path[-1]] = self._jax.ShapeDtypeStruct(tuple(node.shape), node.dtype, sharding=self.device)
        ocp = self._ocp
        out = ocp.PyTreeCheckpointer().restore(self.path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        leaf: Any = out[self.root]
        for k in path:
            leaf = leaf[k]
        return np.asarray(leaf)
