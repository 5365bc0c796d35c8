"""Models loaded once per worker process, whatever the runner calls `DoFn.setup` for; and the process's thread
budget for the libraries that size their own thread pools.

Beam's local runner calls `setup` once per DoFn instance; Beam's DaskRunner (2.77) deserializes the DoFn and
calls `setup`/`teardown` around every bundle (one Dask partition), so a model built in `setup` would be rebuilt
per bundle. `load_once(key, build)` keeps what `build()` returned for `key` in this process (at most `MAX_MODELS`
keys, least recently used dropped), so a DoFn's `setup` costs one load per worker process on every runner.

Only immutable, deterministic objects belong here (frozen encoders, detectors in inference mode), keyed by
everything that decides their output (e.g. a frozen IngestConfig, or (name, weights path, params)): the cache
never changes a result, only how often it is built. A worker with several threads shares one object between
them; the encoders here are safe for that (numpy, or torch modules in inference mode), and curation's face
detector (ingest.faces.cascade: OpenCV's CascadeClassifier, not safe for concurrent calls) is used under a lock.

Thread budget (`set_thread_budget`): OpenCV (Haar detection, colour conversion) and FFmpeg's decoder (through
PyAV) each start a thread per core unless told otherwise. In one process (the local runner) that is what we
want; in a Dask worker process with one task thread it is not: on a host running N such workers each would
run N library threads, and one worker alone already kept most of the host busy, so a second worker process
added little (`python -m bench.dask_tasks --workers=1`: 1 worker kept 1.32 of 2 cores busy; bench.curation:
2 workers were 1.12x of 1). Dask's own Nanny sets OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS to 1
for the same reason (`distributed.nanny.pre-spawn-environ`); the worker preload (data_pipeline.engine.dask_setup)
gives these two libraries the worker's share the same way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

MAX_MODELS = 4
_thread_budget: int | None = None  # None: each library's default (one thread per core)

_models: OrderedDict[Hashable, Any] = OrderedDict()
_lock = threading.Lock()


def load_once(key: Hashable, build: Callable[[], Any]) -> Any:
    """`build()`'s result for `key`, built at most once per process while it stays among the `MAX_MODELS` most
    recently used keys."""
    with _lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
    value = build()  # outside the lock: a slow load does not block other keys
    with _lock:
        value = _models.setdefault(key, value)
        _models.move_to_end(key)
        while len(_models) > MAX_MODELS:
            _models.popitem(last=False)
    return value


def loaded_keys() -> list[Hashable]:
    """The keys held in this process, least recently used first (for tests and diagnostics)."""
    with _lock:
        return list(_models)


def set_thread_budget(threads: int) -> None:
    """Caps the threads OpenCV and PyAV's FFmpeg decoders use in this process at `threads` (>= 1): a worker
    process's share of the host (a Dask worker's nthreads). Decoding and detection results do not depend on it."""
    global _thread_budget
    _thread_budget = max(1, int(threads))
    try:
        import cv2
    except ImportError:  # OpenCV is only needed by curation
        return
    cv2.setNumThreads(_thread_budget)


def thread_budget() -> int | None:
    """The cap set by `set_thread_budget`, or None (libraries choose: one thread per core)."""
    return _thread_budget
