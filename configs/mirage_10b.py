"""The Mirage report's network: Mochi 1's 10B AsymmDiT (48 blocks, 3072/1536 widths, 24 heads of 128)
plus an audio stream, on 4 s 720p portrait clips (20 x 160 x 90 latents = 72,000 video tokens,
100 wav2vec2 frames at 25 fps, 256 T5-XXL tokens). The 20 latent frames are not a constant: they are Mochi's
VAE on independent 25-frame chunks (`model.time_map=causal:6/25`, 5 latents per chunk), the map the dataset
must be prepared with (`data_pipeline.prepare --video-encoder=mochi_vae --vae-chunk-frames=25`).

Defaults to the layout measured to fit v5p-256 (docs/scaling.md); other slices: configs/mirage_10b_*.py.

    --config=configs/mirage_10b.py        4 s clips
    --config=configs/mirage_10b.py:8s     8 s clips (40 latent frames, 200 audio frames)
"""

from __future__ import annotations

import ml_collections

from configs.common import PARAM_RULES, get_base_config
from data_pipeline.encoders.time_map import TimeMap

TIME_MAP = "causal:6/25"  # Mochi's VAE on independent 25-frame chunks: 100 frames -> 20 latent frames


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        patch_size=2, latent_channels=12, num_layers=48, num_heads=24, head_dim=128,
        video_dim=3072, text_dim=1536, audio_dim=1536, mlp_ratio_video=4.0, mlp_ratio_text=4.0,
        mlp_ratio_audio=4.0, text_embed_dim=4096, max_text_len=256, audio_feature_dim=1024, time_map=TIME_MAP,
        time_embed_dim=256, pool_heads=8, rope_base_height=192, rope_base_width=192, rope_theta=10000.0,
        rope_init="mixed", use_audio=True, compute_dtype="bfloat16", param_dtype="float32", attention_backend="splash",
        remat_policy="full", scan_layers=True,
    ))


def shapes_config(seconds: int = 4, time_map: str = TIME_MAP) -> ml_collections.ConfigDict:
    """25 fps clips of `seconds`: latent frames and the audio frames they cover from the encoder's time map
    (causal:6/25: 4 s -> 20 latents, 100 audio frames); 720p portrait / 8 = 160 x 90."""
    tm = TimeMap.parse(time_map)
    latents = tm.latent_count(25 * seconds)
    return ml_collections.ConfigDict(dict(
        latent_frames=latents, latent_height=160, latent_width=90, audio_frames=tm.frames_for_latents(latents),
        text_len=256, ref_frames=1,
    ))


def diffusion_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        timestep_sampler="linear_quadratic", logit_normal_mean=0.0, logit_normal_std=1.0, lq_threshold=0.025,
        lq_steps=64, drop_text=0.1, drop_audio=0.1, drop_ref=0.1, loss_buckets=8, sample_steps=64,
        cfg_audio=1.0, cfg_text=1.0, cfg_schedule="cosine",
    ))


def params_sharded_over(axes: tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    """PARAM_RULES with the `embed` (FSDP) dimension split over `axes` instead of `fsdp` alone, so
    state is not replicated across the sequence axis."""
    return tuple((name, axes if name == "embed" else mesh_axes) for name, mesh_axes in PARAM_RULES)


def apply_layout(cfg: ml_collections.ConfigDict, *, sequence: int, global_batch: int, grad_accum: int = 1,
                 remat: str = "full") -> ml_collections.ConfigDict:
    """fsdp = the rest of the slice x `sequence`, tensor 1; state sharded over fsdp and sequence."""
    cfg.mesh.ici.update(dict(data=1, fsdp=-1, sequence=sequence, tensor=1))
    cfg.mesh.rules.params = params_sharded_over(("fsdp", "sequence"))
    cfg.train.global_batch_size = global_batch
    cfg.train.grad_accum = grad_accum
    cfg.model.remat_policy = remat
    return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    cfg = get_base_config()
    cfg.model = model_config()
    seconds = 4
    if arg == "8s":
        seconds = 8
    elif arg not in (None, ""):
        raise ValueError(f"configs/mirage_10b.py: unknown argument {arg!r}; use nothing or '8s'")
    cfg.shapes = shapes_config(seconds)
    cfg.diffusion = diffusion_config()
    # the layout that fits a v5p-256 slice with >10% HBM headroom (docs/scaling.md): fsdp 32 x sequence 4
    return apply_layout(cfg, sequence=4, global_batch=32)
