"""`python -m mirage_jax.aot`: the scale-planning CLI (mirage_jax/aot/plan.py): compile the real train step for a
TPU topology on a CPU host and report memory, FLOPs and the predicted step time per device.

    python -m mirage_jax.aot --config=configs/mirage_10b.py --topology=v5p-256 [--config.mesh.ici.sequence=4] [--json]
    python -m mirage_jax.aot --config=... --topology=... --search [--search_remat=...]   # mirage_jax/aot/search.py

Exit status: 0 fits, 2 does not fit, 1 any error (a config, topology or layout that cannot be compiled).
"""

from mirage_jax.aot.plan import run_cli

if __name__ == "__main__":
    run_cli()
