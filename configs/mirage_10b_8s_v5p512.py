"""The report's 10B MirageDiT on 8 s 720p clips (`configs/mirage_10b.py:8s`: 148,056 tokens per sample),
laid out for a v5p-512 slice (256 chips, 95 GiB each).

    python -m mirage_jax.aot --config=configs/mirage_10b_8s_v5p512.py --topology=v5p-512

Mesh fsdp=64 x sequence=4: one sample per 4 chips, global batch 64, full remat, no accumulation; state
sharded over all 256 chips. docs/scaling.md has the measured memory.
"""

from __future__ import annotations

import ml_collections

from configs.mirage_10b import get_config as base_config
from configs.mirage_10b_v5p256 import apply_layout


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, ""):
        raise ValueError(f"configs/mirage_10b_8s_v5p512.py: takes no argument, got {arg!r}")
    return apply_layout(base_config("8s"), sequence=4, global_batch=64)
