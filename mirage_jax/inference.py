"""Load a trained MirageDiT out of a training checkpoint for inference (generate, eval).

Only the `params` (or `ema`) subtree of the saved train state is read (Orbax partial restore), straight
into the target shardings: replicated by default, or laid out by the run's parameter rules on a mesh.
The run's config (saved with every checkpoint) rebuilds the network, so a checkpoint is all it needs.
A LoRA run's checkpoint (docs/lora.md) holds adapters only: its base (`lora.base` of its config) is restored the
same way and the adapters are folded into its kernels (W + alpha / rank * A @ B), so generate and eval load a LoRA
workdir directly and sample with a plain network at the base's cost.
"""

from __future__ import annotations

import dataclasses

import jax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mirage_jax.checkpoint_format import read_config, read_item, resolve_step_dir, restore_subtree
from mirage_jax.config import DiffusionConfig, ModelConfig
from mirage_jax.lora import adapter as lora_adapter
from mirage_jax.lora.base import check_base, check_same_network, fingerprint, trained_base_dir
from mirage_jax.model.build import abstract_model
from mirage_jax.parallel import rules as rules_lib
from mirage_jax.run_config import RunConfig


@dataclasses.dataclass
class LoadedRun:
    """A model restored from `step_dir`, with the run's config as saved."""

    model: nnx.Module
    config: RunConfig  # the run's saved config, parsed (checkpoint_format.read_config)
    step: int
    step_dir: epath.Path
    weights: str  # "params" or "ema"

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def diffusion_config(self) -> DiffusionConfig:
        return self.config.diffusion


def load_run(checkpoint: str, *, ema: bool = False, mesh: Mesh | None = None) -> LoadedRun:
    """Restore the model of `checkpoint` (WORKDIR, WORKDIR/checkpoints or a step folder).

    With `mesh`, parameters are sharded by the run's `mesh.rules.params` over it; otherwise every leaf is
    replicated on this process's devices (fine up to models that fit one device).
    """
    step_dir = resolve_step_dir(checkpoint)
    config = read_config(step_dir)  # CheckpointError naming a missing or bad field of the saved config
    graphdef, abs_params = abstract_model(config.model)
    if mesh is not None:
        rules = rules_lib.normalize_rules(config.mesh, "params", mesh)
        specs, _ = rules_lib.param_specs(abs_params, rules, mesh)
        shardings = rules_lib.named(mesh, nnx.to_pure_dict(specs))
    else:
        rep = NamedSharding(Mesh(jax.local_devices()[:1], ("d",)), PartitionSpec())
        shardings = jax.tree.map(lambda _: rep, nnx.to_pure_dict(abs_params))
    root = "ema" if ema else "params"
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            nnx.to_pure_dict(abs_params), shardings)
    lcfg = config.lora
    if not lcfg.enabled:
        params = restore_subtree(step_dir, {root: abstract})[root]  # CheckpointError naming the root cause
    else:  # the base's params, then this run's adapters (replicated: they are small) folded in
        meta = read_item(step_dir, "meta")
        base_dir = trained_base_dir(lcfg.base, meta)  # the step trained on, if the base workdir has moved on
        check_same_network(read_config(base_dir).model, config.model, str(base_dir))
        params = restore_subtree(base_dir, {"params": abstract})["params"]
        check_base(meta, fingerprint(params), str(base_dir), str(step_dir))
        _, abs_adapters, _ = lora_adapter.abstract_model(config.model, 0, lcfg)
        rep = NamedSharding(next(iter(jax.tree.leaves(shardings))).mesh, PartitionSpec())
        adapters = restore_subtree(step_dir, {root: jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep), nnx.to_pure_dict(abs_adapters))})[root]
        params = jax.jit(lambda p, a: lora_adapter.merge_into(p, a, lcfg.scale), out_shardings=shardings)(
            params, adapters)
    model = nnx.merge(graphdef, params)
    meta_step = int(step_dir.name) if step_dir.name.isdigit() else -1
    return LoadedRun(model=model, config=config, step=meta_step, step_dir=step_dir, weights=root)
