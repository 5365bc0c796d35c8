"""The elastic order over a dataset of shape buckets (written by data_pipeline/buckets.py): one shape per global batch.

    ds = make_bucket_loader("prepared", batch_sizes={"1s_64x64": 8, "2s_64x64": 4}, seed=0)
    it = iter(ds); batch = next(it)       # this process's rows of global batch 0; batch["bucket"] = its index

Global batch n belongs to bucket `BucketSchedule.bucket(n)`: a pure function of (dataset fingerprint, seed, n)
(big_vision's FlexiViT draws its per-step static choice the same way: from a step-seeded generator), drawn with
probability proportional to N_b / B_b, the bucket's share of the steps of one epoch (N_b records, global batch
B_b). So every record is seen equally often whatever its shape: with batches from a token budget (B_b ~ 1 /
tokens per clip) this is each bucket's share of the data's tokens, with equal batches its share of the samples.
Every host computes the same bucket for step n, so all feed the same global shape (what jit needs).

Inside bucket b the order is `data_pipeline.loader.order`'s elastic order over the bucket's own records: its
k-th batch holds its sample positions [k B_b, (k + 1) B_b) (shuffled per epoch with the bucket's seed, crops
seeded by position), so a process reads only its rows, under any process count and mesh. The checkpointed
position (`BucketPosition`) is the global step, the seed, the dataset fingerprint and, per bucket, its own
step and next sample: a resume continues the same bucket sequence and, inside each bucket, the same samples;
a changed global batch of a bucket continues at its sample offset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline.dataset import manifest as mf
from data_pipeline.loader import order as order_lib
from data_pipeline.loader.examples import DecodeCrop
from data_pipeline.loader.shards import ShardSet, ShardSource, resolve_shards
from mirage_base.lifetime import DieWithParent
from mirage_base.time_map import of_manifest

ORDER = "buckets-v1"  # the `order` tag of BucketPosition.to_json()
CHUNK = 4096  # steps per generator draw of the schedule


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One bucket of a dataset: its manifest entry, and its verified shards."""

    name: str
    shards: ShardSet
    entry: dict[str, Any]

    @property
    def num_records(self) -> int:
        return self.shards.num_records

    @property
    def clip_frames(self) -> int:
        """25 fps frames of one example (the frames its latents cover)."""
        return int(self.entry["audio_frames"])


def read_buckets(source: str, verify: str = "auto") -> list[Bucket] | None:
    """The buckets of the dataset at `source` (its directory or manifest.json), shards verified at `verify`;
    None for a single-shape dataset."""
    top = mf.read_buckets_manifest(source)
    if top is None:
        return None
    d = os.path.dirname(source) if os.path.basename(source) == "manifest.json" else source
    return [Bucket(e["name"], resolve_shards(os.path.join(d, e["path"]), verify), e) for e in top["buckets"]]


def _seed_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()[:8], "little") >> 1


def fingerprint(buckets: Sequence[Bucket]) -> str:
    """'sha256:<16 hex>' over the buckets' names and shard fingerprints: another bucket list is another dataset."""
    return "sha256:" + hashlib.sha256(json.dumps([[b.name, b.shards.fingerprint] for b in buckets]).encode()
                                      ).hexdigest()[:16]


def schedule_for(buckets: Sequence[Bucket], batch_sizes: Sequence[int], seed: int) -> BucketSchedule:
    """The schedule of `buckets` at global batches `batch_sizes`: weights N_b / B_b (the bucket's share of the
    steps of one epoch), keyed by the buckets' `fingerprint`."""
    return BucketSchedule([b.num_records / gb for b, gb in zip(buckets, batch_sizes, strict=True)], seed,
                          fingerprint(buckets))


class BucketSchedule:
    """Global step -> bucket index: chunk c of CHUNK steps draws from numpy's generator seeded with
    (seed, fingerprint, c), so step n's bucket depends on (fingerprint, seed, n) only. Picklable."""

    def __init__(self, weights: Sequence[float], seed: int, fingerprint: str):
        w = np.asarray(weights, np.float64)
        if w.ndim != 1 or not len(w) or (w <= 0).any():
            raise ValueError(f"bucket weights {list(weights)} must be positive")
        self.weights, self.seed, self.fingerprint = tuple(float(x) for x in w), int(seed), str(fingerprint)
        self._cum = np.cumsum(w / w.sum())
        self._key = _seed_int(self.fingerprint)

    @property
    def probabilities(self) -> np.ndarray:
        return np.diff(np.concatenate([[0.0], self._cum]))

    def _chunk(self, c: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, self._key, c]).random(CHUNK)
        return np.minimum(np.searchsorted(self._cum, u, side="right"), len(self._cum) - 1).astype(np.int32)

    def buckets(self, start: int, stop: int) -> np.ndarray:
        """Buckets of global steps [start, stop)."""
        if stop <= start:
            return np.zeros(0, np.int32)
        c0, c1 = start // CHUNK, (stop - 1) // CHUNK
        seq = np.concatenate([self._chunk(c) for c in range(c0, c1 + 1)])
        return seq[start - c0 * CHUNK : stop - c0 * CHUNK]

    def bucket(self, n: int) -> int:
        return int(self.buckets(n, n + 1)[0])

    def __getstate__(self) -> dict[str, Any]:
        return {"weights": self.weights, "seed": self.seed, "fingerprint": self.fingerprint}

    def __setstate__(self, s: dict[str, Any]) -> None:
        self.__init__(s["weights"], s["seed"], s["fingerprint"])


@dataclasses.dataclass(frozen=True)
class BucketPosition:
    """Where a bucket loader stands: `step` global batches drawn; per bucket name, [its batches drawn, its next
    sample, its global batch size]. The same on every process."""

    step: int
    seed: int
    fingerprint: str
    buckets: dict[str, list[int]]
    shuffle: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"order": ORDER, "step": self.step, "seed": self.seed, "fingerprint": self.fingerprint,
                "shuffle": self.shuffle, "buckets": {k: list(v) for k, v in sorted(self.buckets.items())}}

    @classmethod
    def from_json(cls, state: Any) -> BucketPosition:
        if not isinstance(state, dict) or state.get("order") != ORDER:
            what = state.get("order") if isinstance(state, dict) else None
            raise order_lib.DataStateError(
                f"the checkpoint's data position (order {what!r}) was written for a dataset without shape buckets; "
                "this run's data.source has buckets. Point data.source at the dataset the run was trained on, or "
                "start a new --workdir")
        return cls(int(state["step"]), int(state["seed"]), str(state["fingerprint"]),
                   {k: [int(x) for x in v] for k, v in state["buckets"].items()}, bool(state.get("shuffle", True)))


class BucketBatches:
    """Random access to this process's rows of global batches first_step, first_step + 1, ...: item i is
    global batch n = first_step + i of bucket b = schedule.bucket(n), that bucket's batch number
    (its batches drawn at first_step) + (b's steps in [first_step, n)). Each item carries "bucket" (int32)."""

    def __init__(self, schedule: BucketSchedule, per_bucket: Sequence[order_lib.ProcessBatches], first_step: int):
        self.schedule, self.per_bucket, self.first_step = schedule, list(per_bucket), int(first_step)
        self._seq = np.zeros(0, np.int32)
        self._rank = np.zeros(0, np.int64)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(len(p) for p in self.per_bucket)

    def _extend(self, need: int) -> None:
        with self._lock:
            have = len(self._seq)
            if need <= have:
                return
            stop = max(need, 2 * have, CHUNK)
            new = self.schedule.buckets(self.first_step + have, self.first_step + stop)
            counts = np.bincount(self._seq, minlength=len(self.per_bucket))
            rank = np.empty(len(new), np.int64)
            for b in range(len(self.per_bucket)):
                where = np.nonzero(new == b)[0]
                rank[where] = counts[b] + np.arange(len(where))
            self._seq, self._rank = np.concatenate([self._seq, new]), np.concatenate([self._rank, rank])

    def locate(self, i: int) -> tuple[int, int]:
        """(bucket, that bucket's item index) of item i."""
        self._extend(int(i) + 1)
        return int(self._seq[i]), int(self._rank[i])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        b, j = self.locate(i)
        out = self.per_bucket[b][j]
        out["bucket"] = np.int32(b)
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "per_bucket": self.per_bucket, "first_step": self.first_step}

    def __setstate__(self, s: dict[str, Any]) -> None:
        self.__init__(s["schedule"], s["per_bucket"], s["first_step"])


class BucketIterator(grain.DatasetIterator):
    """This process's batches in order; `get_state()` / `set_state()` are the `BucketPosition` (JSON)."""

    def __init__(self, dataset: BucketLoaderDataset, position: BucketPosition):
        self.dataset, self.pos = dataset, position
        super().__init__(dataset.build(position).__iter__())

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        name = self.dataset.names[int(batch["bucket"])]
        k, s, gb = self.pos.buckets[name]
        self.pos = dataclasses.replace(self.pos, step=self.pos.step + 1,
                                       buckets={**self.pos.buckets, name: [k + 1, s + gb, gb]})
        return batch

    def close(self) -> None:
        """Stop the pipeline's worker processes now (as `grain_loader.LoaderIterator.close`)."""
        if not self._closed:
            super().close()
        self._parents = ()

    def get_state(self) -> dict[str, Any]:
        return self.pos.to_json()

    def set_state(self, state: dict[str, Any]) -> None:
        saved = BucketPosition.from_json(state)
        cur = self.dataset.start
        changed = [(f, getattr(saved, f), getattr(cur, f)) for f in ("fingerprint", "seed", "shuffle")
                   if getattr(saved, f) != getattr(cur, f)]
        if changed and not self.dataset.allow_dataset_change:
            what = "; ".join(f"{f} {a!r} in the checkpoint, {b!r} now" for f, a, b in changed)
            raise order_lib.DataStateError(
                f"the data order changed since the checkpoint ({what}; buckets then: {sorted(saved.buckets)}, now: "
                f"{list(self.dataset.names)}): resuming would not continue the same bucket and sample sequence. "
                "Point data.source at the dataset (and data.shuffle_seed at the seed) the run was trained on, or "
                "pass --config.data.allow_dataset_change=true to continue each bucket at its sample offset")
        per = {}
        for name, gb in zip(self.dataset.names, self.dataset.batch_sizes, strict=True):
            k, s, _ = saved.buckets.get(name, [0, 0, gb])
            per[name] = [k, s, gb]  # a changed batch size continues at the bucket's sample offset
        self.pos = BucketPosition(saved.step, cur.seed, cur.fingerprint, per, cur.shuffle)
        self._parent.close()
        grain.DatasetIterator.__init__(self, self.dataset.build(self.pos).__iter__())


class BucketLoaderDataset(grain.IterDataset):
    """`iter()` gives a BucketIterator from step 0; `.names`, `.batch_sizes`, `.buckets`, `.schedule`."""

    def __init__(self, buckets: Sequence[Bucket], batch_sizes: Sequence[int], *, seed: int, shuffle: bool,
                 process_index: int, process_count: int, worker_count: int, prefetch: int, corrupt_budget: int,
                 random_crop: bool, read_threads: int, allow_dataset_change: bool):
        self.buckets, self.names = list(buckets), tuple(b.name for b in buckets)
        self.batch_sizes = tuple(int(x) for x in batch_sizes)
        self.seed, self.shuffle, self.allow_dataset_change = int(seed), bool(shuffle), allow_dataset_change
        self.schedule = schedule_for(buckets, self.batch_sizes, self.seed)
        fp = self.schedule.fingerprint
        self.start = BucketPosition(0, self.seed, fp, {n: [0, 0, gb] for n, gb in zip(self.names, self.batch_sizes,
                                                                                        strict=True)}, self.shuffle)
        self._pi, self._pc = process_index, process_count
        self._workers, self._prefetch = worker_count, prefetch
        self._options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(read_threads, 2))
        self._parts = []
        for b in self.buckets:
            tm = of_manifest(b.shards.manifest)
            src = ShardSource(b.shards.paths, b.shards.counts)
            self._parts.append((src, DecodeCrop(src, b.clip_frames, tm, corrupt_budget, random_crop),
                                _seed_int(self.seed, b.name) % (1 << 31)))
        super().__init__(self.build(self.start))

    def build(self, pos: BucketPosition) -> grain.IterDataset:
        per = []
        for name, gb, (src, decode, seed) in zip(self.names, self.batch_sizes, self._parts, strict=True):
            k, s, _ = pos.buckets[name]
            rows = (self._pi * gb // self._pc, (self._pi + 1) * gb // self._pc)
            per.append(order_lib.ProcessBatches(src.__getitem__, decode.random_map,
                                                order_lib.SampleOrder(len(src), seed, self.shuffle), seed=seed,
                                                global_batch=gb, rows=rows, first_step=k, first_sample=s))
        it = grain.MapDataset.source(BucketBatches(self.schedule, per, pos.step))[0:].to_iter_dataset(self._options)
        if self._workers > 0:
            from data_pipeline.loader.grain_loader import _ensure_absl_flags_parsed

            _ensure_absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                             per_worker_buffer_size=max(self._prefetch, 1)),
                                worker_init_fn=DieWithParent())
        return it

    def __iter__(self) -> BucketIterator:
        return BucketIterator(self, self.start)

    def __str__(self) -> str:
        return f"BucketLoaderDataset({', '.join(self.names)})"


def make_bucket_loader(buckets: Sequence[Bucket], batch_sizes: Sequence[int], *, seed: int = 0, shuffle: bool = True,
                       process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
                       prefetch: int = 2, corrupt_budget: int = 8, random_crop: bool = True, read_threads: int = 4,
                       allow_dataset_change: bool = False) -> BucketLoaderDataset:
    """The loader over `buckets` (from `read_buckets`) with global batch `batch_sizes[i]` for bucket i (each
    divisible by the process count); see the module docstring. Arguments as `grain_loader.make_loader`'s."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    for b, gb in zip(buckets, batch_sizes, strict=True):
        if gb % process_count:
            raise ValueError(f"bucket {b.name}: global batch {gb} is not divisible by process_count={process_count}")
    return BucketLoaderDataset(buckets, batch_sizes, seed=seed, shuffle=shuffle, process_index=process_index,
                               process_count=process_count, worker_count=worker_count, prefetch=prefetch,
                               corrupt_budget=corrupt_budget, random_crop=random_crop, read_threads=read_threads,
                               allow_dataset_change=allow_dataset_change)
