"""Real speech for synthetic A-roll: varied sentences spoken by espeak-ng with varied voices, rates and
pitch, at 16 kHz mono, plus the per-frame mouth opening that the talking head follows.

The mouth track comes from the speech envelope: frame i's opening is the loudness of samples
[i * 640, (i + 1) * 640) mapped from [-40 dB, 0 dB] (re the utterance's peak) onto [0, 1], lightly smoothed,
so the mouth is shut in pauses and opens with every syllable.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np
from scipy import signal

from data_pipeline.ingest.media import FPS, HOP, SAMPLE_RATE

VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt3", "john", "linda")
_SUBJECTS = (
    "The weather",
    "My brother",
    "This small village",
    "Every morning the train",
    "Our new kitchen",
    "The old bridge",
    "A clever robot",
    "The red balloon",
    "Her garden",
    "The quiet library",
    "Dinner",
    "The football team",
    "A tiny bird",
    "The mountain road",
    "Your favourite song",
)
_VERBS = ("looks", "seems", "was", "will be", "has been", "felt", "sounds", "became", "stays", "is")
_ADJS = (
    "wonderful",
    "a little strange",
    "very busy",
    "quite calm",
    "bright and early",
    "much better today",
    "surprisingly loud",
    "full of people",
    "perfectly fine",
    "colder than usual",
    "ready for the winter",
)
_TAILS = (
    "",
    " and nobody expected it",
    " before the sun went down",
    " according to the news",
    " if you ask me",
    " after all these years",
    " on Tuesday afternoon",
    " for the first time",
)
_QUESTIONS = (
    "Have you ever seen anything like this?",
    "Could we meet again next week?",
    "What do you think about that?",
    "Is it really true?",
    "Why not try it yourself?",
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def sentence(rng: np.random.Generator) -> str:
    """One random English sentence (statement or question)."""
    if rng.random() < 0.2:
        return str(rng.choice(_QUESTIONS))
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJS)}{rng.choice(_TAILS)}."


def speak(text: str, *, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Synthesize `text` with espeak-ng; float32 mono waveform at 16 kHz."""
    if not espeak_available():
        raise RuntimeError(
            "espeak-ng is not installed; run `apt-get install -y espeak-ng` (or `make sysdeps`)"
        )
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        sr, n = w.getframerate(), w.getnframes()
        x = np.frombuffer(w.readframes(n), dtype="<i2").astype(np.float32) / 32768.0
    if sr != SAMPLE_RATE:
        g = np.gcd(sr, SAMPLE_RATE)
        x = signal.resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)
    return x


def mouth_track(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """Per-frame mouth opening in [0, 1] from the speech envelope (see module docstring)."""
    x = np.zeros(num_frames * HOP, np.float32)
    x[: min(len(audio), len(x))] = audio[: len(x)]
    rms = np.sqrt(np.mean(x.reshape(num_frames, HOP).astype(np.float64) ** 2, axis=1))
    peak = max(float(rms.max()), 1e-6)
    db = 20.0 * np.log10(np.maximum(rms, 1e-9) / peak)
    opening = np.clip((db + 40.0) / 40.0, 0.0, 1.0) ** 1.5
    smooth = np.convolve(np.pad(opening, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    return smooth.astype(np.float32)


def sample_voice(rng: np.random.Generator) -> tuple[str, int, int]:
    """One speaker's voice: (espeak-ng voice+variant, rate in words per minute, pitch 0..99)."""
    voice = f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}"
    return voice, int(rng.integers(120, 200)), int(rng.integers(20, 80))


def utterance(rng: np.random.Generator, seconds: float,
              voice: tuple[str, int, int] | None = None) -> tuple[np.ndarray, str, dict]:
    """`seconds` of speech (sentences with short pauses, cut or padded to length) and its transcript, in `voice`
    (`sample_voice`'s triple; None: a voice drawn from `rng`)."""
    voice, rate, pitch = sample_voice(rng) if voice is None else voice
    n = int(round(seconds * SAMPLE_RATE))
    parts = [np.zeros(int(rng.uniform(0.05, 0.4) * SAMPLE_RATE), np.float32)]
    words, total = [], len(parts[0])
    while total < n:
        text = sentence(rng)
        wav = speak(text, voice=voice, rate=rate, pitch=pitch)
        gap = np.zeros(int(rng.uniform(0.15, 0.5) * SAMPLE_RATE), np.float32)
        parts += [wav, gap]
        words.append(text)
        total += len(wav) + len(gap)
    audio = np.concatenate(parts)[:n]
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio = audio * (rng.uniform(0.5, 0.9) / peak)
    return (
        audio.astype(np.float32),
        " ".join(words),
        {"voice": voice, "rate": rate, "pitch": pitch, "fps": FPS},
    )
