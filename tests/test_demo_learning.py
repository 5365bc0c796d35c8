"""The learning check (`make test-slow`): the full `make demo` run must show audio-driven mouth motion, i.e.
the generated videos' lip-sync closes at least half of the gap between the shuffled-audio floor and the
real-clip ceiling on held-out speech. About 25 minutes on a 2-core CPU."""

import json
import os
import subprocess
import sys

import pytest

from data_pipeline.synthetic import speech

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess,
              pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")]


def test_demo_learns_lip_sync(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", "mirage_jax.demo", f"--out={tmp_path}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    floor, ceiling, gen = r["sync_shuffled"], r["sync_real"], r["sync_generated"]
    assert ceiling > 0.9, r
    assert gen - floor >= 0.5 * (ceiling - floor), r  # closes at least half of the floor -> ceiling gap
    assert r["offset_frames"] == 0, r
