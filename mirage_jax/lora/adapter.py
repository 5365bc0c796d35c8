"""Low-rank adapters on MirageDiT's dense layers, as `nnx.LoRAParam`s (Hu et al. 2021, "LoRA", eq. 3).

`attach(model, ...)` gives every `model.layers.Dense` whose module path fully matches the `lora.targets` regex a
`LoRA` module: y = x @ W + b + (alpha / rank) * dropout(x) @ A @ B, A (in, rank), B (rank, out). Layers inside
the scanned blocks hold stacked kernels (layers, in, out); their A and B are stacked the same way (layers, in,
rank) / (layers, rank, out), so `nnx.scan` / `nnx.remat` slice them with the kernel. A and B carry the kernel's
logical axes for the in / out dimension and None for the rank, so the sharding rules lay them out like their base
kernel (fsdp over the in dimension, tensor over the out dimension, ...) with the rank unsharded.

The adapters are `nnx.LoRAParam` (a subclass of `nnx.Param`): `TRAINABLE` / `FROZEN` are the nnx filters that
split a LoRA model's state into the adapters (trained, in the optimizer) and the base (frozen).
Initialization follows PEFT's `LoraLayer.reset_lora_parameters`: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's
`kaiming_uniform_(a=sqrt(5))` on a (rank, in) weight), B = 0, so a fresh adapter computes the base exactly.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_jax.config import ConfigError, ModelConfig
from mirage_jax.model import build as model_build
from mirage_jax.model.layers import Dense, linear
from mirage_jax.run_config import LoraConfig

TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
A_NAME, B_NAME = "lora_a", "lora_b"  # leaf names under `<module path>/lora/`


class LoRA(nnx.Module):
    """`scale * dropout(x) @ A @ B` for one dense layer (or a stack of them: leading `layers` axis on A and B).

    Dropout needs a key per call: the train step sets `key` (an `nnx.Variable`, stacked like A for scanned layers)
    through `set_dropout_keys`; without one (inference, eval, dropout 0) the input is used as is."""

    key: Any = None  # the class default: not part of the module's graph until the step sets one

    def __init__(self, kernel: nnx.Param, rank: int, scale: float, dropout: float, key: jax.Array):
        shape, dtype = kernel.shape, kernel.dtype
        axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * len(shape))
        lead, din, dout = tuple(shape[:-2]), shape[-2], shape[-1]
        bound = 1.0 / np.sqrt(din)
        a = jax.random.uniform(key, (*lead, din, rank), jnp.float32, -bound, bound).astype(dtype)
        self.lora_a = nnx.LoRAParam(a, out_sharding=(*axes[:-1], None), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, dout), dtype), out_sharding=(*axes[:-2], None, axes[-1]),
                                    eager_sharding=False)
        self.scale, self.dropout = float(scale), float(dropout)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout > 0.0 and self.key is not None:
            keep = jax.random.bernoulli(self.key[...], 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return self.scale * linear(linear(x, a), b)


def dense_layers(model: nnx.Module) -> dict[str, Dense]:
    """Module path ('blocks/video/q') -> every `Dense` layer of the model."""
    return {"/".join(map(str, path)): m for path, m in model.iter_modules() if isinstance(m, Dense)}


def target_paths(model: nnx.Module, targets: str) -> list[str]:
    """The dense layers' module paths that fully match the regex `targets`, sorted."""
    pattern = re.compile(targets)
    return sorted(p for p in dense_layers(model) if pattern.fullmatch(p))


def attach(model: nnx.Module, *, rank: int, scale: float, targets: str, dropout: float, seed: int) -> list[str]:
    """Give every dense layer matched by `targets` a `LoRA` (in place; call under `nnx.eval_shape` or `jax.jit`
    as the model was built); returns the matched module paths. Raises ConfigError naming `lora.targets` when
    nothing matches."""
    layers = dense_layers(model)
    paths = target_paths(model, targets)
    if not paths:
        raise ConfigError(f"--config.lora.targets={targets!r}: matches no dense layer's module path (such as "
                          f"{', '.join(sorted(layers)[:4])}, ...; the regex must match a whole path)")
    key = jax.random.key(seed)
    for i, path in enumerate(paths):
        layers[path].lora = LoRA(layers[path].kernel, rank, scale, dropout, jax.random.fold_in(key, i))
    return paths


def build_model(mcfg: ModelConfig, seed: int, lcfg: LoraConfig) -> nnx.Module:
    """`model.build.build_model` with the adapters of `lcfg` attached (their init keys from `seed` + 1)."""
    model = model_build.build_model(mcfg, seed)
    attach(model, rank=lcfg.rank, scale=lcfg.scale, targets=lcfg.targets, dropout=lcfg.dropout, seed=seed + 1)
    return model


def abstract_model(mcfg: ModelConfig, seed: int, lcfg: LoraConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract adapters, abstract base) of the LoRA model; nothing allocated."""
    graphdef, adapters, base = nnx.split(nnx.eval_shape(lambda: build_model(mcfg, seed, lcfg)), TRAINABLE, FROZEN)
    return graphdef, adapters, base


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """Give every adapter with dropout its own key from `key` (stacked adapters: one key per layer)."""
    for i, (_, m) in enumerate(sorted(((p, m) for p, m in model.iter_modules() if isinstance(m, LoRA)),
                                      key=lambda pm: pm[0])):
        if m.dropout > 0.0:
            k = jax.random.fold_in(key, i)
            lead = m.lora_a.shape[:-2]
            m.key = nnx.Variable(jax.random.split(k, lead) if lead else k)


# ---- adapters as plain trees (checkpoints, export, inference) ---------------------------------------------------

def adapter_modules(adapters: dict[str, Any]) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """{module path tuple: (A, B)} of an adapter tree as checkpointed (`.../<module>/lora/{lora_a,lora_b}`)."""
    out: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict) and A_NAME in node and B_NAME in node and path and path[-1] == "lora":
            out[path[:-1]] = (node[A_NAME], node[B_NAME])
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, str(k)))

    walk(adapters, ())
    return out


def delta(a: Any, b: Any, scale: float) -> Any:
    """scale * A @ B per layer (A (..., in, r), B (..., r, out) -> (..., in, out)), numpy or jax in float32."""
    xp = jnp if isinstance(a, jax.Array) else np
    return scale * xp.matmul(xp.asarray(a, xp.float32), xp.asarray(b, xp.float32))


def merge_into(params: dict[str, Any], adapters: dict[str, Any], scale: float) -> dict[str, Any]:
    """The base `params` (nested dicts) with W + scale * A @ B folded into each adapted kernel (a new tree; the
    kernels keep their dtype). Raises KeyError naming an adapter whose kernel the base lacks."""
    out = jax.tree.map(lambda x: x, params)
    for path, (a, b) in adapter_modules(adapters).items():
        node = out
        for k in path:
            if k not in node:
                raise KeyError(f"adapter {'/'.join(path)}: the base has no such layer")
            node = node[k]
        w = node["kernel"]
        xp = jnp if isinstance(w, jax.Array) else np
        node["kernel"] = (xp.asarray(w, xp.float32) + delta(a, b, scale)).astype(w.dtype)
    return out


def combine(base: dict[str, Any], adapters: dict[str, Any]) -> dict[str, Any]:
    """One nested dict holding both (the state `nnx.merge` of a LoRA model's graphdef takes)."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
