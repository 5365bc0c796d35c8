"""The tensorflow-io audio backend (`prepare --audio-backend=tfio`), run as a subprocess.

tensorflow-io 0.37.1 needs TensorFlow 2.16-2.17.1 and numpy<2; JAX 0.10 needs numpy>=2, so tfio lives in
its own venv (requirements-tfio.txt; default .venv-tfio, or $MIRAGE_TFIO_PYTHON / --tfio-python). PyAV
decodes each source's audio at its native rate; this module writes it as 16-bit WAV, runs
tfio_worker.py once for a whole batch of sources, and reads back 16 kHz mono float32 .npy files.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import wave

import numpy as np

from data_pipeline.ingest.media import SAMPLE_RATE

ENV_VAR = "MIRAGE_TFIO_PYTHON"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfio_worker.py")


def default_python() -> str:
    """$MIRAGE_TFIO_PYTHON, else .venv-tfio/bin/python under the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get(ENV_VAR) or os.path.join(root, ".venv-tfio", "bin", "python")


def available(python: str | None = None) -> tuple[bool, str]:
    """Whether the tfio interpreter exists and imports tensorflow_io; (ok, reason)."""
    python = python or default_python()
    if not os.path.exists(python):
        return False, (
            f"no tensorflow-io interpreter at {python}; create it with `python3 -m venv .venv-tfio && "
            f".venv-tfio/bin/pip install -r requirements-tfio.txt` or set ${ENV_VAR}"
        )
    r = subprocess.run([python, "-c", "import tensorflow_io"], capture_output=True, text=True)
    if r.returncode:
        return False, f"{python} cannot import tensorflow_io: {r.stderr.strip().splitlines()[-1:]}"
    return True, ""


def write_wav(path: str, audio: np.ndarray, rate: int) -> None:
    """float [samples, channels] in [-1, 1] -> 16-bit PCM WAV."""
    x = np.asarray(audio, np.float32)
    if x.ndim == 1:
        x = x[:, None]
    pcm = np.clip(np.rint(x * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())


def resample_16k(items: list[tuple[np.ndarray, int]], python: str | None = None) -> list[np.ndarray]:
    """[(audio [samples, channels], rate)] -> [16 kHz mono float32], all in one tfio subprocess."""
    python = python or default_python()
    ok, why = available(python)
    if not ok:
        raise RuntimeError(f"--audio-backend=tfio: {why}")
    with tempfile.TemporaryDirectory(prefix="mirage-tfio-") as d:
        jobs = []
        for i, (audio, rate) in enumerate(items):
            wav, npy = os.path.join(d, f"{i}.wav"), os.path.join(d, f"{i}.npy")
            write_wav(wav, audio, rate)
            jobs.append({"wav": wav, "npy": npy})
        spec = os.path.join(d, "jobs.json")
        with open(spec, "w") as f:
            json.dump({"rate": SAMPLE_RATE, "jobs": jobs}, f)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run([python, WORKER, spec], capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(
                f"tfio worker ({python} {WORKER}) failed with exit code {r.returncode}:\n{r.stderr[-2000:]}"
            )
        return [np.load(j["npy"], allow_pickle=False).astype(np.float32) for j in jobs]
