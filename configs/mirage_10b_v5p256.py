"""The report's 10B MirageDiT on 4 s 720p clips, laid out for a v5p-256 slice (128 chips, 95 GiB each).

    python -m mirage_jax.aot --config=configs/mirage_10b_v5p256.py --topology=v5p-256
    python -m mirage_jax.train --config=configs/mirage_10b_v5p256.py --workdir=gs://...

Mesh fsdp=32 x sequence=4: one 75,956-token sample per 4 chips (Ulysses inside attention), global batch
32, full remat, no accumulation; weights, gradients and optimizer state are sharded over fsdp AND
sequence (all 128 chips). docs/scaling.md has the measured memory and the alternatives tried.
"""

from __future__ import annotations

import ml_collections

from configs.mirage_10b import apply_layout, params_sharded_over  # noqa: F401 (re-exported for v6e / 8 s)
from configs.mirage_10b import get_config as base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, ""):
        raise ValueError(f"configs/mirage_10b_v5p256.py: takes no argument, got {arg!r} (8 s clips: "
                         "configs/mirage_10b_8s_v5p512.py)")
    return apply_layout(base_config(), sequence=4, global_batch=32)
