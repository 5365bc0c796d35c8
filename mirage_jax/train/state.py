"""The train state (step, params, optimizer state, EMA, NaN counters), created already sharded.

`StateLayout.create` (and `create_from`, which warm start uses) never materializes the full model on a host:
the model is built under `nnx.eval_shape` for shapes and logical axes, the rules give every leaf its
NamedSharding, and the real initialization runs inside `jax.jit(..., out_shardings=...)` so each device
creates only its shard. Params are a plain nested dict (`nnx.to_pure_dict` of the model's `nnx.Param`
state): the checkpoint format does not depend on Flax internals, and `nnx.merge(graphdef, params)` rebuilds the model.

A LoRA run (`lora.rank` > 0, docs/lora.md): `params` (and so the optimizer state and the EMA) are the adapters
only (`nnx.LoRAParam`); the frozen base is `StateLayout.frozen` (`lora.base.BaseWeights`), restored from
`lora.base` into the same parameter rules, passed to the step as a separate, non-donated argument and never
checkpointed (a checkpoint's meta records its fingerprint instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from mirage_jax.checkpoint_format import path_names
from mirage_jax.config import ModelConfig
from mirage_jax.lora import adapter as lora_adapter
from mirage_jax.lora.base import META_KEY, BaseWeights
from mirage_jax.model.build import abstract_model, build_model
from mirage_jax.parallel import rules as rules_lib
from mirage_jax.run_config import LoraConfig


@flax.struct.dataclass
class TrainState:
    """Everything a resume needs besides the data-iterator state."""

    step: jax.Array  # int32: optimizer steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    ema: Any
    nonfinite_streak: jax.Array  # int32: consecutive skipped steps up to now
    nonfinite_total: jax.Array  # int32: skipped steps over the run

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (the checkpointed form)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


def _follow_params(abstract_tree: Any, param_specs: Any) -> Any:
    """Specs for a tree whose leaves mirror params somewhere below (optimizer moments): match the
    longest path suffix that is a param path; anything else (counts, scalars) is replicated."""
    table = {path_names(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))}

    def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        names = path_names(path)
        for i in range(len(names)):
            if names[i:] in table:
                s = table[names[i:]]
                if getattr(leaf, "ndim", 0) == len(s) or len(s) == 0:
                    return s
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, abstract_tree)


class StateLayout:
    """Abstract train state with its shardings for one (model, optimizer, mesh, rules)."""

    def __init__(self, mcfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                 param_rules: rules_lib.Rules, seed: int, lora: LoraConfig | None = None):
        self.mcfg, self.tx, self.mesh, self.seed = mcfg, tx, mesh, seed
        self.lora = lora if lora is not None and lora.enabled else None
        self.frozen: BaseWeights | None = None  # a LoRA run's frozen base
        if self.lora is None:
            self.graphdef, abs_params = abstract_model(mcfg, seed)
        else:
            self.graphdef, abs_params, abs_base = lora_adapter.abstract_model(mcfg, seed, self.lora)
            base_specs, _ = rules_lib.param_specs(abs_base, param_rules, mesh)
            self.frozen_shardings = rules_lib.named(mesh, nnx.to_pure_dict(base_specs))
            self.frozen = BaseWeights(self.lora, mcfg, jax.tree.map(
                lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(abs_base),
                self.frozen_shardings))
        specs_state, self.fallbacks = rules_lib.param_specs(abs_params, param_rules, mesh)
        self.param_specs = nnx.to_pure_dict(specs_state)
        abs_pure = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abs_params))
        abs_opt = jax.eval_shape(tx.init, abs_pure)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        self.abstract = TrainState(step=scalar, params=abs_pure, opt_state=abs_opt, ema=abs_pure,
                                   nonfinite_streak=scalar, nonfinite_total=scalar)
        specs = TrainState(step=PartitionSpec(), params=self.param_specs,
                           opt_state=_follow_params(abs_opt, self.param_specs), ema=self.param_specs,
                           nonfinite_streak=PartitionSpec(), nonfinite_total=PartitionSpec())
        self.specs = specs
        self.shardings = rules_lib.named(mesh, specs)

    def abstract_with_shardings(self) -> TrainState:
        """ShapeDtypeStructs carrying the target NamedShardings (the restore target for any mesh)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)

    def fresh_state(self, params: Any) -> TrainState:
        """The step-0 state of a run starting from `params`: optimizer initialized, EMA = `params`, counters
        at 0 (traceable; what `create` and warm start jit)."""
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=self.tx.init(params),
                          ema=jax.tree.map(jnp.copy, params), nonfinite_streak=zero, nonfinite_total=zero)

    def _init_params(self) -> Any:
        if self.lora is not None:  # the adapters only (the base init is dead code to XLA)
            model = lora_adapter.build_model(self.mcfg, self.seed, self.lora)
            return nnx.to_pure_dict(nnx.state(model, lora_adapter.TRAINABLE))
        return nnx.to_pure_dict(nnx.state(build_model(self.mcfg, self.seed), nnx.Param))

    def init_params(self) -> Any:
        """Freshly initialized parameters (the same values `create` starts from), sharded like the state's."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init_params, out_shardings=self.shardings.params)()

    def create_from(self, make_params: Callable[..., Any], *args: Any) -> TrainState:
        """`fresh_state(make_params(*args))` computed on the mesh: every device materializes only its shards."""
        with jax.set_mesh(self.mesh):
            return jax.jit(lambda *a: self.fresh_state(make_params(*a)), out_shardings=self.shardings)(*args)

    def create(self) -> TrainState:
        """Initialize the state on the mesh; every device materializes only its own shards."""
        return self.create_from(self._init_params)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What every checkpoint's meta adds: a LoRA run's base identity ({"lora_base": {"path", "sha256"}})."""
        return {} if self.frozen is None else {META_KEY: self.frozen.identity()}

    def state_bytes(self) -> dict[str, int]:
        """Global bytes of the trained parameters, the optimizer state, the EMA and (a LoRA run) the frozen base."""
        size = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
        a = self.abstract
        return {"params": size(a.params), "opt_state": size(a.opt_state), "ema": size(a.ema),
                "frozen_base": size(self.frozen.abstract) if self.frozen is not None else 0}

    def param_count(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract.params))
