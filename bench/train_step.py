"""Train-step throughput: MirageDiT (audio stream off, so the networks are the same) vs a PyTorch step of
diffusers' MochiTransformer3DModel of equal dimensions and token counts (AdamW, fp32, CPU, same batch).

    python -m bench.train_step [--json] [--rounds=5] [--steps=3]

Both sides do the same work per step: forward on the same noisy latents, MSE against the same velocity
target, backward, AdamW update. The two are timed alternately in one run (the machine is shared and noisy)
and reported as samples/s medians and their ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
from absl import app, flags

flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
flags.DEFINE_integer("steps", 3, "Steps per timing round per framework.")
flags.DEFINE_integer("batch", 2, "Batch size.")
flags.DEFINE_integer("layers", 4, "Blocks.")
flags.DEFINE_integer("heads", 4, "Attention heads (head_dim 32).")
flags.DEFINE_integer("frames", 8, "Latent frames (16x16 latents, patch 2 -> 64 tokens per frame).")

MOCHI = dict(patch_size=2, attention_head_dim=32, in_channels=12, text_embed_dim=128, time_embed_dim=64)


def _inputs(batch: int, frames: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((batch, 12, frames, 16, 16)).astype(np.float32),
        "target": rng.standard_normal((batch, 12, frames, 16, 16)).astype(np.float32),
        "text": rng.standard_normal((batch, 32, 128)).astype(np.float32),
        "mask": np.ones((batch, 32), bool),
        "t": np.full((batch,), 500.0, np.float32),
    }


def jax_step(kw: dict, data: dict[str, np.ndarray]):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mirage_jax.config import ModelConfig
    from mirage_jax.interop.mochi import mochi_config_to_model
    from mirage_jax.model import MirageDiT

    cfg = ModelConfig(**mochi_config_to_model(kw), use_audio=False, pool_heads=8)
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    x = jnp.asarray(data["x"].transpose(0, 2, 3, 4, 1))
    target = jnp.asarray(data["target"].transpose(0, 2, 3, 4, 1))
    text, mask, t = jnp.asarray(data["text"]), jnp.asarray(data["mask"]), jnp.asarray(data["t"])

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            return jnp.mean((nnx.merge(graphdef, p)(x, t, text, mask) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    state = {"p": params, "o": opt}

    def run() -> float:
        state["p"], state["o"], loss = step(state["p"], state["o"])
        return float(loss)

    return run


def torch_step(kw: dict, data: dict[str, np.ndarray]):
    import torch
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(**kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, target = torch.from_numpy(data["x"]), torch.from_numpy(data["target"])
    text, mask, t = torch.from_numpy(data["text"]), torch.from_numpy(data["mask"]), torch.from_numpy(data["t"])

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x, text, t, mask).sample - target) ** 2)
        loss.backward()
        opt.step()
        return float(loss)

    return run


def measure(batch: int, layers: int, heads: int, frames: int, rounds: int, steps: int) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    kw = dict(MOCHI, num_layers=layers, num_attention_heads=heads, pooled_projection_dim=64)
    data = _inputs(batch, frames)
    runners = {"jax": jax_step(kw, data), "torch": torch_step(kw, data)}
    for r in runners.values():  # compile / warm up
        r()
        r()
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(rounds):
        for name, r in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                r()
            times[name].append((time.perf_counter() - t0) / steps)
    jax_sps = batch / statistics.median(times["jax"])
    torch_sps = batch / statistics.median(times["torch"])
    tokens = frames * 64 + 32
    return {
        "jax_samples_per_s": jax_sps, "torch_samples_per_s": torch_sps, "ratio": jax_sps / torch_sps,
        "jax_step_s": times["jax"], "torch_step_s": times["torch"],
        "setup": {"batch": batch, "layers": layers, "heads": heads, "head_dim": 32, "tokens_per_sample": tokens,
                  "dtype": "float32", "optimizer": "AdamW"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch_threads":
                    torch.get_num_threads()},
    }


def main(argv: list[str]) -> None:
    del argv
    F = flags.FLAGS
    res = measure(F.batch, F.layers, F.heads, F.frames, F.rounds, F.steps)
    if F.json:
        print(json.dumps(res))
    else:
        print(f"MirageDiT (JAX)  {res['jax_samples_per_s']:.2f} samples/s")
        print(f"Mochi (PyTorch)  {res['torch_samples_per_s']:.2f} samples/s")
        print(f"ratio JAX/PyTorch {res['ratio']:.2f}x  ({res['setup']})")


if __name__ == "__main__":
    app.run(main)
