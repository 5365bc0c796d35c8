"""SyncNet's audio features: `python_speech_features.mfcc(signal, 16000)` with its defaults, in numpy.

Why our own copy: python_speech_features (0.6, 2017) is unmaintained, and the computation is short. This
reproduces it step by step (tests/test_syncnet.py compares against the package within 1e-5):

1. pre-emphasis y[0] = x[0], y[n] = x[n] - 0.97 x[n-1];
2. frames of 400 samples (25 ms) every 160 (10 ms): 1 + ceil((N - 400) / 160) frames (1 if N <= 400), the
   last zero-padded; no window function (rectangular);
3. power spectrum |rfft(frame, 512)|^2 / 512 (257 bins); energy = its sum per frame;
4. 26 triangular mel filters between 0 Hz and 8 kHz on FFT bins floor(513 * mel2hz(m) / 16000) (HTK mel:
   2595 log10(1 + f / 700));
5. zeros of the filter energies and of the frame energy replaced by float64 eps (2.2e-16) before the log (the
   source of the "silent frames differ with float32 eps" trap);
6. DCT-II (orthonormal) of the log filter energies, first 13 coefficients, lifter 1 + 11 sin(pi n / 22);
7. coefficient 0 replaced by log(frame energy) (appendEnergy=True).

Input: audio at int16 scale (SyncNet reads a 16-bit WAV; float audio in [-1, 1] must be multiplied by 32768
first, see `int16_scale`). Output: float64 [frames, 13], 100 frames per second.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.fft import dct

SAMPLE_RATE = 16000
WIN = 400  # 0.025 s * 16000
HOP = 160  # 0.01 s * 16000
NFFT = 512
NFILT = 26
NUMCEP = 13
PREEMPH = 0.97
CEPLIFTER = 22


def int16_scale(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] -> the int16 values a 16-bit PCM WAV of it holds (rounded, clipped), as float64:
    what the reference's `wavfile.read` of ffmpeg's `pcm_s16le` gives."""
    return np.clip(np.round(np.asarray(audio, np.float64) * 32768.0), -32768, 32767)


def _mel(hz: np.ndarray) -> np.ndarray:
    return 2595 * np.log10(1 + hz / 700.0)


def _hz(mel: np.ndarray) -> np.ndarray:
    return 700 * (10 ** (mel / 2595.0) - 1)


@functools.lru_cache(maxsize=4)
def filterbank(nfilt: int = NFILT, nfft: int = NFFT, samplerate: int = SAMPLE_RATE) -> np.ndarray:
    """[nfilt, nfft // 2 + 1] triangular mel filters from 0 Hz to samplerate / 2 (python_speech_features'
    get_filterbanks: edges on FFT bins, rising (i - b[j]) / (b[j+1] - b[j]) then falling)."""
    mels = np.linspace(_mel(np.float64(0)), _mel(np.float64(samplerate / 2)), nfilt + 2)
    b = np.floor((nfft + 1) * _hz(mels) / samplerate)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    i = np.arange(nfft // 2 + 1, dtype=np.float64)
    for j in range(nfilt):
        up = (i >= b[j]) & (i < b[j + 1])
        down = (i >= b[j + 1]) & (i < b[j + 2])
        fb[j, up] = (i[up] - b[j]) / (b[j + 1] - b[j])
        fb[j, down] = (b[j + 2] - i[down]) / (b[j + 2] - b[j + 1])
    fb.setflags(write=False)
    return fb


def mfcc(signal: np.ndarray, samplerate: int = SAMPLE_RATE) -> np.ndarray:
    """MFCCs of mono `signal` [N] (int16 scale) as python_speech_features.mfcc(signal, 16000): float64
    [frames, 13] with frames = 1 + ceil((N - 400) / 160) (1 when N <= 400). See the module docstring."""
    if samplerate != SAMPLE_RATE:
        raise ValueError(f"mfcc: SyncNet's features are defined at {SAMPLE_RATE} Hz, got {samplerate}")
    x = np.asarray(signal, np.float64).reshape(-1)
    if not len(x):
        raise ValueError("mfcc: empty audio")
    x = np.concatenate([x[:1], x[1:] - PREEMPH * x[:-1]])
    n = 1 if len(x) <= WIN else 1 + math.ceil((len(x) - WIN) / HOP)
    x = np.pad(x, (0, (n - 1) * HOP + WIN - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, WIN)[::HOP][:n]
    pspec = np.square(np.abs(np.fft.rfft(frames, NFFT))) / NFFT
    eps = np.finfo(np.float64).eps
    energy = pspec.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)
    feat = pspec @ filterbank().T
    feat = np.where(feat == 0, eps, feat)
    cep = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :NUMCEP]
    cep = cep * (1 + (CEPLIFTER / 2.0) * np.sin(np.pi * np.arange(NUMCEP) / CEPLIFTER))
    cep[:, 0] = np.log(energy)
    return cep
