"""The Mirage report's network: Mochi 1's 10B AsymmDiT (48 blocks, 3072/1536 widths, 24 heads of 128)
plus an audio stream, on 4 s 720p portrait clips (20 x 160 x 90 latents = 72,000 video tokens,
100 wav2vec2 frames at 25 fps, 256 T5-XXL tokens). The 20 latent frames are not a constant: they are Mochi's
VAE on independent 25-frame chunks (`model.time_map=causal:6/25`, 5 latents per chunk), the map the dataset
must be prepared with (`data_pipeline.prepare --video-encoder=mochi_vae --vae-chunk-frames=25`).

The argument is `key=value,...` (mirage_jax.run_config.parse_arg): `seconds` (clip length, default 4) and
`layout` (the slice it is laid out for, default v5p256; docs/scaling.md has the measured memory of each):

    --config=configs/mirage_10b.py                             4 s clips on v5p-256 (128 chips, 95 GiB each):
                                                               fsdp 32 x sequence 4, global batch 32,
                                                               remat save_splash_down + fused splash
                                                               backward (56.1 GiB, ceiling 0.844)
    --config=configs/mirage_10b.py:layout=v6e256               4 s clips on v6e-256 (256 chips, 32 GiB each):
                                                               fsdp 32 x sequence 8, global batch 32,
                                                               remat save_splash + fused splash backward
    --config=configs/mirage_10b.py:seconds=8,layout=v5p512     8 s clips (40 latent frames, 200 audio frames,
                                                               148,056 tokens) on v5p-512: fsdp 32 x sequence 8,
                                                               global batch 32, remat save_splash_down + fused
                                                               splash backward (69.0 GiB, ceiling 0.848)
    --config=configs/mirage_10b.py:8s                          the older spelling of `seconds=8`
    --config=configs/mirage_10b.py:seconds=4,8                 the report's mix: shape buckets 4s_720x1280 and
                                                               8s_720x1280 (`data.buckets`; `shapes` is the first
                                                               listed) on v5p-256 with full remat: token budget
                                                               64 x 4 s = 32 x 8 s clips (docs/scaling.md)

Every layout: no accumulation; weights, gradients and optimizer state sharded over fsdp AND sequence (all
chips); Ulysses inside attention. v6e256 keeps splash's residuals (`remat_policy=save_splash`) and runs its
fused backward kernel (`splash_fused_bwd`): MFU ceiling 0.83 (22% of HBM free; v6e needs sequence 8, one sample
per 8 chips, to fit); v5p256 also keeps the MLP's down projection output (`save_splash_down`): ceiling 0.844
(41% free), against 0.56 under full remat (docs/scaling.md).
v5p512 (8 s) keeps splash's residuals and the MLP's down projection output (`save_splash_down`) with the fused
backward at sequence 8 (one sample per 8 chips: the fused kernel's dq buffer grows with the square of the
sequence, 30.8 GiB per device here): ceiling 0.848 at 73% of HBM, against 0.56 under full remat. v5p256 and
v6e256 were compiled for 4 s clips only: with `seconds` above a layout's `MEASURED_SECONDS` it uses full remat
and the split backward, so `:seconds=8` alone gives v5p-256 with full remat, never an uncompiled fused layout.
For example:

    python -m mirage_jax.aot --config=configs/mirage_10b.py:layout=v6e256 --topology=v6e-256
    python -m mirage_jax.train --config=configs/mirage_10b.py --workdir=gs://...
"""

from __future__ import annotations

import ml_collections

from mirage_base.errors import ConfigArgError
from mirage_jax.aot.layout import apply_layout
from mirage_jax.run_config import base_config, clip_shapes, parse_arg

TIME_MAP = "causal:6/25"  # Mochi's VAE on independent 25-frame chunks: 100 frames -> 20 latent frames

# slice -> (mesh.ici.sequence, train.global_batch_size, model.remat_policy, model.splash_fused_bwd), each
# compiled (python -m mirage_jax.aot) to fit with > 10% HBM headroom; numbers in docs/scaling.md. The one
# table of the 10B layouts; `mirage_jax.aot.layout.apply_layout` sets one on the config (as the search does)
LAYOUTS = {"v5p256": (4, 32, "save_splash_down", True), "v6e256": (8, 32, "save_splash", True),
           "v5p512": (8, 32, "save_splash_down", True)}
SIZE = "720x1280"  # the clips' frame size, W x H (8 x the latent 90 x 160): the bucket names of prepare
# the clip length each layout's fused backward was compiled for (its dq buffer grows with tokens^2): longer clips
# fall back to full remat and the split backward
MEASURED_SECONDS = {"v5p256": 4, "v6e256": 4, "v5p512": 8}


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        patch_size=2, latent_channels=12, num_layers=48, num_heads=24, head_dim=128,
        video_dim=3072, text_dim=1536, audio_dim=1536, mlp_ratio_video=4.0, mlp_ratio_text=4.0,
        mlp_ratio_audio=4.0, text_embed_dim=4096, max_text_len=256, audio_feature_dim=1024, time_map=TIME_MAP,
        time_embed_dim=256, pool_heads=8, rope_base_height=192, rope_base_width=192, rope_theta=10000.0,
        rope_init="mixed", use_audio=True, compute_dtype="bfloat16", param_dtype="float32", attention_backend="splash",
        remat_policy="full", splash_fused_bwd=False, scan_layers=True,
    ))


def diffusion_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        timestep_sampler="linear_quadratic", logit_normal_mean=0.0, logit_normal_std=1.0, lq_threshold=0.025,
        lq_steps=64, drop_text=0.1, drop_audio=0.1, drop_ref=0.1, loss_buckets=8, sample_steps=64,
        cfg_audio=1.0, cfg_text=1.0, cfg_schedule="cosine",
    ))


def _seconds(arg: str | None) -> tuple[str, list[int]]:
    """`seconds=4,8,layout=v5p256` -> ('layout=v5p256', [4, 8]): the clip lengths (default [4]) and the rest of
    the argument for parse_arg (which would read the list's later numbers as keys)."""
    arg = "seconds=8" if arg == "8s" else (arg or "")
    rest, seconds, in_list = [], [], False
    for item in filter(None, arg.split(",")):
        key, eq, value = item.partition("=")
        if key.strip() == "seconds" and eq:
            seconds, in_list = [value.strip()], True
        elif in_list and not eq and item.strip().lstrip("+-").isdigit():
            seconds.append(item.strip())  # the list's next number
        else:
            rest.append(item)
            in_list = False
    try:
        values = [int(x) for x in seconds] or [4]
    except ValueError:
        raise ConfigArgError(f"configs/mirage_10b.py:{arg}: `seconds` takes whole seconds, e.g. seconds=4,8") from None
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        raise ConfigArgError(f"configs/mirage_10b.py:{arg}: seconds={','.join(seconds)}: distinct clips of at least "
                             "1 s each")
    return ",".join(rest), values


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    rest, seconds = _seconds(arg)
    a = parse_arg(rest, "configs/mirage_10b.py", layout="v5p256", seconds=0)  # seconds: taken out above
    if a.layout not in LAYOUTS:
        raise ConfigArgError(f"configs/mirage_10b.py:{arg}: unknown layout {a.layout!r}; one of {sorted(LAYOUTS)}")
    cfg = base_config()
    cfg.model = model_config()
    shapes = {s: clip_shapes(s, TIME_MAP, latent_height=160, latent_width=90, text_len=256) for s in seconds}
    cfg.shapes = ml_collections.ConfigDict(shapes[seconds[0]])
    cfg.diffusion = diffusion_config()
    sequence, global_batch, remat, fused_bwd = LAYOUTS[a.layout]
    if max(seconds) > MEASURED_SECONDS[a.layout] and fused_bwd:  # not compiled at this length: full remat
        remat, fused_bwd = "full", False
    cfg = apply_layout(cfg, sequence=sequence, global_batch=global_batch, remat=remat, fused_bwd=fused_bwd)
    if len(seconds) > 1:  # shape buckets: the clips of every length, as prepare --clip-seconds=4,8 writes them
        cfg.data.buckets = ",".join(f"{s}s_{SIZE}={v['latent_frames']}x160x90" for s, v in shapes.items())
        # the layout's batch of the longest clips, counted at the shortest clip's tokens per second: each bucket's
        # batch is then the layout's x (longest / its seconds), rounded down to what the batch axes divide
        # (shape_buckets.make_bucket); 4,8 on v5p256: 64 x 4 s and 32 x 8 s, ~37k tokens per device each
        cfg.train.tokens_per_batch = global_batch * max(seconds) * _tokens(cfg, shapes[min(seconds)]) // min(seconds)
    return cfg


def _tokens(cfg: ml_collections.ConfigDict, shapes: dict[str, int]) -> int:
    from mirage_jax.config import ModelConfig
    from mirage_jax.describe import count_tokens

    return int(count_tokens(ModelConfig.from_config(cfg.model), shapes)["total"])
