"""The Grain loader over prepared ArrayRecord shards.

- `grain_loader`: `make_loader` (shards -> elastic order -> decode/crop -> batches, worker processes);
- `shards`: which shards a source names, checked against the manifest, and random access to records;
- `examples`: a record -> one training example (decode, crop/pad, corrupt-record budget);
- `order`: the elastic sample order and the loader's global position (`DataPosition`).

Importing this package imports no Grain; `data_pipeline.make_loader` is the lazy entry point.
"""
