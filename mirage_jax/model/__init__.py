"""MirageDiT and its parts."""

from mirage_jax.model.dit import MirageBlock, MirageDiT

__all__ = ["MirageBlock", "MirageDiT"]
