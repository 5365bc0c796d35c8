"""The elastic sample order: global batch n is a pure function of (dataset fingerprint, seed, n, global batch).

    position = DataPosition(step=0, next_sample=0, seed=0, fingerprint=..., global_batch_size=8, shuffle=True)
    batches = ProcessBatches(source, decode, SampleOrder(num_records, seed, shuffle), seed=0,
                             global_batch=8, rows=(2, 4), first_step=0, first_sample=0)
    batches[i]     # rows [2, 4) of global batch first_step + i, as a dict of stacked numpy arrays

Global sample position g (0, 1, 2, ... over the whole run) names one example:
- record: `SampleOrder(g)` = Grain's index shuffle (`MapDataset.range(N).shuffle(seed).repeat()`): epoch
  e = g // N is a permutation of the N records seeded with seed + e, so epochs differ and every record
  appears once per epoch; computed per index (Feistel rounds), nothing is materialised.
- crop offset: `numpy.random.default_rng([seed, g])`, so it follows the position, not the process reading it.
- a corrupt record at g is replaced by the record of position g + 1 (then g + 2, ...) of the same order,
  cropped with g's generator: the replacement depends on the data only, never on the process layout.
Global batch n with global batch size B holds positions [n*B, (n+1)*B); its row r is position n*B + r, and a
process reads only its rows [start, stop). When B changes on resume, the run continues at the same sample
offset: the first batch after the change starts at the saved `next_sample` (see `resume_point`).

The checkpointed position (`DataPosition`) is (step, next sample, seed, dataset fingerprint, global batch
size, shuffle) and is the same on every process, so it restores under any process count and mesh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from mirage_base.errors import ExitCode, MirageError

ORDER = "elastic-v1"  # the `order` tag of DataPosition.to_json(); older loader states have none


class DataStateError(MirageError, ValueError):
    """A saved data position that this run cannot continue from; the message says why and what to do."""

    exit_code, label = ExitCode.REFUSED, "RESUME REFUSED"


def dataset_fingerprint(names: Sequence[str], counts: Sequence[int], digests: Sequence[str]) -> str:
    """'sha256:<16 hex>' over the shard file names (not their directory: a copy to gs:// keeps it), record
    counts and manifest sha256 digests, in the loader's order. Re-prepared data or added shards change it."""
    rows = [[os.path.basename(n), int(c), str(d)] for n, c, d in zip(names, counts, digests, strict=True)]
    return "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


class SampleOrder:
    """Global sample position -> record index in [0, num_records). Picklable (worker processes)."""

    def __init__(self, num_records: int, seed: int, shuffle: bool = True):
        self.num_records, self.seed, self.shuffle = int(num_records), int(seed), bool(shuffle)
        self._ds: Any = None

    def __call__(self, g: int) -> int:
        if not self.shuffle:
            return int(g) % self.num_records
        if self._ds is None:
            self._ds = grain.MapDataset.range(self.num_records).shuffle(seed=self.seed).repeat()
        return int(self._ds[int(g)]) % self.num_records

    def __getstate__(self) -> dict[str, Any]:
        return {"num_records": self.num_records, "seed": self.seed, "shuffle": self.shuffle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["num_records"], state["seed"], state["shuffle"])


class ProcessBatches:
    """Random-access source of this process's rows of every global batch (a Grain data source).

    Item i = rows [start, stop) of global batch `first_step + i`, i.e. examples at positions
    first_sample + i * global_batch + r for r in [start, stop), stacked per key (leading dim stop - start).
    `read(i)` -> (bytes or None, error text) reads record i; `decode(element, rng)` -> example dict or None
    (None: corrupt, already counted against the budget by `decode`).
    """

    def __init__(
        self,
        read: Callable[[int], Any],
        decode: Callable[[Any, np.random.Generator], dict[str, Any] | None],
        order: SampleOrder,
        *,
        seed: int,
        global_batch: int,
        rows: tuple[int, int],
        first_step: int = 0,
        first_sample: int = 0,
    ):
        self.read, self.decode, self.order, self.seed = read, decode, order, int(seed)
        self.global_batch, self.rows = int(global_batch), (int(rows[0]), int(rows[1]))
        self.first_step, self.first_sample = int(first_step), int(first_sample)

    def __len__(self) -> int:
        return (sys.maxsize // 2 - self.first_sample) // self.global_batch

    def position(self, i: int, r: int) -> int:
        """Global sample position of row r (of the global batch) in item i."""
        return self.first_sample + int(i) * self.global_batch + r

    def example(self, g: int) -> dict[str, Any]:
        """The example at global position g (a corrupt record replaced by the next readable position's)."""
        for k in range(self.order.num_records):
            ex = self.decode(self.read(self.order(g + k)), np.random.default_rng([self.seed, g]))
            if ex is not None:
                return ex
        raise RuntimeError(f"no readable record among all {self.order.num_records} records of the dataset")

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rows = [self.example(self.position(i, r)) for r in range(*self.rows)]
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the loader stands: `step` global batches drawn, the next one starting at sample `next_sample`."""

    step: int
    next_sample: int
    seed: int
    fingerprint: str
    global_batch_size: int
    shuffle: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"order": ORDER, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, state: Any) -> DataPosition:
        """Parse a saved state; an older per-process Grain iterator state is refused, saying why."""
        if isinstance(state, dict) and "grain" in state and "order" not in state:
            raise DataStateError(
                "the checkpoint holds a per-process Grain iterator state (written by a loader before the "
                f"{ORDER} order: {state.get('batches', '?')} batches drawn); it cannot be re-split nor mapped onto "
                "the elastic order. Resume it with the mirage_jax version that wrote it, or start a new --workdir"
            )
        if not isinstance(state, dict) or state.get("order") != ORDER:
            raise DataStateError(f"data state {str(state)[:120]!r} was not written by data_pipeline.loader "
                                 f"(no order={ORDER!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(state) - {"shuffle"})
        if missing:
            raise DataStateError(f"data state {str(state)[:120]!r} lacks {missing}")
        return cls(**{k: v for k, v in state.items() if k in fields})


def resume_point(saved: DataPosition, current: DataPosition, allow_dataset_change: bool = False) -> tuple[int, int]:
    """(step, next sample) to continue at when a loader set up as `current` resumes `saved`.

    - global batch size changed: continue at the same sample offset (the saved `next_sample`); the step
      counter continues too, so batch saved.step holds samples [next_sample, next_sample + new batch).
    - dataset fingerprint, seed or shuffle changed: DataStateError naming both values, unless
      `allow_dataset_change`; then the saved step and sample offset are kept over the new order.
    """
    changed = [(name, getattr(saved, name), getattr(current, name)) for name in ("fingerprint", "seed", "shuffle")
               if getattr(saved, name) != getattr(current, name)]
    if changed and not allow_dataset_change:
        what = "; ".join(f"{name} {a!r} in the checkpoint, {b!r} now" for name, a, b in changed)
        raise DataStateError(
            f"the data order changed since the checkpoint ({what}): resuming would not continue the same "
            "sample sequence. Point data.source at the dataset (and data.shuffle_seed at the seed) the run was "
            "trained on, or pass --config.data.allow_dataset_change=true to continue at the same sample offset "
            "in the new order"
        )
    return saved.step, saved.next_sample
