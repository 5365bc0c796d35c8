"""The on-disk format that ingest writes and the loader (and mirage_jax) reads.

- `records`: one clip as an ArrayRecord record (encode/decode, `RecordError`);
- `manifest`: a prepared directory's manifest.json (shards with size/sha256, encoders, time map, stats).
"""
