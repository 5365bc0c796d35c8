"""Rehearsal tools: run the project's commands from the source tree to rehearse failures, never imported by
the library (mirage_base, data_pipeline, mirage_jax; tests/test_import_rules.py checks it).

    python -m tools.chaos --iterations=20 --seed=0      # `make chaos`: random kills of a 2-process job
    python -m tools.emulator --bucket=bkt               # a local GCS emulator (fake-gcs-server)
"""
