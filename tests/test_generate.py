"""mirage_jax.generate: its sampling loop against the library sampler (a second code path), sharded against
unsharded, prompt batching and the refusals that name what does not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import encoders as enc_lib
from data_pipeline.ingest import media
from helpers import random_inputs, randomize, saved_config, small_config
from mirage_base.batch_keys import CONDITION_KEYS
from mirage_base.time_map import TimeMap
from mirage_jax import generate as gen
from mirage_jax import run_encoders
from mirage_jax.config import DiffusionConfig
from mirage_jax.diffusion import sample
from mirage_jax.inference import LoadedRun
from mirage_jax.model import MirageDiT
from mirage_jax.run_config import DataConfig
from mirage_jax.sampling import SamplingSettings, generation_mesh, sample_latents


def _run(cfg):
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    randomize(model, seed=3)
    return LoadedRun(model=model, config=saved_config(), step=0, step_dir=None, weights="params")


def _cond(cfg, b):
    x = random_inputs(cfg, b=2, t=3)
    cond = {k: np.concatenate([x[k]] * (b // 2)) for k in CONDITION_KEYS if k in x}
    cond["video_mask"] = np.ones((b, 3), bool)
    return cond, (b,) + x["video"].shape[1:]


@pytest.mark.parametrize("cfg_audio", [1.0, 2.5])
def test_sampling_loop_equals_library_sampler(cfg_audio):
    cfg = small_config()
    run = _run(cfg)
    cond, shape = _cond(cfg, 2)
    ours = sample_latents(run, cond, shape, SamplingSettings(steps=6, cfg_audio=cfg_audio, cfg_text=1.5, seed=4),
                          progress=False)
    ref = sample(run.model, {k: jnp.asarray(v) for k, v in cond.items()}, shape, jax.random.key(4), steps=6,
                 cfg_audio=cfg_audio, cfg_text=1.5)
    np.testing.assert_allclose(ours, np.asarray(ref), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("sp", [1, 2])
def test_sharded_generation_equals_single_device(sp):
    """All 8 devices: batch over `data`, and with sp=2 every clip's tokens split over `sequence` too."""
    cfg = small_config()
    run = _run(cfg)
    cond, shape = _cond(cfg, 8 // sp)
    settings = SamplingSettings(steps=4, cfg_audio=2.0, cfg_text=1.0, seed=1)
    one = sample_latents(run, cond, shape, settings, progress=False)
    mesh = generation_mesh(sequence_parallel=sp)
    assert mesh.shape["data"] == 8 // sp and mesh.shape["sequence"] == sp
    many = sample_latents(run, cond, shape, settings, mesh=mesh, progress=False)
    np.testing.assert_allclose(many, one, atol=2e-5, rtol=1e-5)


def _encoders(**video):
    venc = enc_lib.get_video_encoder("s2d", spatial_factor=8, **video)
    aenc, tenc = enc_lib.get_audio_encoder("logmel", n_mels=8), enc_lib.get_text_encoder("hash", max_len=7, dim=16)
    manifest = {"clip_frames": 25, "encoders": {"video": venc.spec(16, 32).to_json(), "audio": aenc.spec().to_json(),
                                                "text": tenc.spec().to_json()}}
    return run_encoders.Encoders(venc, aenc, tenc, manifest=manifest, source="/data/x")


def test_check_fit_names_every_mismatch():
    cfg = small_config(latent_channels=192, audio_feature_dim=8, text_embed_dim=16, time_map="uniform:1")
    run_encoders.check_fit(cfg, _encoders())  # fits
    bad = small_config(latent_channels=4, audio_feature_dim=80, text_embed_dim=16, time_map="uniform:2",
                       use_audio=False)
    with pytest.raises(run_encoders.GenerateError) as e:
        run_encoders.check_fit(bad, _encoders())
    msg = str(e.value)
    for field in ("model.latent_channels=4", "model.audio_feature_dim=80", "model.time_map=uniform:2",
                  "model.use_audio=False", "/data/x"):
        assert field in msg, msg


def test_prompts_are_padded_and_masked():
    encs = _encoders()
    cfg = small_config(latent_channels=192, audio_feature_dim=8, text_embed_dim=16, time_map="uniform:1")
    waves = [np.random.default_rng(i).standard_normal(n * media.HOP).astype(np.float32) for i, n in enumerate((10, 14))]
    prompts = [gen.Prompt(w, gen.frames_for(None, w), caption="a person talks") for w in waves]
    prompts[1].ref_frame = np.full((16, 32, 3), 200, np.uint8)
    cond = gen.encode_prompts(prompts, encs, cfg, pad_to=4)
    assert cond["audio"].shape == (4, 14, 8) and cond["ref"].shape == (4, 1, 2, 4, 192)
    assert cond["video_mask"].sum(axis=1).tolist() == [10, 14, 0, 0]
    assert cond["audio_mask"].sum(axis=1).tolist() == [10, 14, 0, 0]
    assert cond["ref_mask"].tolist() == [False, True, False, False]
    assert cond["text_mask"][:2].sum(axis=1).tolist() == [3, 3] and not cond["text_mask"][2:].any()
    np.testing.assert_array_equal(cond["audio"][0, :10], encs.audio.encode(waves[0], num_frames=10))


def test_refusals_name_the_input(tmp_path):
    with pytest.raises(run_encoders.GenerateError, match="data.source='synthetic'.*--data"):
        run_encoders.load_encoders(DataConfig(source="synthetic"))
    with pytest.raises(run_encoders.GenerateError, match="--data"):
        run_encoders.load_encoders(DataConfig(source=str(tmp_path)))  # no manifest.json there
    with pytest.raises(run_encoders.GenerateError, match="pass --train-data=DIR"):  # eval names its own flag
        run_encoders.load_encoders(DataConfig(source=str(tmp_path)), flag="--train-data")
    with pytest.raises(gen.GenerateError, match="no such file"):
        gen.read_speech(str(tmp_path / "missing.wav"))
    silent = tmp_path / "silent.mp4"
    import av

    with av.open(str(silent), "w") as c:  # a video file without an audio stream
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        for _ in range(3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        c.mux(s.encode())
    with pytest.raises(gen.GenerateError, match="no audio stream"):
        gen.read_speech(str(silent))
    with pytest.raises(gen.GenerateError, match="at least 0.32 s"):
        gen.frames_for(None, np.zeros(3 * media.HOP, np.float32))
    with pytest.raises(gen.GenerateError, match="directory or a pattern"):
        gen.output_paths("one.mp4", 2)
    assert [p.name for p in gen.output_paths(str(tmp_path / "vids"), 2)] == ["000.mp4", "001.mp4"]


def test_an_earlier_runs_numbered_outputs_are_removed_and_nothing_else(tmp_path):
    """A folder that held 5 prompts' outputs, regenerated with 2: 002..004 (mp4 + json) go, 000/001 (rewritten by
    this run) and the user's own files stay; the same for a --out pattern with {i}; a single-file --out touches
    nothing else."""
    vids = tmp_path / "vids"
    vids.mkdir()
    for i in range(5):
        (vids / f"{i:03d}.mp4").write_bytes(b"old")
        (vids / f"{i:03d}.json").write_text("{}")
    (vids / "notes.txt").write_text("mine")
    (vids / "intro.mp4").write_bytes(b"mine")
    (vids / "12.mp4").write_bytes(b"mine")  # not the NNN pattern generate writes
    paths = gen.output_paths(str(vids), 2)
    removed = gen.remove_stale_outputs(str(vids), paths)
    assert sorted(p.name for p in removed) == [f"{i:03d}.{e}" for i in (2, 3, 4) for e in ("json", "mp4")]
    assert sorted(p.name for p in vids.iterdir()) == ["000.json", "000.mp4", "001.json", "001.mp4", "12.mp4",
                                                      "intro.mp4", "notes.txt"]
    for i in range(4):
        (tmp_path / f"take_{i}.mp4").write_bytes(b"old")
        (tmp_path / f"take_{i}.json").write_text("{}")
    (tmp_path / "take_x.mp4").write_bytes(b"mine")
    pattern = str(tmp_path / "take_{i}.mp4")
    removed = gen.remove_stale_outputs(pattern, gen.output_paths(pattern, 2))
    assert sorted(p.name for p in removed) == ["take_2.json", "take_2.mp4", "take_3.json", "take_3.mp4"]
    assert (tmp_path / "take_x.mp4").exists() and (tmp_path / "take_1.json").exists()
    assert gen.remove_stale_outputs(str(vids / "000.mp4"), gen.output_paths(str(vids / "000.mp4"), 1)) == []
    assert (vids / "001.mp4").exists()


ONE = TimeMap.parse("uniform:1")


def test_long_speech_is_cut_into_training_length_windows():
    wave = np.random.default_rng(0).standard_normal(60 * media.HOP).astype(np.float32)
    p = gen.Prompt(wave, 60, caption="hi", ref_time=-25.0)
    parts = gen.split_windows(p, 25, ONE)
    assert [q.num_frames for q in parts] == [25, 25, 25]
    assert [q.ref_time for q in parts] == [-25.0, -50.0, -75.0]  # the same reference frame, seen from each window
    joined = np.concatenate([q.waveform for q in parts])
    np.testing.assert_array_equal(joined[: len(wave)], wave)
    assert not joined[len(wave):].any()  # the last window is padded with silence
    assert gen.split_windows(p, 0, ONE) == [p] and gen.split_windows(p, 60, ONE) == [p]


def test_prompts_follow_the_command_line():
    """--say / --audio interleaved: prompt i (and so output NNN = i) is the i-th on the command line."""
    argv = ["generate", "--say=first", "--audio", "b.wav", "--checkpoint=w", "--say", "third", "--audio=d.mp3",
            "--caption=c"]
    order = gen.prompt_order(argv, ["b.wav", "d.mp3"], ["first", "third"])
    assert order == [("say", "first"), ("audio", "b.wav"), ("say", "third"), ("audio", "d.mp3")]
    # values absl read elsewhere (a --flagfile): every --audio, then every --say
    assert gen.prompt_order(["generate", "--flagfile=f"], ["b.wav"], ["hi"]) == [("audio", "b.wav"), ("say", "hi")]


def test_sampling_defaults_to_the_runs_own_guidance():
    run = DiffusionConfig(sample_steps=12, cfg_audio=5.0, cfg_text=1.5, cfg_schedule="cosine")
    assert SamplingSettings.of_run(run) == SamplingSettings(steps=12, cfg_audio=5.0, cfg_text=1.5, schedule="cosine")
    flagged = SamplingSettings.of_run(run, steps=None, cfg_audio=2.0, cfg_text=None, schedule=None, seed=3)
    assert flagged == SamplingSettings(steps=12, cfg_audio=2.0, cfg_text=1.5, schedule="cosine", seed=3)
