"""The frame-to-latent time contract (mirage_base/time_map.py) against hand-written tables: for Mochi's
VAE over the whole clip (causal:6) and over independent 25-frame chunks (causal:6/25), clips of 25, 50 and 100
frames, every audio token the loader yields gets, from the model's RoPE positions, the index of the latent frame
that covers its frame; crops keep that true."""

import numpy as np
import pytest

from data_pipeline.loader.examples import crop_or_pad
from helpers import small_config
from mirage_base.time_map import TimeMap
from mirage_jax.config import ConfigError
from mirage_jax.model import rope as rope_lib

# Written by hand from diffusers' AutoencoderKLMochi: latent 0 covers frame 0, latent k covers frames 6k-5 .. 6k;
# each 25-frame chunk starts over. Entry i = how many consecutive frames latent i covers.
RUNS = {
    ("causal:6", 25): [1, 6, 6, 6, 6],
    ("causal:6", 50): [1, 6, 6, 6, 6, 6, 6, 6, 6],  # 9 latents cover 49 frames; frame 49 is dropped
    ("causal:6", 100): [1, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6],  # 17 latents, 97 frames
    ("causal:6/25", 25): [1, 6, 6, 6, 6],
    ("causal:6/25", 50): [1, 6, 6, 6, 6, 1, 6, 6, 6, 6],
    ("causal:6/25", 100): [1, 6, 6, 6, 6, 1, 6, 6, 6, 6, 1, 6, 6, 6, 6, 1, 6, 6, 6, 6],  # 20 latents
}
LATENTS = {("causal:6", 25): 5, ("causal:6", 50): 9, ("causal:6", 100): 17,
           ("causal:6/25", 25): 5, ("causal:6/25", 50): 10, ("causal:6/25", 100): 20}  # fmt: skip


def _record(latents: int, frames: int) -> dict[str, np.ndarray]:
    """A record whose latent l holds the value l and whose audio/mouth row f holds the value f."""
    return {
        "video": np.arange(latents, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3), np.float32),
        "audio": np.repeat(np.arange(frames, dtype=np.float32)[:, None], 4, axis=1),
        "mouth": np.arange(frames, dtype=np.float32),
        "text": np.zeros((3, 4), np.float32), "text_mask": np.ones(3, np.uint8),
        "ref": np.zeros((1, 2, 2, 3), np.float32), "ref_time": np.array([-30.0], np.float32),
        "mouth_valid": np.array([1], np.uint8),
    }  # fmt: skip


@pytest.mark.parametrize("rule,frames", sorted(RUNS))
def test_audio_token_time_is_the_covering_latent(rule, frames):
    table = np.repeat(np.arange(len(RUNS[rule, frames])), RUNS[rule, frames])
    tm = TimeMap.parse(rule)
    assert tm.latent_count(frames) == LATENTS[rule, frames] == len(RUNS[rule, frames])
    assert tm.covered_frames(frames) == len(table)
    # what prepare writes for a clip of `frames` frames, through the loader, into the model's RoPE positions
    ex = crop_or_pad(_record(tm.latent_count(frames), frames), len(table), tm, None)
    assert ex["video"].shape[0] == len(RUNS[rule, frames]) and ex["video_mask"].all() and ex["audio_mask"].all()
    np.testing.assert_array_equal(ex["audio"][:, 0], np.arange(len(table)))  # frames 0 .. covered - 1
    pos = np.asarray(rope_lib.audio_positions(len(table), small_config(time_map=rule).frame_map, 1))[0, :, 0]
    np.testing.assert_array_equal(pos, table)
    video_time = np.asarray(rope_lib.video_positions(np.arange(len(RUNS[rule, frames]), dtype=np.float32)[None],
                                                     1, 1, 8, 8))[0, :, 0]
    np.testing.assert_array_equal(video_time[table], table)  # the latent at that index has that time
    assert tm.frames_for_latents(tm.latent_count(frames)) == len(table)
    if rule == "causal:6/25":  # the continuous reference-frame time agrees at each latent's last frame
        last = np.cumsum(RUNS[rule, frames]) - 1
        np.testing.assert_allclose(tm.latent_time(last.astype(np.float32)), np.arange(len(last)))


@pytest.mark.parametrize("rule", ["causal:6", "causal:6/25", "uniform:5"])
def test_crops_start_on_latent_boundaries_and_keep_audio_with_its_latent(rule):
    """100-frame records cropped to 2 s windows at every offset the map allows: each audio token lands on the
    latent (by value) that covers its source frame (by the hand table of the whole record)."""
    tm = TimeMap.parse(rule)
    full = {"causal:6": RUNS["causal:6", 100], "causal:6/25": RUNS["causal:6/25", 100], "uniform:5": [5] * 20}[rule]
    covering = np.repeat(np.arange(len(full)), full)  # record frame -> record latent
    clip = tm.covered_frames(50)
    rec = _record(len(full), 100)
    seen = set()
    for seed in range(40):
        ex = crop_or_pad(rec, clip, tm, np.random.default_rng(seed))
        frames = ex["audio"][:, 0].astype(int)
        lat = ex["video"][:, 0, 0, 0].astype(int)
        seen.add(int(lat[0]))
        assert (np.diff(frames) == 1).all() and ex["audio_mask"].all()
        np.testing.assert_array_equal(lat[tm.frame_latent(clip)], covering[frames])
        assert ex["ref_time"] == -30.0 - frames[0]  # the reference stays where it was, relative to the new start
    want = {"causal:6": {0}, "causal:6/25": {0, 5, 10}, "uniform:5": set(range(11))}[rule]
    assert seen == want


def test_short_records_are_padded_and_bad_rules_named():
    tm = TimeMap.parse("causal:6/25")
    ex = crop_or_pad(_record(5, 25), 50, tm, np.random.default_rng(0))
    assert ex["video_mask"].tolist() == [True] * 5 + [False] * 5
    assert ex["audio_mask"].tolist() == [True] * 25 + [False] * 25
    with pytest.raises(ConfigError, match="model.time_map"):
        small_config(time_map="causal:6/24").validate()
    with pytest.raises(ValueError, match="model.time_map='chunks'"):
        TimeMap.parse("chunks", "model.time_map")


def test_train_config_fits_the_manifest_or_names_the_overrides():
    """data_fit against a 4 s chunked manifest: the 10B config's shapes fit; 2 s windows of it fit (crops on chunk
    boundaries); 52 frames (not a whole clip of the map: its 11 latents cover 51) and the whole-clip map do not."""
    from configs.mirage_10b import get_config
    from mirage_base.time_map import TimeMap
    from mirage_jax.run_config import RunConfig
    from mirage_jax.train import data_fit

    manifest = {"clip_frames": 100, "time_map": TimeMap.parse("causal:6/25").to_json(100), "encoders": {},
                "keys": {"video": {"shape": [20, 160, 90, 12]}, "audio": {"shape": [100, 1024]},
                         "text": {"shape": [256, 4096]}}}  # fmt: skip
    cfg = get_config()
    assert data_fit.mismatches(RunConfig.from_config(cfg), manifest) == []
    cfg.shapes.audio_frames, cfg.shapes.latent_frames = 50, 10
    assert data_fit.mismatches(RunConfig.from_config(cfg), manifest) == []
    cfg.shapes.audio_frames, cfg.model.time_map = 52, "causal:6"
    assert sorted(f for f, _, _ in data_fit.mismatches(RunConfig.from_config(cfg), manifest)) == [
        "model.time_map", "shapes.audio_frames", "shapes.latent_frames"]
