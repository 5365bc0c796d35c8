"""AdamW with linear warmup and cosine decay, global-norm clipping, weight decay on kernels only."""

from __future__ import annotations

from typing import Any

import jax
import optax

from mirage_jax.run_config import OptimConfig


def learning_rate_schedule(optim_cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then cosine down to `lr * end_lr_ratio` at `decay_steps`."""
    decay = optim_cfg.decay_steps if optim_cfg.decay_steps > 0 else total_steps
    warmup = optim_cfg.warmup_steps
    if decay <= warmup:
        return optax.linear_schedule(0.0, optim_cfg.lr, max(warmup, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup, decay_steps=decay,
        end_value=optim_cfg.lr * optim_cfg.end_lr_ratio)


def _decay_mask(params: Any) -> Any:
    """True for weight matrices (`kernel` leaves, and a LoRA run's `lora_a` / `lora_b`); biases, norms and RoPE
    frequencies are not decayed."""
    def is_kernel(path: tuple[Any, ...], _: Any) -> bool:
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in ("kernel", "lora_a", "lora_b")

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(optim_cfg: OptimConfig, clip_norm: float, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of the `optim` section (+ `train.clip_norm`); its state structure depends only on
    whether clipping is on, so lr / schedule changes keep checkpoints compatible."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay, mask=_decay_mask)
    if clip_norm and clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return adamw
