"""`logmel`: log-mel features at the video frame rate, exactly one vector per 25 fps frame.

Frame i of a clip covers samples [i * hop, (i + 1) * hop) with hop = sample_rate / fps (640 at 16 kHz and
25 fps); its feature is the mel power spectrum of an `n_fft` Hann window centred on that span (zeros
beyond the clip's ends), so feature i and video frame i describe the same instant and a clip's features
never depend on audio outside the clip. Output is (ln(mel + eps) - offset) / scale, roughly unit range
for speech. Pure numpy: the same numbers on every machine, in the pipeline and in generation.
"""

from __future__ import annotations

import functools

import numpy as np

from data_pipeline.encoders.base import EncoderSpec, check_params

VERSION = "1"
DEFAULTS = {
    "sample_rate": 16000,
    "fps": 25,
    "n_mels": 80,
    "n_fft": 1024,
    "fmin": 20.0,
    "fmax": 8000.0,
    "eps": 1e-6,
    "offset": -4.0,
    "scale": 4.0,
}


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular HTK-scale mel filters [n_fft // 2 + 1, n_mels], each normalised to unit area."""
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    tri /= np.maximum(tri.sum(axis=1, keepdims=True), 1e-12)
    return tri.T.astype(np.float64)


class LogMel:
    """Mono waveform float [N] at `sample_rate` -> float32 [frames, n_mels], frames = N // hop."""

    name = "logmel"
    version = VERSION

    def __init__(self, **params: float):
        self.params = check_params("audio", self.name, params, DEFAULTS)
        p = self.params
        self.sample_rate, self.fps = int(p["sample_rate"]), int(p["fps"])
        if self.sample_rate % self.fps:
            raise ValueError(
                f"audio encoder logmel: sample_rate={self.sample_rate} is not a multiple of fps={self.fps}"
            )
        self.hop = self.sample_rate // self.fps
        self.n_fft, self.n_mels = int(p["n_fft"]), int(p["n_mels"])

    @property
    def feature_dim(self) -> int:
        return self.n_mels

    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.name, self.version, dict(self.params), "float32", (None, self.n_mels))

    def encode(self, waveform: np.ndarray, num_frames: int | None = None) -> np.ndarray:
        """Waveform [N] (or [N, channels], averaged) -> [num_frames, n_mels]; default N // hop frames."""
        x = np.asarray(waveform, dtype=np.float64)
        if x.ndim == 2:
            x = x.mean(axis=1)
        if x.ndim != 1:
            raise ValueError(
                f"audio encoder logmel: expected a waveform [N] or [N, channels], got shape {x.shape}"
            )
        n = x.shape[0] // self.hop if num_frames is None else int(num_frames)
        x = x[: n * self.hop]
        if x.shape[0] < n * self.hop:  # short input: silence after its end
            x = np.pad(x, (0, n * self.hop - x.shape[0]))
        half = self.n_fft // 2
        padded = np.pad(x, (half, half))
        centres = np.arange(n) * self.hop + self.hop // 2 + half
        idx = centres[:, None] + np.arange(-half, half)[None, :]
        window = np.hanning(self.n_fft + 1)[:-1]  # periodic Hann
        spec = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2
        p = self.params
        mel = spec @ mel_filterbank(
            self.sample_rate, self.n_fft, self.n_mels, float(p["fmin"]), float(p["fmax"])
        )
        out = (np.log(mel + float(p["eps"])) - float(p["offset"])) / float(p["scale"])
        return out.astype(np.float32)
