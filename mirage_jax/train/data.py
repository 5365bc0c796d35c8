"""Per-process batches -> global, sharded `jax.Array` batches.

Two sources share one iterator interface (`next(it)` -> dict of numpy arrays for THIS process's rows,
`get_state()` / `set_state()` for checkpoints):
- `SyntheticSource` (`data.source='synthetic'`): random arrays of the model's shapes, a pure function
  of (seed, step, global row index), so any process layout sees the same global batch and a resume is
  bitwise; its state is the step.
- the Grain loader of `data_pipeline.loader.grain_loader` over prepared ArrayRecord shards (any other source).
Which rows a process loads follows from the batch sharding (`process_rows`), not from the process index,
so meshes that replicate the batch across processes still get consistent data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mirage_jax.run_config import RunConfig


class BatchIterator(Protocol):
    """What the loop needs from a data source."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


def close_source(source: Any) -> None:
    """`source.close()` when it has one (a source of an older protocol, e.g. a test's wrapper, may not): Grain's
    worker processes stop and their shared memory is released now, not at interpreter shutdown."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


@dataclasses.dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of the global batch that this process feeds; `index`/`count` as loader shards."""

    start: int
    stop: int
    global_batch: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def index(self) -> int:
        return self.start // self.size

    @property
    def count(self) -> int:
        return self.global_batch // self.size


def process_rows(mesh: Mesh, batch_axes: Any, global_batch: int) -> RowRange:
    """The contiguous rows of the global batch held by this process's devices under the batch sharding."""
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
    slices = [idx[0] for idx in sharding.addressable_devices_indices_map((global_batch,)).values()]
    starts = [s.start or 0 for s in slices]
    stops = [global_batch if s.stop is None else s.stop for s in slices]
    start, stop = min(starts), max(stops)
    covered = set()
    for a, b in zip(starts, stops, strict=True):
        covered.update(range(a, b))
    if len(covered) != stop - start or global_batch % (stop - start):
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {sorted(covered)}; "
                         "use a mesh whose batch axes (data, fsdp) keep each process's devices together")
    return RowRange(start, stop, global_batch)


def batch_shapes(run: RunConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-sample shape and dtype of every batch key, from `run.shapes` and `run.model`."""
    s, m = run.shapes, run.model
    t, h, w = s.latent_frames, s.latent_height, s.latent_width
    a, lt, r = s.audio_frames, s.text_len, s.ref_frames
    c = m.latent_channels
    return {
        "video": ((t, h, w, c), np.float32), "video_mask": ((t,), np.bool_),
        "audio": ((a, m.audio_feature_dim), np.float32), "audio_mask": ((a,), np.bool_),
        "text": ((lt, m.text_embed_dim), np.float32), "text_mask": ((lt,), np.bool_),
        "ref": ((r, h, w, c), np.float32), "ref_time": ((), np.float32), "ref_mask": ((), np.bool_),
    }


class SyntheticSource(Iterator[dict[str, np.ndarray]]):
    """Deterministic random batches: row i of step n depends only on (seed, n, i)."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], Any]], rows: RowRange, seed: int, step: int = 0):
        self.shapes, self.rows, self.seed, self.step = shapes, rows, seed, step

    def _row(self, step: int, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, i])
        out: dict[str, np.ndarray] = {}
        for k, (shape, dtype) in self.shapes.items():
            if dtype == np.float32:
                out[k] = rng.standard_normal(shape, dtype=np.float32)
            else:
                out[k] = np.ones(shape, np.bool_)
        lt = self.shapes["text_mask"][0][0]
        out["text_mask"][int(rng.integers(1, lt + 1)):] = False  # variable caption length
        out["ref_time"] = np.float32(rng.uniform(-10.0, 10.0))
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row(self.step, i) for i in range(self.rows.start, self.rows.stop)]
        self.step += 1
        return {k: np.stack([r[k] for r in rows]) for k in self.shapes}

    def get_state(self) -> dict[str, Any]:
        return {"kind": "synthetic", "step": self.step, "global": True}

    def close(self) -> None:
        """Nothing to release (the protocol's close, for the Grain source's workers)."""

    def set_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("kind") != "synthetic":
            raise ValueError(f"data state {state!r} was not written by the synthetic source; the checkpoint "
                             "was trained on another data.source")
        self.step = int(state["step"])


def make_source(run: RunConfig, rows: RowRange, start_step: int) -> BatchIterator:
    """The iterator `run.data.source` names, positioned at `start_step` for the synthetic source (wrapped in a
    `RowHashLog` when `data.row_hash_log` is set)."""
    if run.data.source == "synthetic":
        source: BatchIterator = SyntheticSource(batch_shapes(run), rows, run.train.seed + 1, start_step)
    else:
        from mirage_jax.train import grain_source

        source = grain_source.make(run.data, run.shapes, rows)
    prefix = run.data.row_hash_log
    return RowHashLog(source, rows, f"{prefix}.p{jax.process_index()}.jsonl") if prefix else source


def row_digest(batch: dict[str, np.ndarray], i: int) -> str:
    """sha256 (hex) of row i of a batch: every key in sorted order, with its dtype, shape and bytes."""
    h = hashlib.sha256()
    for k in sorted(batch):
        if np.ndim(batch[k]) == 0:  # a per-batch label (the shape bucket's index), not a row
            continue
        x = np.ascontiguousarray(np.asarray(batch[k])[i])
        h.update(f"{k}:{x.dtype.str}:{x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


class RowHashLog:
    """Wraps a source; appends `{"step": n, "start": r0, "sha256": [per row]}` for every batch it hands out, so
    runs under different process layouts can be compared batch by batch, bit for bit (`row_digest`)."""

    def __init__(self, source: BatchIterator, rows: RowRange, path: str):
        self.source, self.rows, self.path = source, rows, path

    def __next__(self) -> dict[str, np.ndarray]:
        step = int(self.source.get_state()["step"])
        batch = next(self.source)
        n = len(batch["video"])  # this process's rows (a shape bucket's batch may differ from `rows`)
        line = {"step": step, "start": self.rows.index * n, "sha256": [row_digest(batch, i) for i in range(n)]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return batch

    def close(self) -> None:
        close_source(self.source)

    def get_state(self) -> Any:
        return self.source.get_state()

    def set_state(self, state: Any) -> None:
        self.source.set_state(state)


def to_global(local: dict[str, np.ndarray], shardings: dict[str, NamedSharding],
              global_batch: int) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays (`jax.make_array_from_process_local_data`)."""
    out = {}
    for k, sharding in shardings.items():
        if k not in local:
            raise KeyError(f"the data source gave no {k!r}; expected keys {sorted(shardings)}")
        x = np.asarray(local[k])
        out[k] = jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:]))
    return out


def batch_shardings(mesh: Mesh, batch_axes: Any,
                    shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, NamedSharding]:
    """Every batch key sharded on its leading (batch) dimension, replicated elsewhere."""
    return {k: NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * len(shape))))
            for k, (shape, _) in shapes.items()}
