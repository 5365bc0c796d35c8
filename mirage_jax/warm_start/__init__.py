"""Warm start from existing video-model weights (Mochi, diffusers layout)."""

from mirage_jax.warm_start.core import WarmStartError, derive_config, warm_start
from mirage_jax.warm_start.source import SourceError, TensorSource

__all__ = ["SourceError", "TensorSource", "WarmStartError", "derive_config", "warm_start"]
