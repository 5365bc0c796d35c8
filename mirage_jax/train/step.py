"""The jitted train step: gradient accumulation, clipping + AdamW, EMA, and the NaN/Inf guard.

A step whose loss or gradient norm is not finite changes nothing but the counters (`step`,
`nonfinite_streak`, `nonfinite_total`); the loop stops the run when the streak reaches
`train.max_nonfinite_steps`. Randomness (timesteps, noise, condition dropout) is
`fold_in(key(seed), step)`, so a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec

from mirage_jax.config import DiffusionConfig
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
    train_cfg: Any,
    lr_schedule: optax.Schedule,
    activation_rules: tuple[tuple[str, Any], ...],
    batch_shardings: dict[str, NamedSharding],
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Jitted `(state, batch) -> (state, metrics)` with explicit shardings; `state` is donated."""
    graphdef, tx = layout.graphdef, layout.tx
    accum = int(train_cfg.grad_accum)
    seed = int(train_cfg.seed)
    ema_decay = float(train_cfg.ema_decay)
    batch_axes = dict(activation_rules).get("batch")

    def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        from mirage_jax.diffusion import flow_matching_loss

        model = nnx.merge(graphdef, params)
        loss, aux = flow_matching_loss(model, batch, rng, dcfg)
        return loss.astype(jnp.float32), {k: aux[k] for k in ("loss_per_bucket", "bucket_counts")}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with core_spmd.logical_axis_rules(activation_rules):
            rng = jax.random.fold_in(jax.random.key(seed), state.step)
            if accum == 1:
                (loss, aux), grads = grad_fn(state.params, batch, rng)
            else:
                micro = _split_micro(batch, accum, batch_axes)

                def body(carry: Any, xs: tuple[jax.Array, Batch]) -> tuple[Any, None]:
                    i, mb = xs
                    (loss_i, aux_i), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                    return jax.tree.map(jnp.add, carry, (loss_i, aux_i, g)), None

                nb = dcfg.loss_buckets
                buckets = {"loss_per_bucket": jnp.zeros((nb,), jnp.float32),
                           "bucket_counts": jnp.zeros((nb,), jnp.float32)}
                init = (jnp.zeros((), jnp.float32), buckets,
                        jax.tree.map(lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros_like(p), s),
                                     state.params, layout.shardings.params))
                (loss, aux, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
                loss = loss / accum
                grads = jax.tree.map(lambda g: g / accum, grads)

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

    return jax.jit(step, in_shardings=(layout.shardings, batch_shardings), out_shardings=(layout.shardings, None),
                   donate_argnums=(0,))


def make_eval_loss(layout: StateLayout, dcfg: DiffusionConfig, seed: int,
                   activation_rules: tuple[tuple[str, Any], ...]) -> Callable[..., tuple[jax.Array, Any]]:
    """`(params, batch, step) -> (loss, grads)` without an update: used by tests to compare layouts."""
    graphdef = layout.graphdef

    def fn(params: Any, batch: Batch, step: jax.Array) -> tuple[jax.Array, Any]:
        from mirage_jax.diffusion import flow_matching_loss

        with core_spmd.logical_axis_rules(activation_rules):
            rng = jax.random.fold_in(jax.random.key(seed), step)

            def loss(p: Any) -> jax.Array:
                return flow_matching_loss(nnx.merge(graphdef, p), batch, rng, dcfg)[0]

            return jax.value_and_grad(loss)(params)

    return jax.jit(fn)
