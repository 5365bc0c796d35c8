"""`python -m data_pipeline.prepare --video-encoder=mochi_vae --audio-encoder=wav2vec2 --text-encoder=t5` on
tiny synthetic clips with tiny random-weight models saved in the published layouts: manifest names, versions, shapes,
and the records decode through `from_manifest(manifest, "video").decode`, as mirage_jax.generate will."""

import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import encoders
from data_pipeline.dataset import manifest
from data_pipeline.loader.grain_loader import make_loader
from data_pipeline.synthesize import synthesize
from data_pipeline.synthetic import speech
from helpers import tiny_encoder_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_encoder_weights(tmp_path_factory.mktemp("weights"))


def test_prepare_cli_with_mochi_vae_and_wav2vec2(weights, tmp_path):
    """2.5 s sources at --clip-seconds=2 in 25-frame chunks (10 latents, 50 audio frames), as the issue tried;
    then --clip-seconds=3, longer than every source: one line on stderr, no traceback."""
    vae, w2v, t5 = weights
    raw, out = str(tmp_path / "raw"), str(tmp_path / "prepared")
    synthesize(raw, clips=2, seconds=2.5, seed=5, size=(64, 64), progress=False)
    cmd = [
        sys.executable, "-m", "data_pipeline.prepare", f"--input={raw}", f"--output={out}", "--clip-seconds=2",
        "--video-encoder=mochi_vae", f"--video-weights={vae}", "--vae-decode-chunk-latents=2",
        "--vae-chunk-frames=25", "--audio-encoder=wav2vec2", f"--audio-weights={w2v}",
        "--text-encoder=t5", f"--text-weights={t5}", "--text-len=16",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.read_manifest(out)
    assert m["num_records"] == 2 and m["clip_frames"] == 50
    tm = m["time_map"]
    assert (tm["rule"], tm["latent_frames"], tm["audio_frames"]) == ("causal:6/25", 10, 50)
    assert tm["frame_to_latent"][:8] == [0, 1, 1, 1, 1, 1, 1, 2] and tm["frame_to_latent"][24:27] == [4, 5, 6]
    v, a, t = m["encoders"]["video"], m["encoders"]["audio"], m["encoders"]["text"]
    assert (t["name"], t["version"], t["params"]["weights"], t["feature_shape"]) == ("t5", "1", t5, [16, 16])
    assert m["keys"]["text"]["shape"] == [16, 16] and m["keys"]["text_mask"]["shape"] == [16]
    assert (v["name"], v["version"], v["params"]["weights"]) == ("mochi_vae", "1", vae)
    assert (a["name"], a["version"], a["params"]["weights"]) == ("wav2vec2", "1", w2v)
    assert v["feature_shape"] == [None, 8, 8, 12] and a["feature_shape"] == [None, 32]
    assert m["keys"]["video"]["shape"] == [10, 8, 8, 12]  # two 25-frame chunks of 1 + 24 / 6 latent frames
    assert m["keys"]["audio"]["shape"] == [50, 32] and m["keys"]["ref"]["shape"] == [1, 8, 8, 12]
    ds = make_loader(out, global_batch_size=1, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    batch = next(iter(ds))
    lat = batch["video"][0][batch["video_mask"][0]]
    assert lat.shape == (10, 8, 8, 12) and np.isfinite(lat).all() and batch["audio"].shape == (1, 50, 32)
    pixels = encoders.from_manifest(m, "video").decode(lat)  # exactly generate's call
    assert pixels.shape == (50, 64, 64, 3) and pixels.dtype == np.float32 and np.abs(pixels).max() <= 1.0
    too_long = [*(c for c in cmd if not c.startswith(("--output", "--clip-seconds"))), f"--output={tmp_path}/none",
                "--clip-seconds=3"]  # fmt: skip
    r = subprocess.run(too_long, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]  # NoClipsError: refused input
    assert "error: prepare: no clips from 2 source(s)" in r.stderr and "dropped:too_short" in r.stderr


def test_missing_weights_flag_is_a_usage_error(tmp_path):
    cmd = [sys.executable, "-m", "data_pipeline.prepare", f"--input={tmp_path}", f"--output={tmp_path}/o",
           "--video-encoder=mochi_vae"]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    assert r.returncode != 0 and "--video-encoder=mochi_vae needs --video-weights" in r.stderr
