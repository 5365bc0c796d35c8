"""`dct`: a compact, frozen video "encoder" for CPU-scale training: JPEG's transform, kept low-pass.

Each f x f pixel block of each frame is converted to YCbCr and transformed with an orthonormal 2D DCT-II;
the first `luma` coefficients of Y and `chroma` of Cb and Cr in zig-zag order (lowest frequencies first) are
kept, scaled (DC by `dc_gain`/f, so it lies in [-2, 2]; AC by `ac_gain`/f: latent std ~0.2-0.7, near the unit
noise they are mixed with), as the latent channels. A 64 x 64 frame
becomes 8 x 8 x (luma + 2 chroma) latents (16 channels by default): about 12x fewer numbers than `s2d`,
the ratio a learned VAE gives (Mochi's: 8 x 8 x 3 px -> 12 channels), without weights to load.

Why it exists: a diffusion transformer must predict the noise of every latent number it is given. With
`s2d` (192 channels, 768 numbers per 2 x 2 patch) a 64-wide tiny model cannot even represent that noise, so
it cannot denoise. `dct` keeps the token no wider than the tiny model. `decode` is the exact inverse of the
kept coefficients (a low-pass image); `decode(encode(decode(z))) == z` up to float rounding.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import fft

from data_pipeline.encoders.base import EncoderSpec, check_params

VERSION = "1"
DEFAULTS = {"spatial_factor": 8, "luma": 10, "chroma": 3, "dc_gain": 2.0, "ac_gain": 8.0}
# ITU-R BT.601 full-range RGB -> YCbCr on [-1, 1] values (rows: Y, Cb, Cr), and its inverse
_RGB2YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC2RGB = np.linalg.inv(_RGB2YCC)


@functools.lru_cache(maxsize=8)
def zigzag(f: int) -> np.ndarray:
    """Flat indices of an f x f block in JPEG zig-zag order (low frequencies first)."""
    order = sorted(((i, j) for i in range(f) for j in range(f)),
                   key=lambda ij: (ij[0] + ij[1], ij[0] if (ij[0] + ij[1]) % 2 else ij[1]))
    return np.asarray([i * f + j for i, j in order])


class DCT:
    """[T, H, W, 3] uint8 (or float in [-1, 1]) -> [T, H/f, W/f, luma + 2 * chroma] float32, and back."""

    name = "dct"
    version = VERSION

    def __init__(self, **params: float):
        self.params = check_params("video", self.name, params, DEFAULTS)
        self.f = int(self.params["spatial_factor"])
        self.luma, self.chroma = int(self.params["luma"]), int(self.params["chroma"])
        if self.f < 1 or not 1 <= self.luma <= self.f * self.f or not 0 <= self.chroma <= self.f * self.f:
            raise ValueError(f"video encoder dct: spatial_factor={self.f}, luma={self.luma}, chroma={self.chroma}: "
                             "need f >= 1, 1 <= luma <= f*f and 0 <= chroma <= f*f")
        zz = zigzag(self.f)
        self.keep = [zz[: self.luma], zz[: self.chroma], zz[: self.chroma]]
        scale = np.full(self.f * self.f, float(self.params["ac_gain"]) / self.f)
        scale[0] = float(self.params["dc_gain"]) / self.f
        self.scale = scale

    spatial_factor = property(lambda self: self.f)
    temporal_factor = property(lambda self: 1)

    @property
    def channels(self) -> int:
        return self.luma + 2 * self.chroma

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self._check(height, width)
        return frames, height // self.f, width // self.f, self.channels

    def spec(self, height: int | None = None, width: int | None = None) -> EncoderSpec:
        h = None if height is None else height // self.f
        w = None if width is None else width // self.f
        return EncoderSpec(self.name, self.version, dict(self.params), "float32", (None, h, w, self.channels))

    def _check(self, height: int, width: int) -> None:
        if height % self.f or width % self.f:
            raise ValueError(f"video encoder dct: {height}x{width} frames do not divide by spatial_factor={self.f}; "
                             "resize the frames (--size=WxH) or change the factor")

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Pixels [T, H, W, 3] (uint8, or float in [-1, 1]) -> latents [T, H/f, W/f, channels] float32."""
        x = np.asarray(frames)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"video encoder dct: expected frames [T, H, W, 3], got shape {x.shape}")
        t, h, w, _ = x.shape
        self._check(h, w)
        x = x.astype(np.float64) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float64)
        f = self.f
        ycc = x @ _RGB2YCC.T
        blocks = ycc.reshape(t, h // f, f, w // f, f, 3).transpose(0, 1, 3, 5, 2, 4)  # t, bh, bw, c, f, f
        coef = fft.dctn(blocks, type=2, norm="ortho", axes=(-2, -1)).reshape(t, h // f, w // f, 3, f * f)
        coef = coef * self.scale
        out = [coef[..., c, idx] for c, idx in enumerate(self.keep)]
        return np.ascontiguousarray(np.concatenate(out, axis=-1), dtype=np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [T, h, w, channels] -> pixels [T, h*f, w*f, 3] float32 in [-1, 1] (dropped frequencies = 0)."""
        z = np.asarray(latents, np.float64)
        if z.ndim != 4 or z.shape[-1] != self.channels:
            raise ValueError(f"video encoder dct: expected latents [T, h, w, {self.channels}] (luma={self.luma}, "
                             f"chroma={self.chroma}); got shape {z.shape}")
        t, bh, bw, _ = z.shape
        f = self.f
        coef = np.zeros((t, bh, bw, 3, f * f))
        start = 0
        for c, idx in enumerate(self.keep):
            coef[..., c, idx] = z[..., start : start + len(idx)]
            start += len(idx)
        coef = (coef / self.scale).reshape(t, bh, bw, 3, f, f)
        blocks = fft.idctn(coef, type=2, norm="ortho", axes=(-2, -1))  # t, bh, bw, c, f, f
        ycc = blocks.transpose(0, 1, 4, 2, 5, 3).reshape(t, bh * f, bw * f, 3)
        return np.clip(ycc @ _YCC2RGB.T, -1.0, 1.0).astype(np.float32)

    @staticmethod
    def to_uint8(pixels: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
