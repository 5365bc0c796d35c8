"""Held-out evaluation of a checkpoint: lip-sync of generated videos against floor and ceiling, and the
flow-matching loss at fixed noise levels.

- `sync_generated`: generated videos (held-out speech, caption and reference frame of each held-out clip)
  against their own speech's mouth track; mean over clips, then mean and spread over sampling seeds.
- `sync_shuffled` (the floor): the SAME generated videos against another clip's speech track.
- `sync_real` (the ceiling): the real held-out clips (decoded from their latents) against their speech.
- `offset_frames`: median audio-video offset of the generated videos (0 is in sync), with its confidence.
- `heldout_loss`: the velocity MSE at fixed noise levels with fixed noise and no condition dropout, so two
  checkpoints are compared on exactly the same problems.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline.errors import MirageError
from mirage_jax.diffusion.flow import model_inputs
from mirage_jax.diffusion.schedules import model_timestep
from mirage_jax.eval import lipsync
from mirage_jax.generate import Encoders, check_fit, decode_video, sample_latents
from mirage_jax.inference import LoadedRun

LOSS_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
COND = ("text", "text_mask", "audio", "audio_mask", "ref", "ref_time", "ref_mask", "video_mask")


class EvalError(MirageError, ValueError):
    """The held-out data does not fit the checkpoint; the message names what and where."""

    exit_code = 2


@dataclasses.dataclass
class EvalSettings:
    clips: int = 8
    seeds: int = 3
    steps: int = 16
    cfg_audio: float = 2.0
    cfg_text: float = 1.0
    schedule: str = "constant"
    max_offset: int = 8
    batch_size: int = 8


def read_heldout(data: str, clips: int, encs: Encoders) -> dict[str, np.ndarray]:
    """The first `clips` full-length held-out clips with a true mouth track, as one batch (shard order)."""
    from data_pipeline import manifest as mf
    from data_pipeline.loader import make_loader
    from mirage_jax.generate import dataset_dir

    held_manifest = mf.read_manifest(dataset_dir(data))
    for kind in ("video", "audio", "text"):
        want, got = encs.manifest["encoders"][kind], held_manifest["encoders"][kind]
        if want != got:
            raise EvalError(f"{data}: its {kind} encoder {got['name']} v{got['version']} {got['params']} is not the "
                            f"one the model was trained with ({want['name']} v{want['version']} {want['params']}); "
                            "prepare the held-out data with the same encoder flags")
    loader = make_loader(data, global_batch_size=1, shuffle=False, num_epochs=1, random_crop=False, worker_count=0,
                         process_index=0, process_count=1, slow_batch_warn_s=0)
    rows = []
    for ex in loader:
        if bool(ex["mouth_valid"][0]) and bool(np.all(ex["video_mask"][0])):
            rows.append({k: np.asarray(v[0]) for k, v in ex.items()})
        if len(rows) == clips:
            break
    if len(rows) < 2:
        raise EvalError(f"{data}: {len(rows)} full-length clips with a mouth track; the lip-sync floor needs at "
                        "least 2 (synthesize more held-out clips)")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def heldout_loss(run: LoadedRun, batch: dict[str, np.ndarray], seed: int = 0) -> dict[float, float]:
    """Velocity MSE over valid latent frames at each of LOSS_LEVELS (fixed noise, nothing dropped)."""
    x0 = jnp.asarray(batch["video"], jnp.float32)
    noise = jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32)
    cond = {k: jnp.asarray(batch[k]) for k in COND}
    fmask = cond["video_mask"].astype(jnp.float32)[:, :, None, None, None]
    graphdef, state = nnx.split(run.model)

    @jax.jit
    def loss_at(t: jax.Array, state: Any) -> jax.Array:
        model = nnx.merge(graphdef, state)
        xt = (1.0 - t) * x0 + t * noise
        ts = jnp.full((x0.shape[0],), model_timestep(t))
        pred = model(xt, ts, cond["text"], cond["text_mask"], **model_inputs(cond))
        err = jnp.square(pred - (x0 - noise)) * fmask
        return jnp.sum(err) / (jnp.sum(fmask) * x0.shape[2] * x0.shape[3] * x0.shape[4])

    return {t: float(loss_at(jnp.float32(t), state)) for t in LOSS_LEVELS}


def _mean_std(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, np.float64)
    return float(a.mean()), float(a.std())


def evaluate(run: LoadedRun, encs: Encoders, data: str, settings: EvalSettings,
             progress: bool = True, keep_frames: bool = False) -> dict[str, Any]:
    """The held-out report (see module docstring); `keep_frames` adds the generated frames under `_frames`."""
    check_fit(run.model_config, encs)
    batch = read_heldout(data, settings.clips, encs)
    n = batch["video"].shape[0]
    frames_n = batch["mouth"].shape[1]  # 25 fps frames (one mouth value per video frame)
    truth = [batch["mouth"][i] for i in range(n)]
    real = [lipsync.sync_frames(decode_video(batch["video"][i], encs, frames_n), truth[i], settings.max_offset)
            for i in range(n)]
    gen_scores, shuf_scores, offsets, confs, kept = [], [], [], [], []
    for s in range(settings.seeds):
        lat = np.concatenate([
            sample_latents(run, {k: v[j : j + settings.batch_size] for k, v in batch.items()},
                           (min(settings.batch_size, n - j), *batch["video"].shape[1:]), steps=settings.steps,
                           cfg_audio=settings.cfg_audio, cfg_text=settings.cfg_text, schedule=settings.schedule,
                           seed=1000 * s + j, progress=progress, desc=f"eval seed {s}")
            for j in range(0, n, settings.batch_size)])
        tracks = []
        for i in range(n):
            frames = decode_video(lat[i], encs, frames_n)
            tracks.append(lipsync.mouth_opening(frames))
            if keep_frames:
                kept.append(frames)
        per = [lipsync.sync(tracks[i], truth[i], settings.max_offset) for i in range(n)]
        gen_scores.append(float(np.mean([p.score for p in per])))
        offsets += [p.offset for p in per]
        confs += [p.confidence for p in per]
        # floor: the same videos against other clips' speech (a derangement that changes with the seed)
        shift = 1 + s % (n - 1)
        shuf_scores.append(float(np.mean([lipsync.pearson(tracks[i], truth[(i + shift) % n]) for i in range(n)])))
    g, g_sd = _mean_std(gen_scores)
    f, f_sd = _mean_std(shuf_scores)
    r, r_sd = _mean_std([x.score for x in real])
    losses = heldout_loss(run, batch)
    out: dict[str, Any] = {
        "sync_generated": g, "sync_generated_std": g_sd, "sync_generated_per_seed": gen_scores,
        "sync_shuffled": f, "sync_shuffled_std": f_sd, "sync_shuffled_per_seed": shuf_scores,
        "sync_real": r, "sync_real_std": r_sd,
        "gap_closed": (g - f) / (r - f) if r - f > 1e-9 else float("nan"),
        "offset_frames": int(np.median(offsets)), "offset_confidence": float(np.mean(confs)),
        "offset_real_frames": int(np.median([x.offset for x in real])),
        "heldout_loss": float(np.mean(list(losses.values()))),
        "heldout_loss_per_level": {f"{t:.1f}": v for t, v in losses.items()},
        "clips": n, "seeds": settings.seeds, "steps": settings.steps, "cfg_audio": settings.cfg_audio,
        "cfg_text": settings.cfg_text, "checkpoint_step": run.step, "weights": run.weights,
    }
    if keep_frames:
        out["_frames"] = kept
    return out
