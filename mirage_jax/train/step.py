"""The jitted train step: gradient accumulation, clipping + AdamW, EMA, and the NaN/Inf guard.

Gradients are synchronised one of two ways (`train.grad_sync`):
- 'xla' (default): the whole step is one SPMD program and XLA's partitioner inserts the reductions
  (reduce-scatters under FSDP, per-layer all-reduces inside the scanned backward pass, which XLA combines
  into a few tuple all-reduces on TPU/GPU).
- 'flat': a `jax.shard_map` over the batch axes computes each device's gradient of its own rows and sums
  them in ONE all-reduce of all gradients raveled into a single buffer (DDP's bucketing, one bucket). For
  pure data parallelism on multi-process CPU, where XLA runs each buffer of a tuple all-reduce as its own
  Gloo collective (162 per step for the demo model; docs/runtime.md).

A step whose loss or gradient norm is not finite changes nothing but the counters (`step`,
`nonfinite_streak`, `nonfinite_total`); the loop stops the run when the streak reaches
`train.max_nonfinite_steps`. Randomness (timesteps, noise, condition dropout) is
`fold_in(key(seed), step)`, so a resumed run draws exactly what the uninterrupted one would.

A LoRA run (`layout.frozen` set, docs/lora.md) jits `(state, batch, base)`: the frozen base is a third argument,
not donated, never differentiated (gradients, optimizer and EMA see the adapters in `state.params` only);
`make_train_step` returns it bound (`WithBase`), so callers still call `step(state, batch)` and `.lower(state,
batch)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec

from mirage_jax.config import DiffusionConfig
from mirage_jax.lora import adapter as lora_adapter
from mirage_jax.parallel import checks
from mirage_jax.run_config import TrainConfig
from mirage_jax.train.state import StateLayout, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _split_micro(batch: Batch, accum: int, batch_axes: Any) -> Batch:
    """[B, ...] -> [accum, B/accum, ...] so that every device keeps its own rows (no communication):
    micro-batch a takes rows a, a+accum, ...; the per-device contiguous shard stays on the device."""
    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        y = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, batch_axes, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, spec)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    layout: StateLayout,
    dcfg: DiffusionConfig,
    train_cfg: TrainConfig,
    lr_schedule: optax.Schedule,
    activation_rules: tuple[tuple[str, Any], ...],
    batch_shardings: dict[str, NamedSharding],
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Jitted `(state, batch) -> (state, metrics)` with explicit shardings; `state` is donated."""
    graphdef, tx = layout.graphdef, layout.tx
    frozen = layout.frozen
    accum, seed, ema_decay = train_cfg.grad_accum, train_cfg.seed, train_cfg.ema_decay
    batch_axes = dict(activation_rules).get("batch")
    grad_sync = train_cfg.grad_sync
    if grad_sync == "xla":
        compute_grads = _xla_grads(graphdef, dcfg, accum, batch_axes, layout.shardings.params)
    elif grad_sync == "flat":
        shardings = jax.tree.leaves(layout.shardings.params)
        if frozen is not None:
            shardings += jax.tree.leaves(layout.frozen_shardings)
        mesh = shardings[0].mesh
        axes = checks.check_flat_grad_sync(mesh, activation_rules, [sh.spec for sh in shardings])
        compute_grads = _flat_grads(graphdef, dcfg, accum, batch_axes, mesh, axes)
    else:  # run_config.TrainConfig refuses any other value up front
        raise ValueError(f"train.grad_sync={grad_sync!r}: expected 'xla' or 'flat'")

    def step(state: TrainState, batch: Batch, base: Any = None) -> tuple[TrainState, Metrics]:
        with core_spmd.logical_axis_rules(activation_rules):
            rng = jax.random.fold_in(jax.random.key(seed), state.step)
            loss, aux, grads = compute_grads(state.params, batch, rng, base)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema, new_params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        applied = state.step - state.nonfinite_total  # optimizer updates applied before this step
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            ema=keep(new_ema, state.ema),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32),
            nonfinite_total=(state.nonfinite_total + (~finite).astype(jnp.int32)).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr_schedule(applied), jnp.float32),
            "finite": finite,
            "nonfinite_streak": new_state.nonfinite_streak,
            "nonfinite_total": new_state.nonfinite_total,
            "loss_per_bucket": aux["loss_per_bucket"],
            "bucket_counts": aux["bucket_counts"],
        }
        return new_state, metrics

    if frozen is None:
        return jax.jit(step, in_shardings=(layout.shardings, batch_shardings),
                       out_shardings=(layout.shardings, None), donate_argnums=(0,))
    jitted = jax.jit(step, in_shardings=(layout.shardings, batch_shardings, layout.frozen_shardings),
                     out_shardings=(layout.shardings, None), donate_argnums=(0,))
    return WithBase(jitted, frozen)


class WithBase:
    """A LoRA run's jitted `(state, batch, base)` step with the base bound: called and lowered as `(state, batch)`.
    `lower` uses the base's abstract arrays (nothing restored: `mirage_jax.aot` compiles it for a TPU topology);
    calls restore the base on first use (`lora.base.BaseWeights.value`)."""

    def __init__(self, fn: Any, base: Any, lowered: Any = None):
        self.fn, self.base, self.lowered = fn, base, lowered

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return self.fn(state, batch, self.base.value())

    def lower(self, state: Any, batch: Any) -> WithBase:
        return WithBase(self.fn, self.base, self.fn.lower(state, batch, self.base.abstract))

    def compile(self) -> WithBase:
        return WithBase(self.lowered.compile(), self.base)

    def __getattr__(self, name: str) -> Any:  # the lowered / compiled object's cost_analysis, memory_analysis, ...
        return getattr(self.lowered if self.lowered is not None else self.fn, name)


GradFn = Callable[[Any, Batch, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array], Any]]
DROPOUT_STREAM = 0x10A  # fold_in(step key, DROPOUT_STREAM): the LoRA dropout masks' key


def _loss_fn(graphdef: Any, dcfg: DiffusionConfig) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    from mirage_jax.diffusion import flow_matching_loss

    def loss_fn(params: Any, batch: Batch, rng: jax.Array | None, draws: Any = None, base: Any = None,
                dropout_key: jax.Array | None = None) -> tuple[jax.Array, Any]:
        model = nnx.merge(graphdef, params if base is None else lora_adapter.combine(base, params))
        if dropout_key is not None:
            lora_adapter.set_dropout_keys(model, dropout_key)
        loss, aux = flow_matching_loss(model, batch, rng, dcfg, draws=draws)
        return loss.astype(jnp.float32), {k: aux[k] for k in ("loss_per_bucket", "bucket_counts")}

    return loss_fn


def _dropout_key(rng: jax.Array, base: Any) -> jax.Array | None:
    """The step's LoRA dropout key (None for a full run)."""
    return None if base is None else jax.random.fold_in(rng, DROPOUT_STREAM)


def _zero_buckets(dcfg: DiffusionConfig) -> dict[str, jax.Array]:
    nb = dcfg.loss_buckets
    return {"loss_per_bucket": jnp.zeros((nb,), jnp.float32), "bucket_counts": jnp.zeros((nb,), jnp.float32)}


def _micro_rng(rng: jax.Array, i: jax.Array | int, accum: int) -> jax.Array:
    """Micro-batch i's key: the step's key itself without accumulation, else fold_in(key, i)."""
    return rng if accum == 1 else jax.random.fold_in(rng, i)


def _xla_grads(graphdef: Any, dcfg: DiffusionConfig, accum: int, batch_axes: Any, param_shardings: Any) -> GradFn:
    """(loss, aux, grads) of the global batch as one partitioned program: XLA places the reductions."""
    grad_fn = jax.value_and_grad(_loss_fn(graphdef, dcfg), has_aux=True)

    def compute(params: Any, batch: Batch, rng: jax.Array, base: Any = None) -> tuple[jax.Array, Any, Any]:
        if accum == 1:
            (loss, aux), grads = grad_fn(params, batch, rng, None, base, _dropout_key(rng, base))
            return loss, aux, grads
        micro = _split_micro(batch, accum, batch_axes)

        def body(carry: Any, xs: tuple[jax.Array, Batch]) -> tuple[Any, None]:
            i, mb = xs
            mrng = _micro_rng(rng, i, accum)
            (loss_i, aux_i), g = grad_fn(params, mb, mrng, None, base, _dropout_key(mrng, base))
            return jax.tree.map(jnp.add, carry, (loss_i, aux_i, g)), None

        init = (jnp.zeros((), jnp.float32), _zero_buckets(dcfg),
                jax.tree.map(lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros_like(p), s),
                             params, param_shardings))
        (loss, aux, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
        return loss / accum, aux, jax.tree.map(lambda g: g / accum, grads)

    return compute


def _flat_grads(graphdef: Any, dcfg: DiffusionConfig, accum: int, batch_axes: Any, mesh: Any,
                axes: tuple[str, ...]) -> GradFn:
    """(loss, aux, grads) with one explicit all-reduce: every random draw is made for the global batch first
    (so the numbers match 'xla'), each device then differentiates its rows' share of the global loss
    (its squared-error sum over the global count of valid values) and one psum over `axes` adds the
    raveled (loss, loss buckets, gradients) of all devices."""
    from mirage_jax.diffusion import draw_noise, loss_weight

    loss_fn = _loss_fn(graphdef, dcfg)
    row_spec = PartitionSpec(None, axes or None)

    def weighted(params: Any, mb: Batch, draws: Any, total: jax.Array, base: Any,
                 dkey: jax.Array | None) -> tuple[jax.Array, Any]:
        loss, aux = loss_fn(params, mb, None, draws, base, dkey)
        return loss * (loss_weight(mb) / jnp.maximum(total, 1.0)), aux

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def local(params: Any, micro: Batch, draws: Any, totals: jax.Array, base: Any,
              dkeys: Any) -> tuple[jax.Array, Any, Any]:
        with core_spmd.logical_axis_rules(()):  # device-local arrays: no sharding constraints inside
            def body(carry: Any, xs: tuple[Batch, Any, jax.Array, Any]) -> tuple[Any, None]:
                mb, dr, tot, dkey = xs
                (loss_i, aux_i), g = grad_fn(params, mb, dr, tot, base, dkey)
                return jax.tree.map(jnp.add, carry, (loss_i, aux_i, g)), None

            init = (jnp.zeros((), jnp.float32), _zero_buckets(dcfg), jax.tree.map(jnp.zeros_like, params))
            summed, _ = jax.lax.scan(body, init, (micro, draws, totals, dkeys))
        flat, unravel = ravel_pytree(summed)
        return unravel(jax.lax.psum(flat, axes) if axes else flat)

    def compute(params: Any, batch: Batch, rng: jax.Array, base: Any = None) -> tuple[jax.Array, Any, Any]:
        micro = _split_micro(batch, accum, batch_axes)  # (accum, B / accum, ...), rows stay on their device
        parts = [jax.tree.map(lambda x, a=a: x[a], micro) for a in range(accum)]
        draws = [draw_noise(_micro_rng(rng, a, accum), mb, dcfg) for a, mb in enumerate(parts)]
        draws = jax.tree.map(lambda *x: jnp.stack(x), *draws)
        totals = jnp.stack([loss_weight(mb) for mb in parts])
        # LoRA dropout: one key per micro-batch, the same on every device (each masks its own rows)
        dkeys = None if base is None else jnp.stack([_dropout_key(_micro_rng(rng, a, accum), base)
                                                     for a in range(accum)])
        specs = (PartitionSpec(), jax.tree.map(lambda _: row_spec, micro), jax.tree.map(lambda _: row_spec, draws),
                 PartitionSpec(), PartitionSpec(), PartitionSpec())
        fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False)
        loss, aux, grads = fn(params, micro, draws, totals, base, dkeys)
        return loss / accum, aux, jax.tree.map(lambda g: g / accum, grads)

    return compute
