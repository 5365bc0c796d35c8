"""Rectified-flow (latent flow matching) training objective with per-modality condition dropout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mirage_jax.config import DiffusionConfig
from mirage_jax.diffusion.schedules import model_timestep, sample_timesteps


def drop_conditions(rng: jax.Array, batch: Mapping[str, Any], cfg: DiffusionConfig) -> dict[str, Any]:
    """Drop text / audio / reference per sample with the configured rates, by masking their tokens.

    A dropped modality's tokens are masked out of attention (and text out of the pooled embedding),
    which is exactly the network run without them, so classifier-free guidance works per modality.
    """
    out = dict(batch)
    b = batch["video"].shape[0]
    k_text, k_audio, k_ref = jax.random.split(rng, 3)
    keep_text = jax.random.uniform(k_text, (b,)) >= cfg.drop_text
    out["text_mask"] = batch["text_mask"].astype(bool) & keep_text[:, None]
    if batch.get("audio") is not None:
        keep_audio = jax.random.uniform(k_audio, (b,)) >= cfg.drop_audio
        mask = batch.get("audio_mask")
        mask = jnp.ones(batch["audio"].shape[:2], bool) if mask is None else mask.astype(bool)
        out["audio_mask"] = mask & keep_audio[:, None]
    if batch.get("ref") is not None:
        keep_ref = jax.random.uniform(k_ref, (b,)) >= cfg.drop_ref
        mask = batch.get("ref_mask")
        mask = jnp.ones((b,), bool) if mask is None else mask.astype(bool).reshape(b)
        out["ref_mask"] = mask & keep_ref
    return out


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of MirageDiT.__call__ taken from a batch dict (missing modalities stay None)."""
    return {k: batch.get(k) for k in ("audio", "audio_mask", "ref", "ref_time", "ref_mask", "video_mask")}


def flow_matching_loss(
    model: Any, batch: Mapping[str, Any], rng: jax.Array, cfg: DiffusionConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared velocity error over valid latent positions, in float32.

    Returns (loss, aux) with aux["loss_per_bucket"] / aux["bucket_counts"]: summed per-sample losses
    and sample counts in `cfg.loss_buckets` equal-width noise-level buckets, for metrics.
    """
    x0 = batch["video"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    t = sample_timesteps(k_t, b, cfg)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    tb = t[:, None, None, None, None]
    xt = (1.0 - tb) * x0 + tb * noise
    target = x0 - noise
    cond = drop_conditions(k_drop, batch, cfg)
    pred = model(xt, model_timestep(t), cond["text"], cond["text_mask"], **model_inputs(cond))
    err = jnp.square(pred.astype(jnp.float32) - target)
    frame_mask = batch.get("video_mask")
    frame_mask = jnp.ones(x0.shape[:2], jnp.float32) if frame_mask is None else frame_mask.astype(jnp.float32)
    per_elem = x0.shape[2] * x0.shape[3] * x0.shape[4]
    per_sample_sum = jnp.sum(err, axis=(2, 3, 4)) * frame_mask  # (B, T)
    per_sample_n = jnp.sum(frame_mask, axis=1) * per_elem
    loss = jnp.sum(per_sample_sum) / jnp.maximum(jnp.sum(per_sample_n), 1.0)
    per_sample = jnp.sum(per_sample_sum, axis=1) / jnp.maximum(per_sample_n, 1.0)
    bucket = jnp.clip((t * cfg.loss_buckets).astype(jnp.int32), 0, cfg.loss_buckets - 1)
    onehot = jax.nn.one_hot(bucket, cfg.loss_buckets, dtype=jnp.float32)
    aux = {"loss_per_bucket": onehot.T @ per_sample, "bucket_counts": jnp.sum(onehot, axis=0), "t": t}
    return loss, aux
