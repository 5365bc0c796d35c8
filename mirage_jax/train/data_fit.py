"""Does the config fit the prepared dataset it trains on? Checked from manifest.json before anything compiles.

The clip shapes (latent T/H/W and channels, audio frames and feature size, text length and width) and the
frame-to-latent time map are facts of the data (data_pipeline.prepare writes them to manifest.json); the
config must agree, or the run stops here with every mismatch and the exact `--config.` overrides that fix
it, so nobody computes latent counts by hand. Training on a shorter window than the prepared clips is
allowed when it is a whole clip of the time map (the loader crops on latent boundaries). A dataset of shape buckets
(data_pipeline/buckets.py) sets the clip shapes per bucket; the model fields must fit every bucket.
"""

from __future__ import annotations

from typing import Any

from mirage_base.time_map import of_manifest
from mirage_jax.config import ConfigError
from mirage_jax.run_config import RunConfig


def manifest_shapes(manifest: dict[str, Any]) -> dict[str, Any]:
    """The config values a dataset implies, keyed by config field (`shapes.latent_frames`, `model.time_map`, ...)."""
    tm = of_manifest(manifest)
    keys = manifest["keys"]
    _, h, w, c = keys["video"]["shape"]
    latents = tm.latent_count(int(manifest["clip_frames"]))
    return {
        "model.time_map": tm.rule,
        "shapes.latent_frames": latents,
        "shapes.audio_frames": tm.frames_for_latents(latents),
        "shapes.latent_height": h,
        "shapes.latent_width": w,
        "model.latent_channels": c,
        "model.audio_feature_dim": keys["audio"]["shape"][1],
        "shapes.text_len": keys["text"]["shape"][0],
        "model.text_embed_dim": keys["text"]["shape"][1],
    }


def mismatches(cfg: RunConfig, manifest: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(config field, config value, the value the data needs) for every disagreement."""
    want = manifest_shapes(manifest)
    tm = of_manifest(manifest)

    def get(field: str) -> Any:
        section, name = field.split(".")
        return getattr(getattr(cfg, section), name)

    out = []
    for field, need in want.items():
        have = get(field)
        if need is None:  # clips of different sizes: the loader pads, nothing to compare
            continue
        if field == "model.audio_feature_dim" and not cfg.model.use_audio:
            continue  # a Mochi-only network never reads the audio features
        if field == "shapes.audio_frames":  # a shorter window is fine if it is a whole clip of the map
            a = have
            if 0 < a <= need and tm.covered_frames(a) == a:
                continue
        elif field == "shapes.latent_frames":
            a = get("shapes.audio_frames")
            if 0 < a <= want["shapes.audio_frames"] and have == tm.latent_count(a):
                continue
        elif str(have) == str(need):
            continue
        out.append((field, have, need))
    if cfg.model.max_text_len < want["shapes.text_len"]:
        out.append(("model.max_text_len", cfg.model.max_text_len, want["shapes.text_len"]))
    return out


def check(cfg: RunConfig, verify_shards: bool = False) -> None:
    """Raise ConfigError (one line: every mismatch, then the overrides) unless `cfg` fits
    `cfg.data.source`. `verify_shards`: also check every shard against manifest.json at
    `data.verify` (sha256 on local disk), so a damaged or missing shard is one DATA ERROR line (ShardError,
    exit 2) naming it and its first unreadable record, before any state is built or restored (the loader
    built later reuses the digests)."""
    source = cfg.data.source
    if source == "synthetic":
        return
    from data_pipeline.loader.buckets import read_buckets
    from data_pipeline.loader.shards import resolve_shards

    level = cfg.data.verify if verify_shards else "none"
    buckets = read_buckets(source, level)
    if buckets is None:
        bad = mismatches(cfg, resolve_shards(source, verify=level).manifest)
    else:  # shape buckets: the clip shapes are each bucket's own (train.shape_buckets); the model must fit them all
        from mirage_jax.train.shape_buckets import parse_bucket_batch

        bad = []
        p, left_out = cfg.model.patch_size, {n for n, v in parse_bucket_batch(cfg.data.bucket_batch).items() if v == 0}
        for b in buckets:
            bad += [m for m in mismatches(cfg, b.shards.manifest) if not m[0].startswith("shapes.") and m not in bad]
            got = manifest_shapes(b.shards.manifest)
            h, w = got["shapes.latent_height"], got["shapes.latent_width"]
            if (h % p or w % p) and b.name not in left_out:  # else caught once the buckets before it compiled
                raise ConfigError(
                    f"data.source={source}: bucket {b.name} has latent {h}x{w} (height x width), not a multiple of "
                    f"model.patch_size={p}; prepare it at a --size whose latent height and width are (or leave it out: "
                    f"--config.data.bucket_batch={b.name}=0)")
    if bad:
        what = "; ".join(f"{f}={have} but the data has {need}" for f, have, need in bad)
        fix = " ".join(f"--config.{f}={need}" for f, _, need in bad)
        raise ConfigError(
            f"the config does not fit data.source={source} (its manifest.json): {what}. Rerun with: {fix}"
        )
