"""Adapter from `data_pipeline.loader.make_loader` (Grain over ArrayRecord shards) to the loop's
iterator interface. UNTESTED until data_pipeline lands: the keyword names below are matched against the
loader's signature at runtime, and anything it does not take is left out.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from mirage_jax.train.data import BATCH_KEYS, RowRange


class GrainSource:
    """Per-process numpy batches from the Grain loader; its state is the Grain iterator state (JSON)."""

    def __init__(self, iterator: Any):
        self.it = iterator

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.it)
        return {k: np.asarray(batch[k]) for k in BATCH_KEYS if k in batch}

    def get_state(self) -> Any:
        return {"kind": "grain", "state": self.it.get_state()}

    def set_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("kind") != "grain":
            raise ValueError(f"data state {str(state)[:80]!r} was not written by the Grain loader; the "
                             "checkpoint was trained on another data.source")
        self.it.set_state(state["state"])


def make(cfg: Any, rows: RowRange) -> GrainSource:
    """Build the loader for `cfg.data.source` feeding `rows` of every global batch."""
    try:
        from data_pipeline.loader import make_loader
    except ImportError as e:
        raise ImportError(f"data.source={cfg.data.source!r} needs data_pipeline.loader.make_loader ({e}); "
                          "use --config.data.source=synthetic or install the data pipeline") from e
    offered = {
        "source": cfg.data.source, "paths": cfg.data.source, "pattern": cfg.data.source,
        "batch_size": rows.size, "per_process_batch_size": rows.size, "global_batch_size": rows.global_batch,
        "shard_index": rows.index, "shard_count": rows.count, "process_index": rows.index,
        "process_count": rows.count, "seed": int(cfg.data.shuffle_seed), "worker_count": int(cfg.data.worker_count),
        "prefetch": int(cfg.data.prefetch),
    }
    params = inspect.signature(make_loader).parameters
    kwargs = {k: v for k, v in offered.items() if k in params}
    loader = make_loader(**kwargs)
    return GrainSource(iter(loader))
