"""Scale planning without the pod: compile the real train step for a TPU topology on a CPU host.

    python -m mirage_jax.aot --config=configs/mirage_10b.py --topology=v5p-256 [--search ...]

- `plan`: compile one config for a topology; memory, FLOPs and predicted step time report; the CLI;
- `search`: the layout search (`--search`): every remat x sequence x batch point, the Pareto front;
- `layout`: `apply_layout`, the one function that lays a config out on a slice (search and configs use it);
- `flops`: XLA's FLOP count corrected for scanned loops and splash attention;
- `topology`: slice names -> libtpu's abstract devices; `collectives`: the compiled program's collectives;
- `chips`: HBM and bf16 peak per chip (import-light: `train.metrics` reads it for MFU).

This file imports nothing: `import mirage_jax.aot.chips` must stay cheap (no JAX).
"""
