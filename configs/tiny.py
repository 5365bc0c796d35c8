"""Tiny MirageDiT that trains in seconds on a laptop CPU (the README demo and the tests).

Shapes match data_pipeline's CPU defaults: 64x64 px frames through the exact space-to-depth encoder
(factor 8 -> 8x8x192 latents, one latent frame per 25 fps frame), 80 log-mel audio features per
frame, 32 hashed text tokens of width 64, 2 s clips.

    --config=configs/tiny.py            the defaults below
    --config=configs/tiny.py:mochi      same, without the audio stream (a pure Mochi AsymmDiT)
    --config=configs/tiny.py:demo       the README demo's run: 1 s clips of prepared synthetic A-roll, a
                                        learning rate and cadence that learn lip-sync on a 2-core CPU
                                        (why each value: docs/tiny_config.md)
    --config=configs/tiny.py:fast       smaller still (2 blocks, 4 latent frames): compiles in seconds on a
                                        2-core CPU; the runtime's tests and the chaos drill
"""

from __future__ import annotations

import ml_collections

from mirage_jax.run_config import base_config, parse_arg


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        patch_size=2, latent_channels=192, num_layers=4, num_heads=4, head_dim=16,
        video_dim=64, text_dim=32, audio_dim=32, mlp_ratio_video=4.0, mlp_ratio_text=4.0, mlp_ratio_audio=4.0,
        text_embed_dim=64, max_text_len=32, audio_feature_dim=80, time_map="uniform:1", time_embed_dim=64,
        pool_heads=4, rope_base_height=8, rope_base_width=8, rope_theta=10000.0, rope_init="mixed", use_audio=True,
        compute_dtype="float32", param_dtype="float32", attention_backend="xla", remat_policy="none",
        splash_fused_bwd=False, scan_layers=True,
    ))


def shapes_config() -> ml_collections.ConfigDict:
    """Per-sample input shapes (latent T x H x W, audio frames, text tokens) for synthetic data and FLOPs."""
    return ml_collections.ConfigDict(dict(
        latent_frames=50, latent_height=8, latent_width=8, audio_frames=50, text_len=32, ref_frames=1,
    ))


def diffusion_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        timestep_sampler="logit_normal", logit_normal_mean=0.0, logit_normal_std=1.0, lq_threshold=0.025,
        lq_steps=64, drop_text=0.1, drop_audio=0.1, drop_ref=0.1, loss_buckets=4, sample_steps=16,
        cfg_audio=1.0, cfg_text=1.0, cfg_schedule="constant",
    ))


def demo(cfg: ml_collections.ConfigDict) -> None:
    """The `make demo` run (mirage_jax/demo/): 1 s clips (25 latent frames), batch 8, data parallel over 2
    processes. docs/tiny_config.md gives the measurements behind each value."""
    cfg.model.latent_channels = 16  # the `dct` encoder's 8 x 8 px -> 16 channels (s2d's 192 is too wide)
    cfg.mesh.ici.data, cfg.mesh.ici.fsdp = -1, 1  # pure data parallelism
    cfg.train.grad_sync = "flat"  # one all-reduce per step (XLA:CPU runs each tuple buffer as a Gloo collective)
    cfg.shapes.latent_frames = cfg.shapes.audio_frames = 25
    cfg.train.global_batch_size = 8
    cfg.train.steps = 2000
    cfg.train.log_every = 50
    cfg.train.ema_decay = 0.99
    cfg.model.rope_theta = 100.0  # more of head_dim 16's 8 RoPE pairs resolve time at 25 fps
    cfg.optim.lr = 2.5e-3  # high until the images are good, then a full anneal (decay_steps=-1: train.steps)
    cfg.optim.warmup_steps = 100
    cfg.optim.decay_steps = -1
    cfg.checkpoint.save_every = 200
    cfg.checkpoint.keep_last_n = 2
    cfg.data.worker_count = 0  # 2 processes on 2 cores: no spare core for loader workers
    cfg.diffusion.cfg_audio = 5.0


def fast(cfg: ml_collections.ConfigDict) -> None:
    """The tests' and the chaos drill's run (tests/train_cli.py, tools/chaos.py)."""
    cfg.model.num_layers = 2
    cfg.shapes.latent_frames = cfg.shapes.audio_frames = 4
    cfg.train.global_batch_size = 8
    cfg.train.log_every = 1
    cfg.optim.warmup_steps = 2
    cfg.optim.lr = 1e-3
    cfg.checkpoint.save_every = 10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: `mochi`, `demo` and/or `fast` (`key=value,...` style, mirage_jax.run_config.parse_arg)."""
    a = parse_arg(arg, "configs/tiny.py", mochi=False, demo=False, fast=False)
    cfg = base_config()
    cfg.model = model_config()
    cfg.shapes = shapes_config()
    cfg.diffusion = diffusion_config()
    if a.mochi:
        cfg.model.use_audio = False
    if a.demo:
        demo(cfg)
    if a.fast:
        fast(cfg)
    return cfg
