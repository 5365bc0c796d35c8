"""Euler sampler over the linear-quadratic schedule with per-modality classifier-free guidance.

Guidance composes the three conditionings the dropout in training makes available:
    v = v(none) + s_text * (v(text) - v(none)) + s_audio * (v(text, audio) - v(text))
so s_text = s_audio = 1 is the plain conditional velocity (one network pass per step). With
`cfg_schedule="cosine"` each scale is annealed as 1 + (s - 1) * (1 - cos(pi * t)) / 2: full guidance
at t = 1 (pure noise), none at t = 0.

Public API: `euler_sample(fn, noise, ...)` (the jitted loop over a velocity function; `mirage_jax.sampling` runs
the CLIs' sampling through it, sharded) and `sample(model, cond, shape, rng, ...)`, the same sampler in one
call on a live model (unsharded: notebooks, and the tests' reference that generate is compared against).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mirage_jax.diffusion.flow import model_inputs
from mirage_jax.diffusion.schedules import linear_quadratic_schedule, model_timestep

# velocity_fn(x, t, use_text, use_audio[, state]) -> velocity (x0 - noise) at noise level t (scalar array).
# `state` (e.g. a model's parameters) is carried through the sampling loop so that it lives at the loop's
# trace level: a closed-over nnx module cannot be used inside jax loops.
VelocityFn = Callable[..., jax.Array]


def guidance_weight(t: jax.Array, scale: float, schedule: str) -> jax.Array:
    if schedule == "cosine":
        return 1.0 + (scale - 1.0) * 0.5 * (1.0 - jnp.cos(math.pi * t))
    return jnp.asarray(scale, jnp.float32)


def guided_velocity(fn: VelocityFn, x: jax.Array, t: jax.Array, cfg_text: float, cfg_audio: float,
                    schedule: str, state: Any = None) -> jax.Array:
    if state is not None:
        fn = functools.partial(_call_with_state, fn, state)
    v_full = fn(x, t, True, True)
    if cfg_text == 1.0 and cfg_audio == 1.0:
        return v_full
    v_text = fn(x, t, True, False)
    v_none = fn(x, t, False, False) if cfg_text != 1.0 else v_text
    s_text = guidance_weight(t, cfg_text, schedule)
    s_audio = guidance_weight(t, cfg_audio, schedule)
    return v_none + s_text * (v_text - v_none) + s_audio * (v_full - v_text)


def _call_with_state(fn, state, x, t, use_text, use_audio):
    return fn(x, t, use_text, use_audio, state)


def euler_sample(fn: VelocityFn, noise: jax.Array, *, steps: int, threshold: float = 0.025,
                 cfg_text: float = 1.0, cfg_audio: float = 1.0, schedule: str = "constant",
                 sigmas: jax.Array | None = None, state: Any = None,
                 on_step: Callable[[int], None] | None = None) -> jax.Array:
    """Integrate dx/dt = -v from t = 1 (noise) to t = 0 on Mochi's linear-quadratic grid.

    `noise` is the latent shape (B, T, H, W, C) of pure noise; returns float32 latents of that shape.
    `on_step(i)` (optional) is called on the host at step i = 0 .. steps - 1, e.g. for a progress bar: a
    `jax.debug.callback`, so it also works when the sampler is jitted, once per step even on a mesh.
    """
    levels = jnp.asarray(linear_quadratic_schedule(steps, threshold) if sigmas is None else sigmas, jnp.float32)

    def body(i, carry):
        x, st = carry
        t, t_next = levels[i], levels[i + 1]
        if on_step is not None:
            jax.debug.callback(lambda k: on_step(int(k)), i)
        v = guided_velocity(fn, x, t, cfg_text, cfg_audio, schedule, st)
        return x + (t - t_next) * v.astype(x.dtype), st

    x, _ = jax.lax.fori_loop(0, levels.shape[0] - 1, body, (noise.astype(jnp.float32), state))
    return x


def model_velocity_fn(model: Any, cond: Mapping[str, Any]) -> tuple[VelocityFn, Any]:
    """Adapt MirageDiT + a conditioning batch to (VelocityFn, state); dropping a modality masks its tokens."""
    from flax import nnx

    b = cond["text"].shape[0]
    graphdef, state = nnx.split(model)

    def fn(x: jax.Array, t: jax.Array, use_text: bool, use_audio: bool, state: Any) -> jax.Array:
        c = dict(cond)
        if not use_text:
            c["text_mask"] = jnp.zeros_like(cond["text_mask"], dtype=bool)
        if not use_audio and cond.get("audio") is not None:
            c["audio_mask"] = jnp.zeros(cond["audio"].shape[:2], bool)
        ts = jnp.broadcast_to(model_timestep(t), (b,))
        return nnx.merge(graphdef, state)(x, ts, c["text"], c["text_mask"], **model_inputs(c))

    return fn, state


def sample(model: Any, cond: Mapping[str, Any], shape: tuple[int, ...], rng: jax.Array, *, steps: int = 64,
           threshold: float = 0.025, cfg_text: float = 1.0, cfg_audio: float = 1.0,
           schedule: str = "constant") -> jax.Array:
    """Latents (B, T, H, W, C) for the conditioning in `cond`; deterministic for `rng`."""
    noise = jax.random.normal(rng, shape, jnp.float32)
    fn, state = model_velocity_fn(model, cond)
    return euler_sample(fn, noise, steps=steps, threshold=threshold, cfg_text=cfg_text, cfg_audio=cfg_audio,
                        schedule=schedule, state=state)
