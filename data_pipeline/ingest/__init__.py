"""Ingest: one source video -> training clips (decode, geometry, quality filters, encoders, records).

- `per_source`: `IngestConfig` and `ingest_source` (one source file -> its clip records), `list_sources`;
- `sources`: vetting the listed sources (unique clip ids, sidecars, one frame shape); `media`: PyAV
  decode/encode, FPS and sample rate (synthetic writes its clips with it too); `clips`: cutting a source into
  clips and the reference frame; `geometry`: crop/scale policy; `filters`: quality filters by name;
- `tfio_backend` / `tfio_worker`: the tensorflow-io audio backend, the worker run by path in its own venv.

The Beam pipeline that runs it over many sources is `python -m data_pipeline.prepare` (data_pipeline/prepare.py).
"""
