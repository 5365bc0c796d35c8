"""mochi_vae (JAX) against diffusers' AutoencoderKLMochi with random weights, loaded from the published
safetensors layout: encode (causal padding), chunked encode, decode, chunked decode, diffusers-style tiling.
Tolerance: max |diff| <= 1e-4 in fp32 everywhere."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLMochi

from data_pipeline import encoders
from data_pipeline.encoders.mochi_vae import MochiVAE

TOL = 1e-4
TINY = dict(
    encoder_block_out_channels=(32, 64, 64, 64),
    decoder_block_out_channels=(32, 32, 64, 64),
    layers_per_block=(1, 1, 1, 1, 1),
)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderKLMochi(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # move norms off 1/0 and scale everything so every tensor matters
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("mochi_vae") / "vae"
    model.save_pretrained(str(out), safe_serialization=True)
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    return str(out), model


def _video(t, h, w, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)


def _torch_encode(model, x):
    with torch.no_grad():
        mean = model.encode(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).latent_dist.mean
    return mean.permute(0, 2, 3, 4, 1).numpy()


def _torch_decode(model, z):
    with torch.no_grad():
        out = model.decode(torch.from_numpy(z).permute(0, 4, 1, 2, 3)).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


def _maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    d = float(np.abs(a - b).max())
    print(f"max|diff| {d:.2e} {a.shape}")  # pytest -s shows the measured differences
    return d


def test_encode_matches_diffusers_and_chunking_is_exact(vae_dir):
    path, model = vae_dir
    x = _video(16, 32, 32)  # 16 frames: not 6k+1, so the strided convs drop a tail as diffusers does
    want = _torch_encode(model, x)
    assert want.shape == (1, 3, 4, 4, 12)  # 1 + (16 - 1) // 6 latent frames
    one_shot = MochiVAE(weights=path, tile=0, encode_chunk_latents=0).encode_raw(x)
    assert _maxdiff(one_shot, want) <= TOL
    # chunks of 1 latent: a first chunk of 1 frame, then 6 frames each; the last (4 frames) is padded, cropped
    chunked = MochiVAE(weights=path, tile=0, encode_chunk_latents=1).encode_raw(x)
    assert _maxdiff(chunked, one_shot) <= TOL
    x1 = _video(1, 32, 32, seed=1)  # a single frame (the reference image path) is the causal first latent
    assert _maxdiff(MochiVAE(weights=path, tile=0).encode_raw(x1), _torch_encode(model, x1)) <= TOL


def test_decode_matches_diffusers_and_chunking_is_exact(vae_dir):
    path, model = vae_dir
    z = np.random.default_rng(2).standard_normal((1, 3, 4, 4, 12)).astype(np.float32)
    want = _torch_decode(model, z)
    assert want.shape == (1, 13, 32, 32, 3)  # 6 (3 - 1) + 1 frames: the causal first frame is kept once
    one_shot = MochiVAE(weights=path, tile=0, decode_chunk_latents=0).decode_raw(z)
    assert _maxdiff(one_shot, want) <= TOL
    # chunks of 2 latents: the second (last) chunk is padded by repeating its latent, then cropped
    assert _maxdiff(MochiVAE(weights=path, tile=0, decode_chunk_latents=2).decode_raw(z), one_shot) <= TOL


def test_chunked_time_map_matches_diffusers_on_each_chunk(vae_dir):
    """chunk_frames=C: every C-frame chunk encoded (and its latents decoded) by diffusers on its own; a last
    partial chunk causally on its own. 7-frame chunks (1 + 6, as 25 = 1 + 4 x 6) keep the test small."""
    path, model = vae_dir
    enc = MochiVAE(weights=path, tile=0, chunk_frames=7)
    assert enc.time_map.rule == "causal:6/7"
    x = _video(15, 32, 32, seed=3)  # chunks of 7, 7 and 1 frames -> 2 + 2 + 1 latents
    want = np.concatenate([_torch_encode(model, x[:, s : s + 7]) for s in (0, 7, 14)], axis=1)
    z = enc.encode_raw(x)
    assert z.shape[1] == enc.latent_frames(15) == 5
    assert _maxdiff(z, want) <= TOL
    want_px = np.concatenate([_torch_decode(model, z[:, s : s + 2]) for s in (0, 2, 4)], axis=1)
    px = enc.decode_raw(z)
    assert px.shape[1] == enc.time_map.frames_for_latents(5) == 15
    assert _maxdiff(px, want_px) <= TOL
    with pytest.raises(ValueError, match="chunk_frames=8"):
        MochiVAE(weights=path, tile=0, chunk_frames=8)  # 8 - 1 is not a multiple of 6


def test_spatial_tiling_decode_matches_diffusers_tiling(vae_dir):
    path, model = vae_dir
    model.enable_tiling(32, 32, 16, 16)  # 4-latent tiles every 2 latents, blended over 16 pixels
    try:
        jv = MochiVAE(weights=path, tile=32, tile_stride=16, decode_chunk_latents=0)
        z = np.random.default_rng(4).standard_normal((1, 2, 6, 6, 12)).astype(np.float32)
        sharded = jv.decode_raw(z)  # 9 tiles in 4 shapes; same-shape tiles run one per local device
        assert jv._sharding is not None and len(jv._sharding.devices) == 8  # conftest's 8 CPU devices
        assert _maxdiff(sharded, _torch_decode(model, z)) <= TOL
        jv.tile_devices = 1  # tile by tile on one device: the same output
        assert _maxdiff(jv.decode_raw(z), sharded) <= 1e-6
    finally:
        model.disable_tiling()


@pytest.mark.slow  # ~30 s on 2 cores: four tile shapes x two chunk programs, each a fresh encoder compile
def test_spatial_tiling_encode_matches_diffusers_tiling(vae_dir):
    path, model = vae_dir
    model.enable_tiling(32, 32, 16, 16)  # 32-pixel tiles every 16 pixels, blended over 2 latents
    try:
        jv = MochiVAE(weights=path, tile=32, tile_stride=16, encode_chunk_latents=1)
        x = _video(7, 48, 48, seed=3)
        got = jv.encode_raw(x)
        assert got.shape == (1, 2, 6, 6, 12) and _maxdiff(got, _torch_encode(model, x)) <= TOL
    finally:
        model.disable_tiling()


def test_registry_interface_normalises_like_the_mochi_pipeline(vae_dir):
    path, model = vae_dir
    enc = encoders.get_video_encoder("mochi_vae", weights=path, tile=0)
    assert (enc.spatial_factor, enc.temporal_factor, enc.channels) == (8, 6, 12)
    frames = np.random.default_rng(5).integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    lat = enc.encode(frames)
    mean = np.asarray(model.config.latents_mean, np.float32)
    std = np.asarray(model.config.latents_std, np.float32)
    raw = _torch_encode(model, frames[None].astype(np.float32) / 127.5 - 1)[0]
    assert lat.shape == (3, 4, 4, 12) and _maxdiff(lat, (raw - mean) / std) <= TOL
    pix = enc.decode(lat)  # what mirage_jax.generate calls: [T', h, w, c] -> [T, H, W, 3] in [-1, 1]
    want = np.clip(_torch_decode(model, (lat * std + mean)[None])[0], -1, 1)
    assert pix.shape == (13, 32, 32, 3) and pix.dtype == np.float32 and _maxdiff(pix, want) <= TOL
    spec = enc.spec(32, 32).to_json()
    assert spec["name"] == "mochi_vae" and spec["feature_shape"] == [None, 4, 4, 12]
    assert encoders.from_spec("video", spec).decode(lat).shape == (13, 32, 32, 3)


def test_bad_weights_are_named(vae_dir, tmp_path):
    path, _ = vae_dir
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        MochiVAE(weights=str(tmp_path))
    bad = tmp_path / "vae"
    bad.mkdir()
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["latent_channels"] = 16
    json.dump(cfg, open(bad / "config.json", "w"))
    os.symlink(os.path.join(path, "diffusion_pytorch_model.safetensors"), bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"encoder.proj_out.weight.*shape"):
        MochiVAE(weights=str(bad))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="never unpickles"):
        MochiVAE(weights=str(tmp_path / "model.bin"))
