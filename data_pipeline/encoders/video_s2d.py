"""`s2d`: an exact, invertible space-to-depth pixel "encoder" for video.

Pixels are scaled to [-1, 1] (uint8 v -> v / 127.5 - 1) and each f x f spatial block (and each group of
`temporal_factor` frames) is folded into channels, so a [T, H, W, 3] clip becomes
[T / tf, H / f, W / f, tf * f * f * 3]. `decode` undoes it exactly; `to_uint8(decode(encode(x))) == x`.
It stands in for a learned VAE (Mochi's is 6x8x8 with 12 channels) on CPU-sized experiments.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.encoders.base import EncoderSpec, check_params

VERSION = "1"
DEFAULTS = {"spatial_factor": 8, "temporal_factor": 1}


class SpaceToDepth:
    """[T, H, W, 3] uint8 (or float in [-1, 1]) <-> [T/tf, H/f, W/f, tf*f*f*3] float32."""

    name = "s2d"
    version = VERSION

    def __init__(self, **params: int):
        self.params = check_params("video", self.name, params, DEFAULTS)
        self.f = int(self.params["spatial_factor"])
        self.tf = int(self.params["temporal_factor"])
        if self.f < 1 or self.tf < 1:
            raise ValueError(
                f"video encoder s2d: spatial_factor={self.f} and temporal_factor={self.tf} must be >= 1"
            )

    @property
    def channels(self) -> int:
        return self.tf * self.f * self.f * 3

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of `encode` for a clip of `frames` x `height` x `width` pixels (all must divide evenly)."""
        self._check_divisible(frames, height, width)
        return frames // self.tf, height // self.f, width // self.f, self.channels

    def spec(self, height: int | None = None, width: int | None = None) -> EncoderSpec:
        h = None if height is None else height // self.f
        w = None if width is None else width // self.f
        return EncoderSpec(self.name, self.version, dict(self.params), "float32", (None, h, w, self.channels))

    def _check_divisible(self, frames: int, height: int, width: int) -> None:
        if frames % self.tf or height % self.f or width % self.f:
            raise ValueError(
                f"video encoder s2d: a {frames}x{height}x{width} (frames x height x width) clip does not "
                f"divide by temporal_factor={self.tf} and spatial_factor={self.f}; resize the frames "
                "(--size=WxH) or choose factors that divide them"
            )

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Pixels [T, H, W, 3] (uint8, or float already in [-1, 1]) -> latents [T/tf, H/f, W/f, c] float32."""
        x = np.asarray(frames)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"video encoder s2d: expected frames [T, H, W, 3], got shape {x.shape}")
        t, h, w, _ = x.shape
        self._check_divisible(t, h, w)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        else:
            x = x.astype(np.float32)
        f, tf = self.f, self.tf
        x = x.reshape(t // tf, tf, h // f, f, w // f, f, 3).transpose(0, 2, 4, 1, 3, 5, 6)
        return np.ascontiguousarray(x.reshape(t // tf, h // f, w // f, self.channels))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [T', h, w, c] -> pixels [T' * tf, h * f, w * f, 3] float32 in [-1, 1] (exact inverse)."""
        z = np.asarray(latents, dtype=np.float32)
        if z.ndim != 4 or z.shape[-1] != self.channels:
            raise ValueError(
                f"video encoder s2d: expected latents [T, h, w, {self.channels}] for spatial_factor="
                f"{self.f}, temporal_factor={self.tf}; got shape {z.shape}"
            )
        t, h, w, _ = z.shape
        f, tf = self.f, self.tf
        x = z.reshape(t, h, w, tf, f, f, 3).transpose(0, 3, 1, 4, 2, 5, 6)
        return np.ascontiguousarray(x.reshape(t * tf, h * f, w * f, 3))

    @staticmethod
    def to_uint8(pixels: np.ndarray) -> np.ndarray:
        """Pixels in [-1, 1] -> uint8 (rounded, clipped); exact for the output of `decode(encode(uint8))`."""
        return np.clip(np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
