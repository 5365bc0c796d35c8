"""Cached guidance (FasterCache's CFG-cache) and step skipping (MagCache) for the Euler sampler, as ONE jitted loop.

Guidance (diffusion/sampler.py) needs up to three network passes per step:
    v = v_none + s_text (v_text - v_none) + s_audio (v_full - v_text)
      = v_full + (s_audio - 1) d_audio + (s_text - 1) d_text,   d_audio = v_full - v_text, d_text = v_text - v_none.
**CFG-cache** (FasterCache, Lv et al. 2024, "FasterCache: Training-Free Video Diffusion Model Acceleration with High
Quality", sec. 3.3): the guidance differences change slowly over steps, so on most steps only `v_full` is computed
and `d_audio` / `d_text` come from the last step that ran all branches. FasterCache splits the cached difference
into low and high spatial frequencies (FFT over H, W; low = a disc of radius min(H, W) // 5 around DC, as its
reference code) and weights the bands separately. Our compensation applies the split to the difference's *trend*:
    d_hat(i) = d(k) + (i - k) / (k - k') * IFFT(w_low * LF(d(k) - d(k')) + w_high * HF(d(k) - d(k')))
with k, k' the last two full steps: the slowly varying low band is extrapolated linearly (w_low = 1), the noisy
high band is held (w_high = 0). A difference that does not change is reused exactly (tested).
**Step skipping** (MagCache, Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache"): the
ratio of successive output magnitudes gamma_i = ||v_i|| / ||v_{i-1}|| is close to 1 and stable over most of
the trajectory; from one calibration run, `mag_skip_mask` skips step i (no network pass: the last computed
conditional output and guidance differences, recombined with step i's guidance scales) while
the accumulated error sum |1 - prod gamma| stays under a threshold and at most `max_skips` steps in a row, never in
the first `retention` fraction of steps.

The two masks (`cfg_mask`, `mag_skip_mask`) are plain Python in mirage_jax/cache_masks.py, shared with the PyTorch
export's loop (mirage_jax/export/cached_sampling.py). Both schedules are static (a per-step boolean array), so
the sampler stays one `fori_loop`: `lax.cond` on the step's flag runs only the taken branch (XLA conditionals
execute one branch on CPU, GPU and TPU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.cache_masks import cfg_mask, mag_skip_mask
from mirage_jax.diffusion.sampler import (
    VelocityFn,
    _call_with_state,
    guidance_weight,
    guided_velocity,
)
from mirage_jax.diffusion.schedules import linear_quadratic_schedule

__all__ = ["MODES", "CachePlan", "cached_euler_sample", "cfg_mask", "low_high_split", "mag_skip_mask", "make_plan",
           "magnitude_ratios", "velocity_norms"]

MODES = ("none", "cfg", "mag", "cfg+mag")


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Which network passes each of `steps` Euler steps runs.

    run_model[i]: False = step i reuses the last computed (guided) velocity, no network pass (MagCache).
    run_guidance[i]: False = step i computes only the fully conditioned branch and reuses the cached guidance
    differences (CFG-cache). w_low / w_high: the compensation weights of the differences' low / high band.
    """

    run_model: tuple[bool, ...]
    run_guidance: tuple[bool, ...]
    w_low: float = 1.0
    w_high: float = 0.0

    def __post_init__(self) -> None:
        if len(self.run_model) != len(self.run_guidance):
            raise ValueError(f"run_model has {len(self.run_model)} steps, run_guidance {len(self.run_guidance)}")
        if self.run_model and not (self.run_model[0] and self.run_guidance[0]):
            raise ValueError("the first step must run the model and every guidance branch (nothing is cached yet)")

    @property
    def steps(self) -> int:
        return len(self.run_model)

    def forwards(self, branches: int) -> int:
        """Network passes of the whole run when a guided step takes `branches` passes (1, 2 or 3)."""
        return sum((branches if g else 1) for m, g in zip(self.run_model, self.run_guidance, strict=True) if m)


def make_plan(mode: str, steps: int, skip: Sequence[bool] | None = None, *, warmup: float = 0.2,
              interval: int = 3) -> CachePlan | None:
    """The plan of `mode` ('none' -> None: the unchanged sampler). 'mag' / 'cfg+mag' need the calibrated `skip`
    mask of exactly `steps` steps."""
    if mode not in MODES:
        raise ValueError(f"cache mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "none":
        return None
    run_model = (True,) * steps
    if "mag" in mode:
        if skip is None or len(skip) != steps:
            raise ValueError(f"cache mode {mode!r} needs a skip mask of {steps} steps, got "
                             f"{None if skip is None else len(skip)}")
        run_model = tuple(not s for s in skip)
    run_guidance = cfg_mask(steps, warmup, interval) if "cfg" in mode else (True,) * steps
    return CachePlan(run_model=run_model, run_guidance=run_guidance)


def low_high_split(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(low, high) spatial-frequency parts of `d` (B, T, H, W, C), low + high == d: FFT over H, W; low is the
    disc |f| <= min(H, W) // 5 in integer frequencies (FasterCache's reference radius)."""
    h, w = d.shape[2], d.shape[3]
    r = min(h, w) // 5
    fy = np.fft.fftfreq(h) * h
    fx = np.fft.fftfreq(w) * w
    low = jnp.asarray((fy[:, None] ** 2 + fx[None, :] ** 2) <= r * r)[None, None, :, :, None]
    f = jnp.fft.fft2(d.astype(jnp.float32), axes=(2, 3))
    lo = jnp.real(jnp.fft.ifft2(jnp.where(low, f, 0), axes=(2, 3))).astype(d.dtype)
    return lo, d - lo


def _trend(d: jax.Array, d_prev: jax.Array, gap: jax.Array, w_low: float, w_high: float) -> jax.Array:
    """Per-step change of a guidance difference between two full steps `gap` apart, band-weighted:
    (w_low LF(d - d_prev) + w_high HF(d - d_prev)) / gap; zero when gap is 0 (no earlier full step). Computed
    once per full step, so a reused step costs one multiply-add, not an FFT."""
    if w_low == 0.0 and w_high == 0.0:
        return jnp.zeros_like(d)
    lo, hi = low_high_split(d - d_prev)
    return (w_low * lo + w_high * hi) * ((gap > 0) / jnp.maximum(gap, 1).astype(jnp.float32)).astype(d.dtype)


def _bind(fn: VelocityFn, st: Any) -> VelocityFn:
    return functools.partial(_call_with_state, fn, st) if st is not None else fn


def cached_euler_sample(fn: VelocityFn, noise: jax.Array, plan: CachePlan, *, threshold: float = 0.025,
                        cfg_text: float = 1.0, cfg_audio: float = 1.0, schedule: str = "constant",
                        sigmas: jax.Array | None = None, state: Any = None,
                        on_step: Callable[[int], None] | None = None) -> jax.Array:
    """`sampler.euler_sample` with `plan` (its steps are `plan.steps`): same arguments, same grid and guidance.

    Steps whose flags are all True compute exactly what the uncached sampler computes."""
    steps = plan.steps
    levels = jnp.asarray(linear_quadratic_schedule(steps, threshold) if sigmas is None else sigmas, jnp.float32)
    if levels.shape[0] != steps + 1:
        raise ValueError(f"sigmas has {levels.shape[0]} levels for a plan of {steps} steps")
    run_model = jnp.asarray(plan.run_model)
    run_guidance = jnp.asarray(plan.run_guidance)
    guided = not (cfg_text == 1.0 and cfg_audio == 1.0)
    x0 = noise.astype(jnp.float32)
    zeros = jnp.zeros_like(x0)
    cache0 = {"v_full": zeros, "d_a": zeros, "d_t": zeros, "tr_a": zeros, "tr_t": zeros, "k": jnp.int32(0)}

    def body(i, carry):
        x, st, c = carry
        t, t_next = levels[i], levels[i + 1]
        if on_step is not None:
            jax.debug.callback(lambda k: on_step(int(k)), i)

        def full(c, st):
            f = _bind(fn, st)
            if not guided:
                v = f(x, t, True, True).astype(jnp.float32)
                return v, dict(c, v_full=v)
            v_full = f(x, t, True, True)
            v_text = f(x, t, True, False)
            v_none = f(x, t, False, False) if cfg_text != 1.0 else v_text
            s_text = guidance_weight(t, cfg_text, schedule)
            s_audio = guidance_weight(t, cfg_audio, schedule)
            v = v_none + s_text * (v_text - v_none) + s_audio * (v_full - v_text)
            d_a, d_t = (v_full - v_text).astype(jnp.float32), (v_text - v_none).astype(jnp.float32)
            gap = i - c["k"]
            c = dict(c, v_full=v_full.astype(jnp.float32), d_a=d_a, d_t=d_t, k=i,
                     tr_a=_trend(d_a, c["d_a"], gap, plan.w_low, plan.w_high),
                     tr_t=_trend(d_t, c["d_t"], gap, plan.w_low, plan.w_high))
            return v.astype(jnp.float32), c

        def with_cached_guidance(v_full, c):
            if not guided:
                return v_full
            since = (i - c["k"]).astype(jnp.float32)
            d_a = c["d_a"] + since * c["tr_a"]
            d_t = c["d_t"] + since * c["tr_t"]
            s_text = guidance_weight(t, cfg_text, schedule)
            s_audio = guidance_weight(t, cfg_audio, schedule)
            return v_full + (s_audio - 1.0) * d_a + (s_text - 1.0) * d_t

        def reuse(c, st):
            v_full = _bind(fn, st)(x, t, True, True).astype(jnp.float32)
            return with_cached_guidance(v_full, c), dict(c, v_full=v_full)

        def compute(c, st):
            return jax.lax.cond(run_guidance[i], full, reuse, c, st) if guided else full(c, st)

        def skip(c, st):  # MagCache: the last computed conditional output, recombined with this step's guidance scales
            return with_cached_guidance(c["v_full"], c), c

        v, c = jax.lax.cond(run_model[i], compute, skip, c, st)
        return x + (t - t_next) * v.astype(x.dtype), st, c

    x, _, _ = jax.lax.fori_loop(0, steps, body, (x0, state, cache0))
    return x


def velocity_norms(fn: VelocityFn, noise: jax.Array, *, steps: int, threshold: float = 0.025,
                   cfg_text: float = 1.0, cfg_audio: float = 1.0, schedule: str = "constant",
                   state: Any = None) -> tuple[jax.Array, jax.Array]:
    """The uncached sampler's run (same grid, same guidance) with the per-step norm of the fully conditioned
    output (what a skipped step reuses): returns (latents, norms [steps, B]), norms[i, b] = ||v_full_i[b]||_2
    (MagCache's calibration signal; the pass is the one guidance runs anyway, XLA computes it once)."""
    levels = jnp.asarray(linear_quadratic_schedule(steps, threshold), jnp.float32)
    b = noise.shape[0]

    def body(i, carry):
        x, st, norms = carry
        t, t_next = levels[i], levels[i + 1]
        v = guided_velocity(fn, x, t, cfg_text, cfg_audio, schedule, st).astype(jnp.float32)
        f = functools.partial(_call_with_state, fn, st) if st is not None else fn
        v_full = f(x, t, True, True).astype(jnp.float32)
        norms = norms.at[i].set(jnp.sqrt(jnp.sum(jnp.square(v_full.reshape(b, -1)), axis=1)))
        return x + (t - t_next) * v.astype(x.dtype), st, norms

    x, _, norms = jax.lax.fori_loop(0, steps, body, (noise.astype(jnp.float32), state,
                                                     jnp.zeros((steps, b), jnp.float32)))
    return x, norms


def magnitude_ratios(norms: np.ndarray) -> list[float]:
    """gamma_i = mean over the batch of ||v_i|| / ||v_{i-1}|| (gamma_0 = 1), from `velocity_norms`' [steps, B]."""
    n = np.asarray(norms, np.float64)
    out = [1.0]
    for i in range(1, n.shape[0]):
        out.append(float(np.mean(n[i] / np.maximum(n[i - 1], 1e-12))))
    return out
