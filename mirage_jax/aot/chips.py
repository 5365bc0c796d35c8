"""Accelerator facts, one table: per-chip HBM and dense bf16 peak of each TPU generation, and the peak of the
GPUs the benchmarks know, keyed by the `device_kind` JAX reports.

Read by `mirage_jax.aot.plan` (scale planning: HBM, predicted step time), `train.metrics` (MFU in the training
logs) and `bench.train_step` (MFU on a GPU). Sources: Google Cloud TPU system-architecture pages for v4, v5e,
v5p and v6e (Trillium), linked from docs/scaling.md; NVIDIA's H100/H200/A100 SXM datasheets (dense bf16,
no sparsity).
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation: per-chip HBM and bf16 peak, how its Cloud names count (cores or chips), and the
    `device_kind` strings JAX reports for it (one JAX device per chip: v4 in megacore mode, v5e/v5p/v6e)."""

    generation: str
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # dense bf16 per chip, FLOP/s
    cloud_units_per_chip: int  # v5p-256 = 256 TensorCores = 128 chips; v6e-256 = 256 chips
    torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e): the shape of a slice's topology name
    device_kinds: tuple[str, ...]  # jax.Device.device_kind values of this generation
    usable_hbm_bytes: int = 0  # what the TPU compiler lets a program use per chip (measured, libtpu 0.0.42.1)
    chip_config: str | None = None  # libtpu's chip_config_name; v4 needs "megacore" for one device per chip


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GiB, 275e12, 2, 3, ("TPU v4",), int(30.75 * GiB), chip_config="megacore"),
    "v5p": ChipSpec("v5p", 95 * GiB, 459e12, 2, 3, ("TPU v5p", "TPU v5"), int(95.74 * GiB)),
    "v5e": ChipSpec("v5e", 16 * GiB, 197e12, 1, 2, ("TPU v5 lite", "TPU v5e"), int(15.75 * GiB)),
    "v6e": ChipSpec("v6e", 32 * GiB, 918e12, 1, 2, ("TPU v6 lite", "TPU v6e"), int(31.25 * GiB)),
}

# Dense bf16 FLOP/s per GPU (one JAX device each), by device_kind.
GPU_PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
}

# device_kind -> dense bf16 FLOP/s of one JAX device (the TPU rows come from CHIPS).
PEAK_FLOPS: dict[str, float] = {
    **{kind: chip.peak_bf16_flops for chip in CHIPS.values() for kind in chip.device_kinds}, **GPU_PEAK_FLOPS,
}


def peak_flops(device_kind: str) -> float:
    """Dense bf16 FLOP/s of one JAX device of `device_kind` (e.g. "TPU v5 lite"); 0.0 when not in the table."""
    return PEAK_FLOPS.get(device_kind, 0.0)
