"""Parameter counts, token counts and analytic training FLOPs of a config, without allocating weights.

    python -m mirage_jax.describe --config=configs/mirage_10b.py --json

Parameters are counted on `nnx.eval_shape` of the real module (so they cannot drift from the code);
FLOPs are the analytic matmul count of forward + backward (3x forward), the MFU numerator: remat
recomputation is not counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

from mirage_jax.config import ModelConfig

STREAM_OF_TOP = {
    "patch_embed": "video", "proj_out": "video", "norm_out": "video", "pos_frequencies": "video",
    "time_embed": "conditioning", "text_pool": "conditioning", "caption_proj": "text",
    "audio_proj": "audio", "audio_pos_frequencies": "audio",
}


def _stream_of(path: tuple[Any, ...]) -> str:
    if path[0] in ("blocks", "last_block"):
        return str(path[1])
    return STREAM_OF_TOP.get(str(path[0]), "other")


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "video", "text", "audio", "conditioning"} parameter counts from the abstract module."""
    from flax import nnx

    from mirage_jax.model.build import abstract_model

    _, params = abstract_model(cfg)
    counts = {"total": 0, "video": 0, "text": 0, "audio": 0, "conditioning": 0}
    for path, var in nnx.to_flat_state(params):
        n = math.prod(var.shape)
        counts["total"] += n
        counts[_stream_of(tuple(path))] = counts.get(_stream_of(tuple(path)), 0) + n
    return counts


def count_tokens(cfg: ModelConfig, shapes: Mapping[str, int]) -> dict[str, int]:
    per_frame = (shapes["latent_height"] // cfg.patch_size) * (shapes["latent_width"] // cfg.patch_size)
    tokens = {
        "video": shapes["latent_frames"] * per_frame,
        "reference": shapes.get("ref_frames", 0) * per_frame,
        "audio": shapes["audio_frames"] if cfg.use_audio else 0,
        "text": shapes["text_len"],
    }
    tokens["total"] = sum(tokens.values())
    return tokens


def forward_flops(cfg: ModelConfig, shapes: Mapping[str, int]) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass for one sample."""
    tok = count_tokens(cfg, shapes)
    a = cfg.attn_dim
    streams = [("video", tok["video"] + tok["reference"], cfg.video_dim, cfg.mlp_ratio_video),
               ("text", tok["text"], cfg.text_dim, cfg.mlp_ratio_text)]
    if cfg.use_audio:
        streams.append(("audio", tok["audio"], cfg.audio_dim, cfg.mlp_ratio_audio))
    flops = 0
    for layer in range(cfg.num_layers):
        last = layer == cfg.num_layers - 1
        for name, n, d, ratio in streams:
            pre_only = last and name != "video"
            flops += 2 * n * d * 3 * a  # q, k, v
            flops += 2 * cfg.video_dim * (1 if pre_only else 4) * d  # adaLN (per sample)
            if not pre_only:
                flops += 2 * n * a * d  # output projection
                flops += 2 * n * 3 * d * ModelConfig.mlp_hidden(d, ratio)  # SwiGLU
        flops += 4 * tok["total"] ** 2 * a  # QK^T and AV
    e = cfg.text_embed_dim
    flops += 2 * (tok["video"] + tok["reference"]) * cfg.patch_dim * cfg.video_dim  # patch embed
    flops += 2 * tok["video"] * cfg.video_dim * cfg.patch_dim + 2 * cfg.video_dim * 2 * cfg.video_dim  # out
    flops += 2 * tok["text"] * e * cfg.text_dim  # caption projection
    flops += 2 * (tok["text"] + 1) * e * 2 * e + 2 * e * e + 2 * e * cfg.video_dim  # text pool
    flops += 2 * (cfg.time_embed_dim * cfg.video_dim + cfg.video_dim**2)  # timestep MLP
    if cfg.use_audio:
        flops += 2 * tok["audio"] * cfg.audio_feature_dim * cfg.audio_dim
    return int(flops)


def count_flops(cfg: ModelConfig, shapes: Mapping[str, int]) -> int:
    """Analytic train FLOPs per sample: forward + backward = 3 x forward."""
    return 3 * forward_flops(cfg, shapes)


def describe(cfg: ModelConfig, shapes: Mapping[str, int]) -> dict[str, Any]:
    params = count_params(cfg)
    tm = cfg.frame_map
    return {
        "time_map": {"rule": tm.rule, "audio_frames": shapes["audio_frames"],
                     "latent_frames_of_audio": tm.latent_count(shapes["audio_frames"])},
        "params": params,
        "params_without_audio": params["total"] - params["audio"],
        "tokens": count_tokens(cfg, shapes),
        "forward_flops_per_sample": forward_flops(cfg, shapes),
        "train_flops_per_sample": count_flops(cfg, shapes),
    }


def describe_buckets(cfg: ModelConfig, shapes: Mapping[str, int], source: str,
                     listed: str = "") -> dict[str, Any] | None:
    """{bucket name: its latent shape, tokens and train FLOPs per sample (and records)} of a data source prepared as
    shape buckets (data_pipeline/buckets.py: each bucket's clip shapes replace `shapes`' clip fields), else of the
    buckets the config lists (`listed`: data.buckets, audio frames from the time map); None when neither has any."""
    entries = None
    if source and source != "synthetic":
        from data_pipeline.dataset.manifest import read_buckets_manifest

        top = read_buckets_manifest(source)
        entries = top and top["buckets"]
    if entries is None and listed:
        from mirage_jax.run_config import parse_buckets

        entries = [{"name": name, "latent_frames": t, "latent_height": h, "latent_width": w,
                    "audio_frames": cfg.frame_map.frames_for_latents(t)} for name, (t, h, w) in parse_buckets(listed)]
    if not entries:
        return None
    out = {}
    for e in entries:
        sd = {**shapes, **{k: e[k] for k in ("latent_frames", "latent_height", "latent_width", "audio_frames")}}
        out[e["name"]] = {"latent": [sd["latent_frames"], sd["latent_height"], sd["latent_width"]],
                          "tokens": count_tokens(cfg, sd)["total"], "train_flops_per_sample": count_flops(cfg, sd)}
        if "num_records" in e:
            out[e["name"]]["records"] = e["num_records"]
    return out


def source_problem(source: str) -> str | None:
    """Why `source` (data.source) names no prepared dataset, as the loader words it (`shards.dataset_dirs`: no
    such path or no file matches; `manifest.read_manifest`: no or a broken manifest.json), or None: it does, or
    it is '' / 'synthetic'."""
    if not source or source == "synthetic":
        return None
    from data_pipeline.dataset.manifest import read_buckets_manifest, read_manifest
    from data_pipeline.loader.shards import dataset_dirs

    try:
        for d in dataset_dirs(source)[0]:
            if read_buckets_manifest(d) is None:
                read_manifest(d)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    from mirage_jax.run_config import RunConfig

    cfg = flags.FLAGS.config
    run = RunConfig.from_config(cfg)  # ConfigError (one line, exit 2) for a bad field, e.g. --config.shapes.*
    mcfg, shapes = run.model, run.shapes
    info = describe(mcfg, dataclasses.asdict(shapes))
    data = cfg.get("data", {})
    problem = source_problem(data.get("source", ""))
    if problem:  # the counts need only the config: answer from it, and say so in one line (stderr: --json parses)
        also = " and data.buckets" if data.get("buckets", "") else ""
        print(f"describe: --config.data.source: {problem}; counted the config's shapes{also} instead",
              file=sys.stderr, flush=True)
    buckets = describe_buckets(mcfg, dataclasses.asdict(shapes), "" if problem else data.get("source", ""),
                               data.get("buckets", ""))
    if buckets is not None:
        info["buckets"] = buckets
    if flags.FLAGS.json:
        print(json.dumps(info))
        return
    p, t = info["params"], info["tokens"]
    print(f"parameters: {p['total']:,} total ({info['params_without_audio']:,} without the audio stream)")
    for k in ("video", "text", "audio", "conditioning"):
        print(f"  {k:<13} {p[k]:>16,}")
    print("tokens per sample: " + ", ".join(f"{k} {v:,}" for k, v in t.items()))
    print(f"train FLOPs per sample: {info['train_flops_per_sample']:.4e}")
    tm = info["time_map"]
    note = "" if tm["latent_frames_of_audio"] == shapes.latent_frames else (
        f" (but shapes.latent_frames={shapes.latent_frames}: set --config.shapes.latent_frames="
        f"{tm['latent_frames_of_audio']})")
    print(f"time map {tm['rule']}: {tm['audio_frames']} frames -> {tm['latent_frames_of_audio']} latent frames{note}")
    for name, b in (buckets or {}).items():
        t, h, w = b["latent"]
        records = f", {b['records']} records" if "records" in b else ""
        print(f"shape bucket {name}: latent {t}x{h}x{w}{records}, {b['tokens']:,} tokens and "
              f"{b['train_flops_per_sample']:.4e} train FLOPs per sample")


def _run() -> None:
    from absl import flags
    from ml_collections import config_flags

    from mirage_base.cli import run

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mirage_10b.py", lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.mark_flags_as_required(["config"])
    run(main, "describe")


if __name__ == "__main__":
    _run()
