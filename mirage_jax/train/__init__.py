"""The distributed training runtime: `python -m mirage_jax.train --config=... --workdir=...`.

Modules, one job each: `distributed` (multi-host init), `state` (sharded train state), `optim` (AdamW
schedule), `step` (the jitted update), `data` (synthetic / Grain batches -> global arrays), `checkpoint`
(Orbax manager, resume checks), `preemption`, `metrics`, `loop` (ties them together), `cli` (flags).
"""
