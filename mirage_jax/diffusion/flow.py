"""Rectified-flow (latent flow matching) training objective with per-modality condition dropout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mirage_base.batch_keys import CONDITION_KEYS
from mirage_jax.config import DiffusionConfig
from mirage_jax.diffusion.schedules import model_timestep, sample_timesteps


def drop_conditions(rng: jax.Array, batch: Mapping[str, Any], cfg: DiffusionConfig) -> dict[str, Any]:
    """Drop text / audio / reference per sample with the configured rates, by masking their tokens.

    A dropped modality's tokens are masked out of attention (and text out of the pooled embedding),
    which is exactly the network run without them, so classifier-free guidance works per modality.
    """
    return apply_drops(batch, draw_drops(rng, batch["video"].shape[0], cfg))


def draw_drops(rng: jax.Array, b: int, cfg: DiffusionConfig) -> dict[str, jax.Array]:
    """Per-sample keep flags (B,) for text / audio / reference, drawn with the configured drop rates."""
    k_text, k_audio, k_ref = jax.random.split(rng, 3)
    return {"keep_text": jax.random.uniform(k_text, (b,)) >= cfg.drop_text,
            "keep_audio": jax.random.uniform(k_audio, (b,)) >= cfg.drop_audio,
            "keep_ref": jax.random.uniform(k_ref, (b,)) >= cfg.drop_ref}


def apply_drops(batch: Mapping[str, Any], keep: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Mask out the tokens of every modality whose keep flag is False (see `drop_conditions`)."""
    out = dict(batch)
    b = batch["video"].shape[0]
    out["text_mask"] = batch["text_mask"].astype(bool) & keep["keep_text"][:, None]
    if batch.get("audio") is not None:
        mask = batch.get("audio_mask")
        mask = jnp.ones(batch["audio"].shape[:2], bool) if mask is None else mask.astype(bool)
        out["audio_mask"] = mask & keep["keep_audio"][:, None]
    if batch.get("ref") is not None:
        mask = batch.get("ref_mask")
        mask = jnp.ones((b,), bool) if mask is None else mask.astype(bool).reshape(b)
        out["ref_mask"] = mask & keep["keep_ref"]
    return out


def draw_noise(rng: jax.Array, batch: Mapping[str, Any], cfg: DiffusionConfig) -> dict[str, jax.Array]:
    """Every random draw of one training step's loss: timesteps `t` (B,), `noise` (like the video latents)
    and the condition-dropout keep flags. Drawn for the whole (global) batch, so a step that computes the
    loss per device (`train.grad_sync='flat'`) uses exactly the numbers the partitioned step does."""
    x0 = batch["video"]
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    return {"t": sample_timesteps(k_t, x0.shape[0], cfg),
            "noise": jax.random.normal(k_noise, x0.shape, jnp.float32),
            **draw_drops(k_drop, x0.shape[0], cfg)}


def fixed_draws(t: jax.Array | float, noise: jax.Array) -> dict[str, jax.Array]:
    """The draws of a loss at noise level `t` for every sample, with the given `noise` (B, T, H, W, C) and no
    condition dropped: `flow_matching_loss(..., draws=fixed_draws(t, noise))` scores every checkpoint on
    exactly the same problems (held-out evaluation)."""
    b = noise.shape[0]
    keep = jnp.ones((b,), bool)
    return {"t": jnp.full((b,), t, jnp.float32), "noise": noise, "keep_text": keep, "keep_audio": keep,
            "keep_ref": keep}


def _frame_mask(batch: Mapping[str, Any]) -> jax.Array:
    """(B, T) float32 mask of the valid latent frames (all ones without a `video_mask`)."""
    mask = batch.get("video_mask")
    return jnp.ones(batch["video"].shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)


def sample_weights(batch: Mapping[str, Any]) -> jax.Array:
    """(B,) float32: latent values each sample's loss averages over (its valid frames x C x H x W)."""
    x0 = batch["video"]
    return jnp.sum(_frame_mask(batch), axis=1) * (x0.shape[2] * x0.shape[3] * x0.shape[4])


def loss_weight(batch: Mapping[str, Any]) -> jax.Array:
    """Number of latent values the batch's loss averages over (the sum of `sample_weights`), as float32."""
    return jnp.sum(sample_weights(batch))


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of MirageDiT.__call__ taken from a batch dict (missing modalities stay None)."""
    return {k: batch.get(k) for k in CONDITION_KEYS if k not in ("text", "text_mask")}  # text goes positionally


def flow_matching_loss(
    model: Any, batch: Mapping[str, Any], rng: jax.Array | None, cfg: DiffusionConfig,
    draws: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared velocity error over valid latent positions, in float32.

    Randomness comes from `rng` (through `draw_noise`), or from `draws` already made by `draw_noise`.
    Returns (loss, aux) with aux["loss_per_bucket"] / aux["bucket_counts"]: summed per-sample losses
    and sample counts in `cfg.loss_buckets` equal-width noise-level buckets, for metrics.
    """
    if draws is None:
        if rng is None:
            raise ValueError("flow_matching_loss needs `rng` or `draws`")
        draws = draw_noise(rng, batch, cfg)
    x0 = batch["video"].astype(jnp.float32)
    t, noise = draws["t"], draws["noise"]
    tb = t[:, None, None, None, None]
    xt = (1.0 - tb) * x0 + tb * noise
    target = x0 - noise
    cond = apply_drops(batch, draws)
    pred = model(xt, model_timestep(t), cond["text"], cond["text_mask"], **model_inputs(cond))
    err = jnp.square(pred.astype(jnp.float32) - target)
    per_sample_sum = jnp.sum(err, axis=(2, 3, 4)) * _frame_mask(batch)  # (B, T)
    per_sample_n = sample_weights(batch)
    loss = jnp.sum(per_sample_sum) / jnp.maximum(jnp.sum(per_sample_n), 1.0)
    per_sample = jnp.sum(per_sample_sum, axis=1) / jnp.maximum(per_sample_n, 1.0)
    bucket = jnp.clip((t * cfg.loss_buckets).astype(jnp.int32), 0, cfg.loss_buckets - 1)
    onehot = jax.nn.one_hot(bucket, cfg.loss_buckets, dtype=jnp.float32)
    aux = {"loss_per_bucket": onehot.T @ per_sample, "bucket_counts": jnp.sum(onehot, axis=0), "t": t}
    return loss, aux
