"""mirage_jax's A-roll data pipeline: synthetic talking heads, Beam ingest to ArrayRecord, Grain loader.

    python -m data_pipeline.synthesize --out=raw --clips=8 --seconds=3 --seed=0
    python -m data_pipeline.prepare --input=raw --output=prepared
    from data_pipeline import make_loader, encoders

Subpackages by job: `synthetic` (talking heads, speech), `ingest` (one source -> clip records), `dataset`
(the on-disk format: records, manifest), `loader` (Grain over the shards), `encoders` (frozen encoders).
The two commands live at the root (`prepare`, with its flags in `prepare_flags` and its shape buckets in
`buckets`; `synthesize`). It never
imports mirage_jax (data flows one way); the base both share is `mirage_base`. See docs/data_pipeline.md.
"""

from __future__ import annotations

import logging
from typing import Any


class _NoBigQueryNotice(logging.Filter):
    """Drops Beam's import-time warning that its BigQuery client libraries (apitools) are missing: the pipeline
    reads no BigQuery, and the line, once per process (the driver and every Dask worker), only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found, and bigquery client libraries")


logging.getLogger().addFilter(_NoBigQueryNotice())  # before any submodule imports apache_beam


def make_loader(*args: Any, **kwargs: Any) -> Any:
    """`data_pipeline.loader.grain_loader.make_loader` (imported lazily: Grain is only needed when loading)."""
    from data_pipeline.loader.grain_loader import make_loader as _make_loader

    return _make_loader(*args, **kwargs)


__all__ = ["make_loader"]
