"""Synthetic A-roll: valid mp4s (checked with PyAV), deterministic, a mouth that really follows the track."""

import json
import os

import av
import numpy as np
import pytest
from scipy.stats import spearmanr

from data_pipeline.synthesize import StaleClipsError, synthesize
from data_pipeline.synthetic import speech

pytestmark = pytest.mark.skipif(
    not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)"
)
SECONDS = 3.0


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    paths = synthesize(str(out), clips=3, seconds=SECONDS, seed=7, size=(64, 64), progress=False)
    return out, paths


def _decode(path):
    with av.open(path) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(path) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio


def test_mp4_is_h264_25fps_with_aac_16k_mono_and_right_durations(clips):
    _, paths = clips
    for p in paths:
        with av.open(p) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert v.codec_context.name == "h264" and v.average_rate == 25
            assert (v.codec_context.width, v.codec_context.height) == (64, 64)
            assert a.codec_context.name == "aac" and a.codec_context.sample_rate == 16000
            assert a.codec_context.layout.nb_channels == 1
            assert float(v.duration * v.time_base) == pytest.approx(SECONDS, abs=1e-6)
            assert float(a.duration * a.time_base) == pytest.approx(SECONDS, abs=0.04)
        frames, audio = _decode(p)
        assert frames.shape == (75, 64, 64, 3)
        assert len(audio) >= SECONDS * 16000 and np.abs(audio).max() > 0.1  # real, audible speech


def test_sidecar_has_one_mouth_value_per_frame_and_a_caption(clips):
    _, paths = clips
    side = json.load(open(os.path.splitext(paths[0])[0] + ".json"))
    assert len(side["mouth"]) == len(side["mouth_center"]) == 75
    assert side["caption"].startswith("A person") and side["transcript"]
    assert 0.0 <= min(side["mouth"]) < 0.2 and max(side["mouth"]) > 0.8


def test_mouth_pixels_in_decoded_frames_follow_the_track(clips):
    _, paths = clips
    for p in paths:
        side = json.load(open(os.path.splitext(p)[0] + ".json"))
        frames, _ = _decode(p)
        lum = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        dark = []
        for k, (x, y) in enumerate(side["mouth_center"]):
            x0, y0 = int(round(x)), int(round(y))
            box = lum[k, max(y0 - 9, 0) : y0 + 10, max(x0 - 9, 0) : x0 + 10]
            dark.append(float((box < 45).sum()))
        r = np.corrcoef(dark, side["mouth"])[0, 1]
        assert r > 0.8, f"{p}: mouth pixels vs track correlation {r:.3f}"


def test_track_follows_the_decoded_speech(clips):
    _, paths = clips
    for p in paths:
        side = json.load(open(os.path.splitext(p)[0] + ".json"))
        _, audio = _decode(p)
        rms = np.sqrt((audio[: 75 * 640].reshape(75, 640).astype(np.float64) ** 2).mean(axis=1))
        rho = spearmanr(rms, side["mouth"]).statistic  # the track is a monotone, smoothed map of loudness
        assert rho > 0.8, f"{p}: rank correlation of loudness and mouth track {rho:.3f}"


def test_deterministic_for_a_seed(clips, tmp_path):
    out, paths = clips
    again = synthesize(str(tmp_path), clips=2, seconds=SECONDS, seed=7, size=(64, 64), progress=False)
    for a, b in zip(paths[:2], again, strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()
        assert open(a[:-4] + ".json").read() == open(b[:-4] + ".json").read()
    other = synthesize(str(tmp_path / "o"), clips=1, seconds=SECONDS, seed=8, size=(64, 64), progress=False)
    assert open(other[0], "rb").read() != open(paths[0], "rb").read()


def test_a_smaller_run_into_a_folder_of_more_clips_is_refused(clips):
    """prepare ingests every clip of a folder: leaving an earlier, larger run's clips behind would mix them in."""
    out, paths = clips
    before = {p: os.path.getmtime(p) for p in paths}
    with pytest.raises(StaleClipsError, match=r"already holds 1 clip\(s\) this run would not rewrite \(clip_00002"):
        synthesize(str(out), clips=2, seconds=SECONDS, seed=7, size=(64, 64), progress=False)
    assert {p: os.path.getmtime(p) for p in paths} == before  # nothing rewritten
