"""Adapter from `data_pipeline.loader.grain_loader.make_loader` (Grain over ArrayRecord shards) to the loop's
iterator interface: this process reads its rows of every global batch; the checkpointed data state is the
loader's global position (`data_pipeline.loader.order.DataPosition`: step, next sample, seed, dataset fingerprint,
global batch size), the same on every process, so a run resumes under any process count and mesh.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mirage_base.batch_keys import BATCH_KEYS
from mirage_jax.run_config import DataConfig, ShapesConfig
from mirage_jax.train.data import RowRange


class GrainSource:
    """Per-process numpy batches from the Grain loader; its state is the loader's position (JSON)."""

    def __init__(self, iterator: Any, extra_keys: tuple[str, ...] = ()):
        self.it, self.keys = iterator, (*BATCH_KEYS, *extra_keys)  # extra: the bucket loader's "bucket"

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.it)
        # copies: with worker processes Grain hands out arrays in shared memory, released when they are collected;
        # the loop's device arrays may alias their host memory (CPU) and live to interpreter shutdown, where
        # Python's resource_tracker then reports the blocks as leaked
        return {k: np.array(batch[k], copy=True) for k in self.keys if k in batch}

    def get_state(self) -> dict[str, Any]:
        return {"kind": "grain", "global": True, **self.it.get_state()}

    def close(self) -> None:
        """Stop the loader's worker processes and release their shared memory now (`LoaderIterator.close`)."""
        close = getattr(self.it, "close", None)
        if close is not None:
            close()

    def set_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("kind") != "grain":
            raise ValueError(f"data state {str(state)[:80]!r} was not written by the Grain loader; the "
                             "checkpoint was trained on another data.source")
        # older checkpoints nest a per-process Grain iterator state under "state"; the loader refuses it by name
        self.it.set_state(state.get("state", state) if "order" not in state else state)


def make(data: DataConfig, shapes: ShapesConfig, rows: RowRange) -> GrainSource:
    """Build the loader for `data.source` feeding `rows` of every global batch, clips of `shapes.audio_frames`."""
    try:
        from data_pipeline.loader.grain_loader import make_loader
    except ImportError as e:
        raise ImportError(f"data.source={data.source!r} needs data_pipeline.loader.grain_loader.make_loader ({e}); "
                          "use --config.data.source=synthetic or install the data pipeline") from e
    loader = make_loader(
        data.source,
        global_batch_size=rows.global_batch,
        clip_frames=shapes.audio_frames,  # 25 fps frames per example (one audio frame per video frame)
        seed=data.shuffle_seed,
        worker_count=data.worker_count,
        prefetch=data.prefetch,
        process_index=rows.index,
        process_count=rows.count,
        allow_dataset_change=data.allow_dataset_change,
        verify=data.verify,
    )
    return GrainSource(iter(loader))
