"""The README's main command, shrunk (`python -m mirage_jax.demo --fast`): synthesize -> prepare -> train as
2 processes x 4 devices with a preemption drill and a resume -> generate (held-out speech and --say) -> eval.
It checks the path, not learning (tests/test_demo_learning.py, `slow`, checks learning)."""

import json
import os
import subprocess
import sys

import av
import pytest

from data_pipeline.synthetic import speech

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("sync_generated", "sync_shuffled", "sync_real", "offset_frames", "heldout_loss", "sync_generated_std",
        "sync_shuffled_std", "sync_real_std")

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")]


def _check_mp4(path, frames=None):
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == 25 and v.codec_context.name == "h264"
        n = sum(1 for _ in c.decode(video=0))
    if frames is not None:
        assert n == frames
    with av.open(str(path)) as c:
        audio = sum(f.samples for f in c.decode(audio=0))
    assert a.codec_context.sample_rate == 16000
    assert abs(audio / 16000 - n / 25) < 0.08, (audio, n)  # the input speech, cut to the clip, muxed in
    return n


def test_fast_demo_runs_the_whole_path(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the demo's stages pick their own device counts
    out = subprocess.run([sys.executable, "-m", "mirage_jax.demo", "--fast", f"--out={tmp_path}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1500)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "sending SIGTERM to the launcher" in log and "PREEMPTED (clean exit)" in log
    assert "resumed from checkpoint" in log
    assert "over 8 devices in 2 process(es)" in log  # --fast trains as 2 processes x 4 devices
    report = json.loads(out.stdout.strip().splitlines()[-1])  # the last line is the eval JSON
    for k in KEYS:
        assert k in report, k
    assert report["sync_real"] > 0.9  # the ceiling: real clips are in sync
    assert report["checkpoint_step"] == 6
    _check_mp4(tmp_path / "videos" / "heldout_speech.mp4", frames=25)
    n = _check_mp4(tmp_path / "videos" / "say.mp4")
    side = json.loads((tmp_path / "videos" / "say.json").read_text())
    assert len(side["mouth"]) == n == side["num_frames"] and side["step"] == 6
    # no guidance flag was given: generate and eval used the run's own (configs/tiny.py:demo diffusion.cfg_audio)
    assert side["settings"]["cfg_audio"] == report["cfg_audio"] == 5.0
