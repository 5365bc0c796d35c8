"""The PyTorch export's Euler sampler with guidance and the sampler cache of mirage_jax/diffusion/cache.py, in pure
PyTorch (importing it does not import JAX). docs/export.md ("Cached sampling") quotes `cached_sample`.

    from mirage_jax.export import MirageTransformer
    from mirage_jax.export.cached_sampling import cache_masks, cached_sample, mirage_velocity

    model = MirageTransformer.from_pretrained("exports/m10b")
    skip, run_guidance = cache_masks("cfg+mag", steps=64, schedule="exports/m10b/cache_schedule.json")
    latents = cached_sample(mirage_velocity(model, cond), noise, sigmas, skip, run_guidance,
                            cfg_text=1.5, cfg_audio=3.0, schedule="cosine")

Layouts are the export's: latents (B, C, T, H, W), channels first. `sigmas`: the steps + 1 noise levels from 1 to
0 the JAX sampler uses (Mochi's linear-quadratic grid: `diffusers.pipelines.mochi.pipeline_mochi.
linear_quadratic_schedule(steps, 0.025)` + [0.0], or `mirage_jax.diffusion.schedules.linear_quadratic_schedule`).
The masks are the same Python functions the JAX sampler uses (mirage_jax/cache_masks.py), and
tests/test_export.py checks that this loop on an export equals `cached_euler_sample` on the JAX model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch

from mirage_jax.cache_masks import cfg_mask

# velocity(latents (B, C, T, H, W), noise level t in [0, 1], use_text, use_audio) -> velocity, same shape
Velocity = Callable[[torch.Tensor, float, bool, bool], torch.Tensor]


def cache_masks(mode: str, steps: int, schedule: str | os.PathLike | None = None) -> tuple[list[bool], list[bool]]:
    """(skip, run_guidance) of `mode` ('none' | 'cfg' | 'mag' | 'cfg+mag') for `steps` steps. The 'mag' modes read
    `skip` from the schedule file `generate --calibrate_cache` wrote for the exported checkpoint (ValueError when
    it was calibrated for another step count); 'cfg' uses `cfg_mask(steps)`."""
    if mode not in ("none", "cfg", "mag", "cfg+mag"):
        raise ValueError(f"cache mode {mode!r}: one of none, cfg, mag, cfg+mag")
    skip = [False] * steps
    if "mag" in mode:
        if schedule is None:
            raise ValueError(f"cache mode {mode!r} needs the schedule file (cache_schedule.json)")
        with open(schedule) as f:
            sched = json.load(f)
        if sched["steps"] != steps:
            raise ValueError(f"{schedule} was calibrated for {sched['steps']} steps, not {steps}")
        skip = [bool(s) for s in sched["skip"]]
    run_guidance = list(cfg_mask(steps)) if "cfg" in mode else [True] * steps
    return skip, run_guidance


def mirage_velocity(model: torch.nn.Module, cond: Mapping[str, torch.Tensor | None]) -> Velocity:
    """`model` (a `MirageTransformer`) as a `Velocity` over one conditioning batch: `cond` holds its forward's
    keyword arguments (encoder_hidden_states, encoder_attention_mask, audio_features, audio_attention_mask,
    reference_latents, reference_time, reference_mask); a dropped modality has its attention mask all False (how
    training's condition dropout works), the timestep is Mochi's 1000 * (1 - t)."""

    def velocity(x: torch.Tensor, t: float, use_text: bool, use_audio: bool) -> torch.Tensor:
        kw = dict(cond)
        if not use_text:
            kw["encoder_attention_mask"] = torch.zeros_like(cond["encoder_attention_mask"], dtype=torch.bool)
        if not use_audio and cond.get("audio_features") is not None:
            kw["audio_attention_mask"] = torch.zeros(cond["audio_features"].shape[:2], dtype=torch.bool,
                                                     device=x.device)
        ts = torch.full((x.shape[0],), 1000.0 * (1.0 - t), dtype=torch.float32, device=x.device)
        with torch.no_grad():
            return model(hidden_states=x, timestep=ts, **kw).sample.float()

    return velocity


def guidance_weight(t: float, scale: float, schedule: str) -> float:
    """The guidance scale at noise level t: `scale` ('constant'), or cosine-annealed from 1 at t = 0 to `scale` at
    t = 1 ('cosine'), as `mirage_jax.diffusion.sampler.guidance_weight`."""
    return 1.0 + (scale - 1.0) * 0.5 * (1.0 - math.cos(math.pi * t)) if schedule == "cosine" else scale


def low_band(d: torch.Tensor) -> torch.Tensor:
    """The low spatial frequencies of `d` (..., H, W): FFT over H, W, kept where |f| <= min(H, W) // 5 in integer
    frequencies (FasterCache's radius; `diffusion.cache.low_high_split`'s low part)."""
    h, w = d.shape[-2:]
    r = min(h, w) // 5
    fy = torch.fft.fftfreq(h, device=d.device) * h
    fx = torch.fft.fftfreq(w, device=d.device) * w
    low = (fy[:, None] ** 2 + fx[None, :] ** 2) <= r * r
    return torch.fft.ifft2(torch.fft.fft2(d.float()) * low).real


def cached_sample(velocity: Velocity, latents: torch.Tensor, sigmas: Sequence[float], skip: Sequence[bool],
                  run_guidance: Sequence[bool], cfg_text: float = 1.0, cfg_audio: float = 1.0,
                  schedule: str = "constant") -> torch.Tensor:
    """Euler sampling from `latents` (noise) over `sigmas` with per-modality guidance
        v = v_none + w_text (v_text - v_none) + w_audio (v_full - v_text),
    where skip[i] (MagCache) runs no network pass at step i and run_guidance[i] False (CFG-cache) runs only
    v_full; both then use the guidance differences d_audio = v_full - v_text, d_text = v_text - v_none of the last
    step that ran every branch, their low band extrapolated linearly from the two last such steps. All False /
    all True (mode 'none') is the plain guided Euler sampler. Returns float32 latents, the input's shape."""
    steps = len(sigmas) - 1
    if len(skip) != steps or len(run_guidance) != steps or skip[0] or not run_guidance[0]:
        raise ValueError(f"{steps} steps need masks of {steps} (got {len(skip)}, {len(run_guidance)}) whose step 0 "
                         "runs every branch")
    guided = not (cfg_text == 1.0 and cfg_audio == 1.0)
    x = latents.float()
    v_full = d_a = d_t = None
    tr_a = tr_t = 0.0  # per-step change of d_a / d_t (low band), from the last two full steps
    k = 0  # the last step that ran every branch
    for i in range(steps):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        w_text, w_audio = guidance_weight(t, cfg_text, schedule), guidance_weight(t, cfg_audio, schedule)
        if not skip[i]:
            v_full = velocity(x, t, True, True)
        if not guided:
            v = v_full
        elif run_guidance[i] and not skip[i]:
            v_text = velocity(x, t, True, False)
            v_none = velocity(x, t, False, False) if cfg_text != 1.0 else v_text
            v = v_none + w_text * (v_text - v_none) + w_audio * (v_full - v_text)
            new_a, new_t = v_full - v_text, v_text - v_none
            if i > k:  # a second full step: the trend of each difference over the gap
                tr_a, tr_t = low_band(new_a - d_a) / (i - k), low_band(new_t - d_t) / (i - k)
            d_a, d_t, k = new_a, new_t, i
        else:  # cached differences, extrapolated (i - k) steps along their low-band trend
            v = v_full + (w_audio - 1.0) * (d_a + (i - k) * tr_a) + (w_text - 1.0) * (d_t + (i - k) * tr_t)
        x = x + (t - t_next) * v
    return x
