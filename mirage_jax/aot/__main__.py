"""`python -m mirage_jax.aot`: the scale-planning CLI (mirage_jax/aot/plan.py)."""

from mirage_jax.aot.plan import run_cli

if __name__ == "__main__":
    run_cli()
