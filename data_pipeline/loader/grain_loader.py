"""Streaming training batches from prepared ArrayRecord shards with Grain.

    ds = make_loader("data/prepared", global_batch_size=8, seed=0)      # or a glob of *.array_record
    it = iter(ds)                                                       # a grain DatasetIterator
    batch = next(it)            # dict of numpy arrays: this process's rows of the global batch
    state = it.get_state()      # JSON-able, the same on every process; it.set_state(state) resumes exactly

Pipeline: shards listed in manifest.json (size/sha256 checked) -> the elastic order of `data_pipeline.loader.order`:
global batch n = sample positions [n*B, (n+1)*B), position g -> record (global shuffle by index, reshuffled
every epoch) -> decode + random crop/pad of the time axis (seeded by g) -> this process's rows [start, stop)
of each global batch (batch = global_batch_size // process_count rows) -> optional worker processes (grain
mp_prefetch, whole batches in order) -> watchdog + epoch cap. The global batch at step n is a pure function of
(dataset fingerprint, seed, n, global batch size), whatever the process count. A corrupt record is skipped,
counted and replaced by the next position's record; past `corrupt_budget` skips the loader raises
`examples.CorruptRecordError` naming the shard and record index.

Modules: `shards` (which shards, verified; random access to records), `examples` (record -> cropped/padded
example), `order` (the elastic global order), this module (the Grain pipeline, iterator, checkpoint state).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from data_pipeline.loader import order as order_lib
from data_pipeline.loader.examples import DecodeCrop
from data_pipeline.loader.shards import ShardSet, ShardSource, resolve_shards
from mirage_base.lifetime import DieWithParent
from mirage_base.time_map import of_manifest

log = logging.getLogger(__name__)


class _Watchdog:
    """One daemon thread that warns (logging) while a batch is overdue."""

    def __init__(self, warn_s: float):
        self.warn_s, self.since, self.warned = warn_s, None, False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            time.sleep(min(self.warn_s / 4, 1.0))
            with self._lock:
                if self.since is not None and not self.warned and time.monotonic() - self.since > self.warn_s:
                    self.warned = True
                    log.warning(
                        "data loader: no batch for %.1f s (slow_batch_warn_s=%.1f); input-bound? raise "
                        "worker_count or check the storage",
                        time.monotonic() - self.since,
                        self.warn_s,
                    )

    def start(self) -> None:
        with self._lock:
            self.since, self.warned = time.monotonic(), False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="mirage-data-watchdog")
            self._thread.start()

    def stop(self) -> float:
        with self._lock:
            waited = time.monotonic() - (self.since or time.monotonic())
            self.since = None
        return waited


class LoaderIterator(grain.DatasetIterator):
    """Grain iterator with a slow-batch watchdog and an optional cap on the number of batches (epochs).

    With `dataset` (what `iter(LoaderDataset)` passes), its state is the elastic `order.DataPosition` and
    `set_state` rebuilds the pipeline at the saved position, under this loader's process layout.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        max_batches: int | None,
        slow_batch_warn_s: float,
        dataset: LoaderDataset | None = None,
    ):
        super().__init__(parent)
        self.max_batches, self.count = max_batches, 0
        self.watchdog = _Watchdog(slow_batch_warn_s) if slow_batch_warn_s > 0 else None
        self.last_wait_s = 0.0
        self.dataset, self.next_sample = dataset, 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.max_batches is not None and self.count >= self.max_batches:
            self.close()  # the last epoch is done: its worker processes and shared memory go now
            raise StopIteration
        if self.watchdog is not None:
            self.watchdog.start()
        try:
            batch = next(self._parent)
        finally:
            if self.watchdog is not None:
                self.last_wait_s = self.watchdog.stop()
        self.count += 1
        self.next_sample += self.dataset.global_batch_size if self.dataset is not None else 0
        return batch

    def close(self) -> None:
        """Stop the pipeline now: worker processes joined, their shared-memory batches and semaphores released
        (idempotent). Without it they are released only when the garbage collector reaches the iterator, which
        for a reference cycle can be interpreter shutdown: Python's resource_tracker then warns of leaked
        shared_memory / semaphore objects, and Grain's finalizers fail on torn-down modules."""
        if not self._closed:
            super().close()
        # drop the closed pipeline so that it is collected now, not at shutdown (Grain's thread-prefetch
        # iterator closes again from __del__ and fails once its modules are gone)
        self._parents = ()

    def position(self) -> order_lib.DataPosition:
        """The position of the next batch (the same on every process)."""
        if self.dataset is None:
            raise ValueError("this LoaderIterator was not made by make_loader; it has no data position")
        return dataclasses.replace(self.dataset.position, step=self.count, next_sample=self.next_sample)

    def get_state(self) -> dict[str, Any]:
        return self.position().to_json()

    def set_state(self, state: dict[str, Any]) -> None:
        if self.dataset is None:
            raise ValueError("this LoaderIterator was not made by make_loader; it cannot be positioned")
        saved = order_lib.DataPosition.from_json(state)
        if saved.global_batch_size != self.dataset.global_batch_size:
            log.warning(
                "global batch size %d -> %d since the checkpoint: continuing at the same sample offset %d "
                "(step %d)", saved.global_batch_size, self.dataset.global_batch_size, saved.next_sample, saved.step
            )
        step, sample = order_lib.resume_point(saved, self.dataset.position, self.dataset.allow_dataset_change)
        if saved.fingerprint != self.dataset.position.fingerprint:
            log.warning("data.allow_dataset_change: dataset %s (checkpoint) -> %s; continuing at sample %d",
                        saved.fingerprint, self.dataset.position.fingerprint, sample)
        self._parent.close()
        grain.DatasetIterator.__init__(self, self.dataset.build(step, sample).__iter__())
        self.count, self.next_sample = step, sample


class LoaderDataset(grain.IterDataset):
    """The loader's outer stage; `iter()` gives a LoaderIterator. `.shards`/`.manifest` describe the data,
    `.position` is the start (step 0) position, `.build(step, sample)` the pipeline from a position on."""

    def __init__(
        self,
        build: Callable[[int, int], grain.IterDataset],
        max_batches: int | None,
        slow_batch_warn_s: float,
        shards: ShardSet,
        per_process_batch: int,
        position: order_lib.DataPosition,
        allow_dataset_change: bool = False,
    ):
        super().__init__(build(0, 0))
        self.build, self.max_batches, self.slow_batch_warn_s = build, max_batches, slow_batch_warn_s
        self.shards, self.manifest, self.per_process_batch = shards, shards.manifest, per_process_batch
        self.position, self.allow_dataset_change = position, allow_dataset_change
        self.global_batch_size = position.global_batch_size

    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(self._parent.__iter__(), self.max_batches, self.slow_batch_warn_s, self)

    def __str__(self) -> str:
        return f"LoaderDataset(max_batches={self.max_batches})"


def _auto_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _ensure_absl_flags_parsed() -> None:
    """grain's mp_prefetch reads absl flags; parse defaults when the caller (e.g. pytest) never did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(
    source: str | list[str],
    *,
    global_batch_size: int,
    clip_frames: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    corrupt_budget: int = 8,
    slow_batch_warn_s: float = 30.0,
    verify: str = "auto",
    random_crop: bool = True,
    read_threads: int = 4,
    allow_dataset_change: bool = False,
) -> LoaderDataset:
    """Grain loader over prepared shards; `iter(result)` yields this process's batches (see module docstring).

    source: a prepare output directory, its manifest.json, a glob of its shards, or a list of these
        (local or gs:// via etils.epath). Only shards listed in manifest.json are read.
    global_batch_size: rows per step over all processes; each process gets global_batch_size // process_count.
    clip_frames: 25 fps frames per example (default: the frames the latents of the manifest's clip_frames cover,
        `time_map.covered_frames`); longer records are cropped at a random (seeded) offset on a latent boundary
        of the encoder's time map, shorter ones padded with video_mask/audio_mask False.
    seed: shuffle order (reshuffled every epoch) and crop offsets; global batch n is a function of (dataset
        fingerprint, seed, n, global_batch_size), not of the process count (data_pipeline.loader.order).
    shuffle: global shuffle of records; False reads them in shard order.
    num_epochs: None repeats forever; N stops after N * num_records // global_batch_size batches (every
        process yields the same number of batches, so multi-host loops stay in step).
    worker_count: grain mp_prefetch worker processes (0: in this process; -1: automatic, cores - 1 up to 8).
    prefetch: batches buffered per worker.
    process_index, process_count: this process reads rows [i * b, (i + 1) * b) of every global batch
        (b = global_batch_size // process_count); default jax.process_index() / jax.process_count().
    corrupt_budget: distinct corrupt records skipped (with a warning) per process (per worker) before
        CorruptRecordError names the shard and record. A skipped record is replaced by the record of the next
        sample position, the same whatever the process count.
    slow_batch_warn_s: log a warning when a batch takes longer than this (0: off).
    verify: how shards are checked against the manifest before reading: 'sha256', 'size', 'none', or 'auto'
        (default: sha256 on local disk, size on gs://; `verify_level`).
    random_crop: False always crops from frame 0.
    read_threads: grain read threads per process (worker); each reads whole batches.
    allow_dataset_change: `set_state` of a position saved on another dataset (fingerprint), seed or shuffle
        continues at the same sample offset instead of raising order.DataStateError.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
    per_process = global_batch_size // process_count
    shards = resolve_shards(source, verify)
    m = shards.manifest
    tm = of_manifest(m)
    clip_frames = int(tm.covered_frames(int(m["clip_frames"])) if clip_frames is None else clip_frames)
    if clip_frames <= 0 or tm.covered_frames(clip_frames) != clip_frames:
        raise ValueError(
            f"clip_frames={clip_frames} is not a whole clip of the video encoder's time map {tm.rule}: its "
            f"{tm.latent_count(clip_frames)} latent frames cover {tm.covered_frames(clip_frames)} frames; "
            "use that (mirage_base/time_map.py)"
        )
    src = ShardSource(shards.paths, shards.counts)
    decode = DecodeCrop(src, clip_frames, tm, corrupt_budget, random_crop)
    sample_order = order_lib.SampleOrder(len(src), seed, shuffle)
    rows = (process_index * per_process, (process_index + 1) * per_process)
    workers = _auto_workers() if worker_count < 0 else worker_count
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(read_threads, 2))

    def build(first_step: int, first_sample: int) -> grain.IterDataset:
        batches = order_lib.ProcessBatches(src.__getitem__, decode.random_map, sample_order, seed=seed,
                                           global_batch=global_batch_size, rows=rows, first_step=first_step,
                                           first_sample=first_sample)
        it = grain.MapDataset.source(batches)[0:].to_iter_dataset(options)  # [0:]: sliceable for workers
        if workers > 0:
            _ensure_absl_flags_parsed()
            it = it.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)),
                worker_init_fn=DieWithParent(),  # no worker outlives a kill -9 of this process (lifetime.py)
            )
        return it

    max_batches = None if num_epochs is None else (num_epochs * shards.num_records) // global_batch_size
    if max_batches == 0:
        raise ValueError(
            f"num_epochs={num_epochs} x {shards.num_records} records is less than one global batch of "
            f"{global_batch_size}"
        )
    position = order_lib.DataPosition(0, 0, int(seed), shards.fingerprint, global_batch_size, bool(shuffle))
    return LoaderDataset(build, max_batches, slow_batch_warn_s, shards, per_process, position, allow_dataset_change)
