"""The two static cache masks of the sampler (plain Python: the JAX sampler, mirage_jax/diffusion/cache.py, and the
PyTorch export's loop, mirage_jax/export/cached_sampling.py, use the same ones; importing this imports no JAX).

    cfg_mask(steps)               which steps run every guidance branch (FasterCache's CFG-cache)
    mag_skip_mask(ratios, ...)    which steps skip the network (MagCache, from one calibration run's ratios)
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def cfg_mask(steps: int, warmup: float = 0.2, interval: int = 3) -> tuple[bool, ...]:
    """Steps that run every guidance branch: all of the first ceil(warmup * steps) (guidance is strongest and the
    differences move most at high noise), then one in `interval` (FasterCache's schedule)."""
    if steps < 1 or interval < 1 or not 0.0 <= warmup <= 1.0:
        raise ValueError(f"cfg_mask: steps {steps} >= 1, interval {interval} >= 1, 0 <= warmup {warmup} <= 1")
    w = max(1, math.ceil(warmup * steps))
    return tuple(i < w or (i - w) % interval == interval - 1 for i in range(steps))


def mag_skip_mask(ratios: Sequence[float], threshold: float = 0.06, max_skips: int = 2,
                  retention: float = 0.2) -> tuple[bool, ...]:
    """MagCache's static schedule from the per-step magnitude ratios of one calibration run: True = skip step i.

    ratios[i] = ||v_i|| / ||v_{i-1}|| (ratios[0] is unused). Walking the steps, the accumulated ratio
    prod gamma and error sum |1 - prod gamma| grow over consecutive candidate skips; step i is skipped while the
    error stays <= threshold and fewer than `max_skips` steps were skipped in a row, else it is computed and the
    accumulators reset. The first ceil(retention * steps) steps (and step 0) are always computed.
    """
    if threshold < 0 or max_skips < 0 or not 0.0 <= retention <= 1.0:
        raise ValueError(f"mag_skip_mask: threshold {threshold} >= 0, max_skips {max_skips} >= 0, "
                         f"0 <= retention {retention} <= 1")
    n = len(ratios)
    keep = max(1, math.ceil(retention * n))
    skip = [False] * n
    acc_ratio, acc_err, run = 1.0, 0.0, 0
    for i in range(keep, n):
        acc_ratio *= float(ratios[i])
        acc_err += abs(1.0 - acc_ratio)
        if acc_err <= threshold and run < max_skips:
            skip[i] = True
            run += 1
        else:
            acc_ratio, acc_err, run = 1.0, 0.0, 0
    return tuple(skip)
