"""The real frozen encoders end to end, in both ways of using Mochi's VAE: synthesize 2.5 s A-roll -> prepare
2 s clips with mochi_vae + wav2vec2 + t5 (tiny random weights in the published layouts) -> the trainer refuses
the unfitted config, naming every field, and trains a tiny model with exactly the overrides it printed -> generate
3 s of speech -> an mp4 of 75 frames at 25 fps with the speech muxed in, decoded by the VAE's own decoder."""

import re

import av
import numpy as np
import pytest

from data_pipeline import prepare
from data_pipeline.encoders.mochi_vae import MochiVAE
from data_pipeline.ingest.per_source import IngestConfig
from data_pipeline.synthesize import synthesize
from data_pipeline.synthetic import speech
from helpers import tiny_encoder_weights
from mirage_jax import generate as gen
from mirage_jax.config import ConfigError
from mirage_jax.inference import load_run
from mirage_jax.run_config import RunConfig
from mirage_jax.run_encoders import load_encoders
from mirage_jax.sampling import SamplingSettings
from mirage_jax.train import data_fit, loop
from train_cli import fast_config

pytestmark = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_encoder_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    synthesize(str(out), clips=2, seconds=2.5, seed=11, size=(32, 32), progress=False)
    return str(out)


def _apply(cfg, overrides):
    for key, value in overrides:
        section, name = key.split(".")
        cfg[section][name] = int(value) if value.isdigit() else value


# whole clip: 50 frames -> 1 + 49 // 6 = 9 latents covering 49 frames; 25-frame chunks: 2 x 5 = 10 latents, 50 frames
@pytest.mark.parametrize("chunk,rule,latents,frames", [(0, "causal:6", 9, 49), (25, "causal:6/25", 10, 50)])
def test_prepare_train_generate_with_the_real_encoders(weights, raw, tmp_path, chunk, rule, latents, frames):
    vae, w2v, t5 = weights
    data, work = str(tmp_path / "data"), str(tmp_path / "run")
    ingest = IngestConfig(
        clip_seconds=2.0, video_encoder="mochi_vae",
        video_params=(("chunk_frames", chunk), ("decode_chunk_latents", 2), ("weights", vae)),
        audio_encoder="wav2vec2", audio_params=(("weights", w2v),),
        text_encoder="t5", text_params=(("max_len", 16), ("tokenizer", ""), ("weights", t5)),
    )  # fmt: skip
    m = prepare.run(raw, data, ingest, progress=False)
    assert m["num_records"] == 2 and m["stats"]["clips"] == 2  # the 0.5 s tails are too short, as they should be
    assert (m["time_map"]["rule"], m["time_map"]["latent_frames"], m["time_map"]["audio_frames"]) == (
        rule, latents, frames)
    assert m["keys"]["video"]["shape"] == [latents, 4, 4, 12] and m["keys"]["audio"]["shape"] == [50, 32]

    cfg = fast_config(data__source=data, data__worker_count=0, train__steps=3, train__global_batch_size=8,
                      checkpoint__async_save=False)
    with pytest.raises(ConfigError) as e:
        data_fit.check(RunConfig.from_config(cfg))
    msg = str(e.value)
    fixes = re.findall(r"--config\.(\S+)=(\S+)", msg)
    assert dict(fixes) == {
        "model.time_map": rule, "shapes.latent_frames": str(latents), "shapes.audio_frames": str(frames),
        "shapes.latent_height": "4", "shapes.latent_width": "4", "model.latent_channels": "12",
        "model.audio_feature_dim": "32", "shapes.text_len": "16", "model.text_embed_dim": "16",
    }, msg  # fmt: skip
    _apply(cfg, fixes)  # exactly what the message told the user to pass
    assert loop.Trainer(cfg, work).run() == 3

    run = load_run(work)
    encs = load_encoders(run.config.data)
    assert isinstance(encs.video, MochiVAE) and encs.video.time_map.rule == rule and encs.clip_frames == frames
    wave = speech.speak("a person speaks.", voice="en-us", rate=160, pitch=50)
    wave = np.resize(wave, 3 * 16000).astype(np.float32)  # 3 s of speech
    n = gen.frames_for(None, wave)
    assert n == 75
    settings = SamplingSettings(steps=2, cfg_audio=2.0, window=encs.clip_frames)
    [video] = gen.generate(run, encs, [gen.Prompt(wave, n, caption="a person speaks .")], settings, progress=False)
    assert video.shape == (75, 32, 32, 3) and video.dtype == np.uint8
    out = tmp_path / "out.mp4"
    gen.write_video(out, video, wave, {"rule": rule})
    with av.open(str(out)) as c:
        vs, au = c.streams.video[0], c.streams.audio[0]
        assert vs.average_rate == 25 and au.sample_rate == 16000
        decoded = [f for f in c.decode(video=0)]
    assert len(decoded) == 75
    with av.open(str(out)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
    assert abs(samples - 3 * 16000) <= 2048  # the whole 3 s of speech (AAC frames of 1024 samples)
