"""Build a MirageDiT from its config: for real (initialized) or abstract (shapes only, no memory)."""

from __future__ import annotations

import jax
from flax import nnx

from mirage_jax.config import ModelConfig
from mirage_jax.model.dit import MirageDiT


def build_model(mcfg: ModelConfig, seed: int) -> MirageDiT:
    """The network with its parameters initialized from `seed` (inside `jax.jit`: only each device's shards)."""
    return MirageDiT(mcfg, rngs=nnx.Rngs(seed))


def abstract_model(mcfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract `nnx.Param` state (shapes, dtypes, logical axes); no memory used.
    Raises ValueError if the network holds state other than `nnx.Param` (the checkpoint carries only those)."""
    abs_model = nnx.eval_shape(lambda: build_model(mcfg, seed))
    graphdef, params, rest = nnx.split(abs_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("MirageDiT holds non-Param state; the train state only carries nnx.Param")
    return graphdef, params
