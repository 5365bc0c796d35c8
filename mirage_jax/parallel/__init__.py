"""Device meshes, logical-to-mesh sharding rules and the pre-compile checks of a parallel layout.

Kept import-free on purpose: the model imports `mirage_jax.parallel.sharding` and must not pull the
runtime in with it. Import the submodules (`mesh`, `rules`, `checks`) directly.
"""
