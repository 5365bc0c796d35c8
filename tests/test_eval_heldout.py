"""mirage_jax.eval.heldout: the held-out loss against its closed form (a "model" whose velocity is its own
input), and held-out footage without mouth tracks: the loss is still computed, the lip-sync keys stay in the
report as null and `skipped` names the data and why."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import prepare
from data_pipeline.ingest.per_source import IngestConfig
from data_pipeline.synthesize import synthesize
from data_pipeline.synthetic import speech
from helpers import saved_config, small_config
from mirage_base.batch_keys import LOADER_KEYS
from mirage_jax.eval.heldout import LOSS_LEVELS, SYNC_KEYS, evaluate, heldout_loss, read_heldout
from mirage_jax.inference import LoadedRun
from mirage_jax.run_config import DataConfig
from mirage_jax.run_encoders import load_encoders
from mirage_jax.sampling import SamplingSettings


class Echo(nnx.Module):
    """Predicts the velocity x_t (its noisy input): then pred - target = -t * x0 + (1 + t) * noise."""

    def __call__(self, x, t, text, text_mask, **inputs):
        return x


def _run(model: dict | None = None) -> LoadedRun:
    return LoadedRun(model=Echo(), config=saved_config(model), step=7, step_dir=None, weights="params")


def _closed_form(batch, seed):
    """Per level: mean over the valid latent frames of (-t * x0 + (1 + t) * noise)^2, in float64."""
    x0 = batch["video"].astype(np.float64)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32), np.float64)
    valid = batch["video_mask"].astype(bool)
    return {t: float(np.mean(np.square(-t * x0 + (1 + t) * noise)[valid])) for t in LOSS_LEVELS}


def test_heldout_loss_is_the_velocity_mse_over_valid_frames():
    rng = np.random.default_rng(0)
    b, t, h, w, c = 3, 4, 2, 3, 5
    mask = np.ones((b, t), bool)
    mask[1, 2:] = mask[2, 1:] = False  # padded clips: their padding is out of the loss
    batch = {
        "video": rng.standard_normal((b, t, h, w, c)).astype(np.float32), "video_mask": mask,
        "audio": rng.standard_normal((b, 6, 8)).astype(np.float32), "audio_mask": np.ones((b, 6), bool),
        "text": rng.standard_normal((b, 5, 16)).astype(np.float32), "text_mask": np.ones((b, 5), bool),
        "ref": rng.standard_normal((b, 1, h, w, c)).astype(np.float32), "ref_time": np.zeros(b, np.float32),
        "ref_mask": np.ones(b, bool),
    }  # fmt: skip
    got = heldout_loss(_run(), batch, seed=5)
    want = _closed_form(batch, seed=5)
    assert list(got) == list(LOSS_LEVELS)
    for level in LOSS_LEVELS:
        assert got[level] == pytest.approx(want[level], rel=1e-5), level


def _prepared(tmp_path, name, mouth: bool) -> str:
    raw = tmp_path / f"raw_{name}"
    synthesize(str(raw), clips=2, seconds=2.0, seed=3, size=(64, 64), progress=False)
    if not mouth:  # footage without mouth tracks (real footage): the sidecars carry a caption only
        for side in raw.glob("*.json"):
            d = json.loads(side.read_text())
            del d["mouth"]
            side.write_text(json.dumps(d))
    out = str(tmp_path / name)
    prepare.run(str(raw), out, IngestConfig(clip_seconds=1.0), progress=False)
    return out


@pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")
def test_footage_without_mouth_tracks_gets_the_loss_and_says_what_was_skipped(tmp_path):
    synced, unsynced = _prepared(tmp_path, "synced", mouth=True), _prepared(tmp_path, "unsynced", mouth=False)
    encs = load_encoders(DataConfig(source=synced))
    model = small_config(latent_channels=192, audio_feature_dim=80, text_embed_dim=64, time_map="uniform:1")
    run = _run(dataclasses.asdict(model))
    settings = SamplingSettings(steps=2)
    full = evaluate(run, encs, synced, settings, clips=3, seeds=1, progress=False)
    assert full["skipped"] is None and all(full[k] is not None for k in SYNC_KEYS)
    part = evaluate(run, encs, unsynced, settings, clips=3, seeds=1, progress=False)
    assert list(part) == list(full)  # the same keys, in the same order
    assert all(part[k] is None for k in SYNC_KEYS)
    assert unsynced in part["skipped"] and "0 full-length clip(s) with a mouth track" in part["skipped"]
    assert part["clips"] == 3 and full["clips"] == 3
    held = read_heldout(unsynced, 3, encs)
    assert held.lipsync_skipped == part["skipped"] and not held.batch["mouth_valid"].any()
    assert set(held.batch) == set(LOADER_KEYS)  # the one list of batch keys is what the loader yields
    want = _closed_form(held.batch, seed=0)
    for level in LOSS_LEVELS:
        assert part["heldout_loss_per_level"][f"{level:.1f}"] == pytest.approx(want[level], rel=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")
def test_syncnet_scores_join_the_report(tmp_path):
    """evaluate(syncnet=...) on synthetic clips (face crops) with a random-weight SyncNet: every lse_* key is set
    and finite, nothing is skipped, and the speech it scored is the source file's at each record's start frame
    (decoded here with PyAV's own s16 conversion)."""
    import av
    import torch
    from test_syncnet import random_torch_net

    from data_pipeline.dataset.records import decode_record
    from data_pipeline.loader.shards import ShardSource, resolve_shards
    from mirage_jax.eval.lse import LSE_KEYS, heldout_waves
    from mirage_jax.eval.sync import Scorer
    from mirage_jax.eval.syncnet import load_weights

    synced = _prepared(tmp_path, "synced", mouth=True)
    encs = load_encoders(DataConfig(source=synced))
    model = small_config(latent_channels=192, audio_feature_dim=80, text_embed_dim=64, time_map="uniform:1")
    weights = str(tmp_path / "syncnet.model")
    torch.save(random_torch_net().state_dict(), weights)
    report = evaluate(_run(dataclasses.asdict(model)), encs, synced, SamplingSettings(steps=2), clips=2, seeds=2,
                      progress=False, syncnet=Scorer(load_weights(weights), batch=8), syncnet_cropped=True)
    assert report["skipped"] is None
    assert all(np.isfinite(report[k]) for k in LSE_KEYS), {k: report[k] for k in LSE_KEYS}
    held = read_heldout(synced, 2, encs)
    waves = heldout_waves(synced, list(held.indices), 25)
    shards = resolve_shards(synced, "none")
    meta = decode_record(ShardSource(shards.paths, shards.counts)[held.indices[1]][1])[1]
    with av.open(meta["source"]) as c:
        rs = av.AudioResampler(format="s16", layout="mono", rate=16000)
        pcm = np.concatenate([o.to_ndarray().reshape(-1) for f in c.decode(audio=0) for o in rs.resample(f)])
    start = int(meta["start_frame"]) * 640
    np.testing.assert_allclose(np.round(waves[1] * 32768), pcm[start:start + 25 * 640], atol=1)
