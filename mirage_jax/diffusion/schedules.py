"""Noise-level schedules and timestep samplers.

Convention (Mochi's, so warm-started weights keep their meaning): t in [0, 1] is the noise level,
x_t = (1 - t) * x0 + t * noise; the network is conditioned on 1000 * (1 - t) and predicts the
velocity v = x0 - noise (the direction from noise to data). Sampling integrates from t = 1 to t = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.config import DiffusionConfig


def linear_quadratic_schedule(num_steps: int, threshold_noise: float, linear_steps: int | None = None) -> np.ndarray:
    """Mochi's schedule: num_steps noise levels from 1.0 down, linear up to `threshold_noise`, then quadratic.

    Returns num_steps + 1 levels ending with 0.0 (identical to diffusers' `linear_quadratic_schedule`
    with the terminal zero appended).
    """
    if linear_steps is None:
        linear_steps = num_steps // 2
    if num_steps < 2 or linear_steps < 1:
        raise ValueError(f"linear_quadratic_schedule needs num_steps >= 2, got {num_steps}")
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * num_steps
    quad_steps = num_steps - linear_steps
    qc = diff / (linear_steps * quad_steps**2)
    lc = threshold_noise / linear_steps - 2 * diff / (quad_steps**2)
    const = qc * (linear_steps**2)
    quad = [qc * (i**2) + lc * i + const for i in range(linear_steps, num_steps)]
    sigmas = [1.0 - x for x in lin + quad]
    return np.asarray(sigmas + [0.0], dtype=np.float64)


def model_timestep(t: jax.Array) -> jax.Array:
    """What the network is conditioned on for noise level t (Mochi: 1000 * (1 - sigma))."""
    return 1000.0 * (1.0 - t)


def sample_timesteps(rng: jax.Array, n: int, cfg: DiffusionConfig) -> jax.Array:
    """n training noise levels in (0, 1) drawn as configured (`diffusion.timestep_sampler`)."""
    if cfg.timestep_sampler == "uniform":
        t = jax.random.uniform(rng, (n,))
    elif cfg.timestep_sampler == "logit_normal":
        t = jax.nn.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * jax.random.normal(rng, (n,)))
    elif cfg.timestep_sampler == "linear_quadratic":
        # inverse-CDF sampling: a uniform position along the schedule's steps, linearly interpolated,
        # so training visits noise levels with the same density sampling does.
        levels = jnp.asarray(linear_quadratic_schedule(cfg.lq_steps, cfg.lq_threshold), jnp.float32)
        u = jax.random.uniform(rng, (n,)) * cfg.lq_steps
        i = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, cfg.lq_steps - 1)
        frac = u - i
        t = levels[i] * (1 - frac) + levels[i + 1] * frac
    else:  # validated in DiffusionConfig
        raise ValueError(f"diffusion.timestep_sampler: {cfg.timestep_sampler!r}")
    return jnp.clip(t, 1e-5, 1.0 - 1e-5)
