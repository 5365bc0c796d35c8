"""Warm start: a Mochi (diffusers layout) transformer -> the step-0 checkpoint of a Mirage run.

Mapped tensors stream slice by slice into their target shardings (`mapping.py`). Parameters Mochi lacks
(the audio stream) are initialized so that:
- with audio and reference tokens absent, Mirage computes exactly what Mochi computes (they never enter
  the computation), and
- with audio present training starts from a stable point: every audio value projection starts at zero,
  so at step 0 audio tokens carry no content into the video stream (they only take a share of the
  softmax mass), and the audio stream's adaLN gates start at zero (its residual branch is the identity).
  The audio RoPE time frequencies start as a copy of Mochi's learned video time frequencies, so an audio
  frame and the latent frame covering it start with the same rotary phase.
Everything else (optimizer moments, EMA = the initial parameters, counters) is what a fresh run has.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from mirage_base.errors import ExitCode, MirageError
from mirage_jax.checkpoint_format import CHECKPOINTS, config_to_dict, flatten, replace_leaves
from mirage_jax.config import DiffusionConfig, ModelConfig
from mirage_jax.interop.mochi import MOCHI_FIXED_FIELDS, mochi_config_to_model
from mirage_jax.warm_start import mapping
from mirage_jax.warm_start.source import TensorSource

REPORT_NAME = "warm_start_report.json"


class WarmStartError(MirageError, ValueError):
    """The source does not fit the Mirage config, or the output would overwrite a run."""

    exit_code = ExitCode.REFUSED


def source_model_fields(src: TensorSource) -> dict[str, Any]:
    """The ModelConfig fields the source fixes: from its config.json, and those diffusers fixes in code."""
    try:
        fields = mochi_config_to_model(src.config)
    except ValueError as e:
        raise WarmStartError(f"{src.root / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None
    return {**fields, **{k: v for k, (v, _) in MOCHI_FIXED_FIELDS.items()}}


def derive_config(src: TensorSource) -> ml_collections.ConfigDict:
    """A full Mirage config from the source's config.json with the default audio-stream settings."""
    from mirage_jax.run_config import base_config, clip_shapes

    cfg = base_config()
    model = {f: getattr(ModelConfig(), f) for f in ModelConfig.__dataclass_fields__}
    model.update(source_model_fields(src))
    cfg.model = ml_collections.ConfigDict(model)
    cfg.shapes = ml_collections.ConfigDict(clip_shapes(4, ModelConfig.time_map, latent_height=160, latent_width=90,
                                                       text_len=256))  # configs/mirage_10b.py's 4 s 720p clips
    cfg.diffusion = ml_collections.ConfigDict(
        {f: getattr(DiffusionConfig(), f) for f in DiffusionConfig.__dataclass_fields__})
    return cfg


def check_dimensions(src: TensorSource, model: ModelConfig) -> None:
    """Every model field the source fixes must equal the Mirage config's, shape or not (a head count of the text
    pool changes no tensor shape but the function computed); lists all that differ (WarmStartError, exit 2)."""
    derived = source_model_fields(src)
    diffs = []
    for k, v in derived.items():
        have = getattr(model, k)
        if have != v:
            why = (f"diffusers' MochiTransformer3DModel fixes {v!r} ({MOCHI_FIXED_FIELDS[k][1]})"
                   if k in MOCHI_FIXED_FIELDS else f"{src.root / 'config.json'} implies {v!r}")
            diffs.append(f"model.{k}: config has {have!r}, {why}")
    if diffs:
        raise WarmStartError("the Mirage config does not match the source model:\n  " + "\n  ".join(diffs)
                             + "\nFix these fields (or omit --config to derive the config from the source).")


def warm_start(source: str, cfg: ml_collections.ConfigDict | None, out: str, *, allow_partial: bool = False
               ) -> dict[str, Any]:
    """Write the step-0 checkpoint into workdir `out`; returns the report (also saved as JSON). The mesh, rules,
    optimizer and state layout are the training run's own (`train.setup.RunSetup` of `cfg`)."""
    from mirage_jax.train import checkpoint as ckpt_lib
    from mirage_jax.train.setup import RunSetup

    src = TensorSource(source)
    if cfg is None:
        cfg = derive_config(src)
    setup = RunSetup(cfg)  # ConfigError naming a bad field, before anything is read
    check_dimensions(src, setup.mcfg)
    mcfg, mesh, layout = setup.mcfg, setup.mesh, setup.layout
    store_dir = epath.Path(out) / CHECKPOINTS
    if store_dir.exists() and any(store_dir.iterdir()):
        raise WarmStartError(f"--out {out}: already holds checkpoints ({store_dir}); warm start writes the "
                             "first checkpoint of a new run: choose an empty workdir")

    abstract = flatten(layout.abstract.params)
    shapes = {p: tuple(a.shape) for p, a in abstract.items()}
    dtypes = {p: a.dtype for p, a in abstract.items()}
    shardings = flatten(layout.shardings.params)

    p = mapping.plan(src, mcfg, shapes)
    new = sorted(".".join(k) for k in shapes if k not in p.rows)
    report = {
        "source": str(src.root), "mapped_targets": len(p.rows), "mapped_source_tensors": len(p.mapped_sources),
        "new": new, "unused": p.unused, "missing": p.missing, "mismatched": p.mismatched,
    }
    problems = [f"{k}: {v}" for k in ("unused", "missing", "mismatched") if (v := report[k])]
    if problems and not allow_partial:
        raise WarmStartError(
            f"warm start from {src.root} is not exact (nothing was written):\n  "
            + "\n  ".join(f"{k} ({len(report[k])}): " + ", ".join(report[k][:6]) + (" ..." if len(report[k]) > 6
                                                                                    else "")
                          for k in ("unused", "missing", "mismatched") if report[k])
            + "\nPass --allow-partial to initialize what cannot be mapped and ignore unused tensors.")

    def finish(params: Any) -> Any:
        """The initial parameters with the audio stream set up as the module docstring says."""
        params = jax.tree.map(lambda x: x, params)
        if mcfg.use_audio:
            for block in ("blocks", "last_block"):
                if block in params:
                    v = params[block]["audio"]["v"]["kernel"]
                    params[block]["audio"]["v"]["kernel"] = jnp.zeros_like(v)
            if ("pos_frequencies",) in p.rows:
                params["audio_pos_frequencies"] = params["pos_frequencies"][0:1]
        return params

    with jax.set_mesh(mesh):
        mapped = mapping.build_mapped(src, p, shardings, dtypes, shapes)
        params = replace_leaves(layout.init_params(), mapped)
        state = layout.create_from(finish, params)

    store = ckpt_lib.CheckpointStore(out, setup.run_cfg.checkpoint)
    store.save(0, state, None, config_to_dict(cfg), {"warm_start": report})
    store.wait()
    store.close()
    if jax.process_index() == 0:
        (epath.Path(out) / REPORT_NAME).write_text(json.dumps(report, indent=1))
    logging.info("warm start: %d target tensors mapped from %s, %d new; checkpoint 0 in %s",
                 len(p.rows), src.root, len(new), store_dir)
    return report
