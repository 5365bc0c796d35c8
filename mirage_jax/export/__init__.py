"""Export for PyTorch serving. `MirageTransformer` is pure PyTorch: importing it does not import JAX.

    from mirage_jax.export import MirageTransformer
    model = MirageTransformer.from_pretrained("exports/m10b")
"""

from mirage_jax.export.torch_model import MirageTransformer, MirageTransformerOutput

__all__ = ["MirageTransformer", "MirageTransformerOutput"]
