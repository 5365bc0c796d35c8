"""The report's 10B MirageDiT on 4 s 720p clips, laid out for a v6e-256 slice (256 chips, 32 GiB each).

    python -m mirage_jax.aot --config=configs/mirage_10b_v6e256.py --topology=v6e-256

Mesh fsdp=64 x sequence=4: one 75,956-token sample per 4 chips, global batch 64, full remat, no
accumulation; state sharded over all 256 chips. docs/scaling.md has the measured memory.
"""

from __future__ import annotations

import ml_collections

from configs.mirage_10b import get_config as base_config
from configs.mirage_10b_v5p256 import apply_layout


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, ""):
        raise ValueError(f"configs/mirage_10b_v6e256.py: takes no argument, got {arg!r}")
    return apply_layout(base_config(), sequence=4, global_batch=64)
