"""The README's main command on a laptop CPU: describe the tiny MirageDiT, train it briefly with flow
matching on a fixed synthetic batch, and draw a short guided sample.

    python -m mirage_jax.demo [--steps=60] [--config=configs/tiny.py]

It exercises the network, the objective and the sampler end to end and prints what it measured; the
full pipeline (synthetic A-roll -> shards -> multi-process training -> generation -> lip-sync eval) is
`make demo-e2e` once the data and runtime stages are wired (see README).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from mirage_jax.config import DiffusionConfig, ModelConfig
from mirage_jax.describe import describe
from mirage_jax.diffusion import flow_matching_loss, sample
from mirage_jax.model import MirageDiT

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.", lock_config=True)
flags.DEFINE_integer("steps", 60, "Training steps on the fixed synthetic batch.")
flags.DEFINE_integer("batch", 2, "Batch size.")


def synthetic_batch(mcfg: ModelConfig, shapes: dict, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    """A fixed random batch with the data loader's keys and the config's shapes."""
    rng = np.random.default_rng(seed)
    t, h, w = shapes["latent_frames"], shapes["latent_height"], shapes["latent_width"]
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {
        "video": f(batch, t, h, w, mcfg.latent_channels), "video_mask": jnp.ones((batch, t), bool),
        "audio": f(batch, shapes["audio_frames"], mcfg.audio_feature_dim),
        "audio_mask": jnp.ones((batch, shapes["audio_frames"]), bool),
        "text": f(batch, shapes["text_len"], mcfg.text_embed_dim),
        "text_mask": jnp.ones((batch, shapes["text_len"]), bool),
        "ref": f(batch, 1, h, w, mcfg.latent_channels), "ref_time": jnp.full((batch,), -10.0),
        "ref_mask": jnp.ones((batch,), bool),
    }


def main(argv: list[str]) -> None:
    del argv
    cfg = flags.FLAGS.config
    mcfg, dcfg = ModelConfig.from_config(cfg.model), DiffusionConfig.from_config(cfg.diffusion)
    shapes = cfg.shapes.to_dict()
    info = describe(mcfg, shapes)
    print(f"[describe] params {info['params']['total']:,} (audio stream {info['params']['audio']:,}); "
          f"tokens/sample {info['tokens']}; train FLOPs/sample {info['train_flops_per_sample']:.3e}")

    model = MirageDiT(mcfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    batch = synthetic_batch(mcfg, shapes, flags.FLAGS.batch)

    @nnx.jit
    def step(model, opt, batch, rng):
        (loss, _), grads = nnx.value_and_grad(lambda m: flow_matching_loss(m, batch, rng, dcfg), has_aux=True)(model)
        opt.update(model, grads)
        return loss

    losses, t0 = [], time.perf_counter()
    for i in range(flags.FLAGS.steps):
        losses.append(float(step(model, opt, batch, jax.random.key(i))))
        if i == 0:
            t_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
        if (i + 1) % 20 == 0:
            print(f"[train] step {i + 1:4d} loss {np.mean(losses[-20:]):.4f}")
    dt = (time.perf_counter() - t0) / max(1, flags.FLAGS.steps - 1)
    print(f"[train] first step (compile) {t_compile:.1f}s, then {dt * 1e3:.0f} ms/step; "
          f"loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")

    cond = {k: batch[k][:1] for k in ("text", "text_mask", "audio", "audio_mask", "ref", "ref_time", "ref_mask")}
    shape = (1,) + batch["video"].shape[1:]
    t0 = time.perf_counter()
    latents = nnx.jit(lambda m, c, r: sample(m, c, shape, r, steps=dcfg.sample_steps, cfg_audio=2.0,
                                             schedule="cosine"))(model, cond, jax.random.key(0))
    err = float(jnp.sqrt(jnp.mean((latents - batch["video"][:1]) ** 2)))
    print(f"[sample] {dcfg.sample_steps} Euler steps with audio guidance 2.0 in {time.perf_counter() - t0:.1f}s; "
          f"latents {tuple(latents.shape)}, RMS distance to the training clip {err:.3f} (noise would be ~1.41)")


if __name__ == "__main__":
    app.run(main)
