"""The lip-sync metric on real synthetic A-roll (decoded mp4s): high on the clips themselves, ~0 on shuffled
audio, and it finds a shift of the speech by k frames as offset k."""

import av
import numpy as np
import pytest

from data_pipeline.ingest import media
from data_pipeline.synthesize import synthesize
from data_pipeline.synthetic import speech
from mirage_jax.eval import lipsync

pytestmark = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """(frames decoded from the mp4, the speech's own mouth track from the decoded audio) for 6 clips."""
    out = tmp_path_factory.mktemp("sync")
    paths = synthesize(str(out), clips=6, seconds=3.0, seed=11, size=(64, 64), progress=False)
    result = []
    for p in paths:
        with av.open(p) as c:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        wave, off = media.decode_audio_16k(p, 0.0)
        wave = media.align_audio(wave, off, len(frames))
        result.append((frames, speech.mouth_track(wave, len(frames))))
    return result


def test_real_clips_are_in_sync(clips):
    for frames, track in clips:
        s = lipsync.sync_frames(frames, track)
        assert s.score > 0.9, s
        assert s.offset == 0, s
        assert s.confidence > 0.3, s


def test_shuffled_audio_is_not(clips):
    """Another clip's speech: low, though not zero (every utterance starts from a pause, a shared shape)."""
    scores = [lipsync.sync_frames(clips[i][0], clips[(i + 1) % len(clips)][1]).score for i in range(len(clips))]
    real = [lipsync.sync_frames(f, t).score for f, t in clips]
    assert float(np.mean(scores)) < 0.4, scores
    assert min(real) - max(scores) > 0.5, (real, scores)


@pytest.mark.parametrize("k", [-3, 2, 5])
def test_shifted_audio_gives_its_offset(clips, k):
    """Delay the speech by k frames relative to the video (k < 0: the speech comes first): offset = -k."""
    for frames, track in clips[:3]:
        shifted = np.roll(track, k)
        if k > 0:
            shifted[:k] = track[0]
        else:
            shifted[k:] = track[-1]
        s = lipsync.sync_frames(frames, shifted)
        assert s.offset == -k, (k, s)


def test_offset_sign_convention():
    """A mouth that moves 3 frames after the sound has offset +3 (closed form: a shifted impulse train)."""
    rng = np.random.default_rng(0)
    audio = rng.random(60)
    video = np.concatenate([np.zeros(3), audio[:-3]])
    s = lipsync.sync(video, audio)
    assert s.offset == 3 and s.confidence > 0.5


def test_constant_video_has_no_sync():
    assert lipsync.pearson(np.ones(30), np.arange(30.0)) == 0.0
    with pytest.raises(ValueError, match="at least 8 frames"):
        lipsync.sync(np.arange(5.0), np.arange(5.0))
