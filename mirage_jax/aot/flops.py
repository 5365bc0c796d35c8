"""FLOPs of the train step for scale planning: the analytic count of `mirage_jax.describe` split the way
XLA's cost analysis sees it, and XLA's compiled count corrected for what it misses.

Why compiled FLOPs need a correction: XLA's cost analysis counts a while-loop body ONCE (the scanned
layers, and the gradient-accumulation scan), and sees nothing inside custom kernels (Pallas splash
attention). `correct_compiled_flops` scales the loop bodies by their trip counts and adds the kernel's
executed attention matmuls; `mirage_jax.aot.plan` reports the raw number as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mirage_jax.config import ModelConfig

# Splash attention's executed matmuls in units of the forward's two (QK^T, PV): the backward runs a dq
# kernel (QK^T, dO V^T, dS K) and a dkv kernel (QK^T, dO V^T, P^T dO, dS^T Q) = 7 matmuls = 3.5 forwards;
# the fused backward kernel (`model.splash_fused_bwd`) computes P and dS once for all three gradients:
# QK^T, dO V^T, P^T dO, dS^T Q, dS K = 5 matmuls = 2.5 forwards (jax's splash_attention_kernel.py,
# `_flash_attention_dkv_kernel`).
SPLASH_BWD_PER_FWD = 3.5
SPLASH_FUSED_BWD_PER_FWD = 2.5


@dataclasses.dataclass(frozen=True)
class FlopParts:
    """Forward FLOPs per sample, split the way XLA's cost analysis sees them (all from describe)."""

    total: int  # describe.forward_flops
    per_scanned_layer: int  # one of the num_layers - 1 scanned blocks (attention core included)
    attention_core_per_layer: int  # QK^T and AV of one block (4 S^2 H D)
    scanned_layers: int


def flop_parts(mcfg: ModelConfig, shapes: Mapping[str, int]) -> FlopParts:
    """Split `describe.forward_flops` into one scanned layer and the rest by differencing over num_layers,
    so the split cannot drift from describe's formula."""
    from mirage_jax.describe import count_tokens, forward_flops

    total = forward_flops(mcfg, shapes)
    scanned = mcfg.num_layers - 1 if mcfg.scan_layers else 0
    per_layer = total - forward_flops(dataclasses.replace(mcfg, num_layers=mcfg.num_layers - 1), shapes) \
        if mcfg.num_layers >= 2 else 0
    attn = 4 * count_tokens(mcfg, shapes)["total"] ** 2 * mcfg.attn_dim
    return FlopParts(total=total, per_scanned_layer=per_layer, attention_core_per_layer=attn, scanned_layers=scanned)


def correct_compiled_flops(raw_total: float, parts: FlopParts, *, global_batch: int, grad_accum: int,
                           num_layers: int, splash: bool, remat: bool, padded_tokens: int, attn_dim: int,
                           fused_bwd: bool = False) -> float:
    """XLA's count with loop bodies scaled by their trip counts and custom-kernel attention added.

    XLA counts one scanned layer and one micro-batch. Of what it counts, the share of one scanned layer is
    taken from the analytic split (same fwd/bwd/remat multipliers assumed for every part), so
    corrected = raw * grad_accum * (rest + L_s * layer) / (rest + layer). With splash the kernel's matmuls
    are invisible to XLA: they are added as executed (forward, a remat re-forward when `remat` -- i.e. the
    policy does not save the kernel's named residuals, `model.dit.recomputes_attention` -- and 3.5 forwards
    of backward, 2.5 with the fused backward kernel when `fused_bwd`) at the kernel's padded length.
    """
    visible_layer = parts.per_scanned_layer - (parts.attention_core_per_layer if splash else 0)
    visible_total = parts.total - num_layers * (parts.attention_core_per_layer if splash else 0)
    rest = visible_total - parts.scanned_layers * visible_layer
    counted = rest + (visible_layer if parts.scanned_layers else 0)
    corrected = raw_total * grad_accum * (visible_total / counted if counted > 0 else 1.0)
    if splash:
        per_sample = 4 * padded_tokens**2 * attn_dim * num_layers
        bwd = SPLASH_FUSED_BWD_PER_FWD if fused_bwd else SPLASH_BWD_PER_FWD
        corrected += global_batch * per_sample * (1.0 + bwd + (1.0 if remat else 0.0))
    return corrected


def compiled_cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled executable as one dict ("flops", "bytes accessed", ...)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    return dict(ca or {})
