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

from typing import Any


def make_loader(*args: Any, **kwargs: Any) -> Any:
    """`data_pipeline.loader.grain_loader.make_loader` (imported lazily: Grain is only needed when loading)."""
    from data_pipeline.loader.grain_loader import make_loader as _make_loader

    return _make_loader(*args, **kwargs)


__all__ = ["make_loader"]
