"""Models loaded once per worker process, whatever the runner calls `DoFn.setup` for.

Beam's local runner calls `setup` once per DoFn instance; Beam's DaskRunner (2.77) deserializes the DoFn and
calls `setup`/`teardown` around every bundle (one Dask partition), so a model built in `setup` would be rebuilt
per bundle. `load_once(key, build)` keeps what `build()` returned for `key` in this process (at most `MAX_MODELS`
keys, least recently used dropped), so a DoFn's `setup` costs one load per worker process on every runner.

Only immutable, deterministic objects belong here (frozen encoders, detectors in inference mode), keyed by
everything that decides their output (e.g. a frozen IngestConfig, or (name, weights path, params)): the cache
never changes a result, only how often it is built. A worker with several threads shares one object between
them; the encoders here are safe for that (numpy, or torch modules in inference mode), and curation's face
detector (ingest.faces.cascade: OpenCV's CascadeClassifier, not safe for concurrent calls) is used under a lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

MAX_MODELS = 4

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
