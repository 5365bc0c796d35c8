"""Held-out evaluation of a checkpoint: lip-sync of generated videos against floor and ceiling, and the
flow-matching loss at fixed noise levels.

- `sync_generated`: generated videos (held-out speech, caption and reference frame of each held-out clip)
  against their own speech's mouth track; mean over clips, then mean and spread over sampling seeds.
- `sync_shuffled` (the floor): the SAME generated videos against another clip's speech track.
- `sync_real` (the ceiling): the real held-out clips (decoded from their latents) against their speech.
- `offset_frames`: median audio-video offset of the generated videos (0 is in sync), with its confidence.
- `heldout_loss`: `diffusion.flow.flow_matching_loss` at fixed noise levels with fixed noise and no condition
  dropout, so two checkpoints are compared on exactly the same problems. On a dataset of shape buckets
  (data_pipeline/buckets.py): `heldout_loss_per_bucket` {name: loss, per level, clips} on each bucket's first
  clips, `heldout_loss` their mean with every clip weighing the same; lip-sync on the bucket generate's window
  is (the longest clip of the first size).

- `lse_*` (with a SyncNet scorer, `mirage_jax.eval --syncnet-weights`): SyncNet's LSE-C / LSE-D of the same
  three (generated, shuffled floor, real ceiling; mirage_jax.eval.lse), for any footage with speech.

Lip-sync needs clips with a true mouth track (the `mouth` of synthetic clips' sidecars); held-out footage
without one (real footage) still gets its loss, with the lip-sync keys null and `skipped` saying why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_base.batch_keys import BATCH_KEYS, STREAMS
from mirage_base.errors import ExitCode, MirageError
from mirage_jax.diffusion.flow import fixed_draws, flow_matching_loss
from mirage_jax.eval import lipsync
from mirage_jax.inference import LoadedRun
from mirage_jax.run_encoders import Encoders, check_fit, dataset_dir, decode_video
from mirage_jax.sampling import SamplingSettings, sample_latents

LOSS_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
MIN_SYNC_CLIPS = 2  # the floor scores each video against another clip's speech
SYNC_KEYS = ("sync_generated", "sync_generated_std", "sync_generated_per_seed", "sync_shuffled", "sync_shuffled_std",
             "sync_shuffled_per_seed", "sync_real", "sync_real_std", "gap_closed", "offset_frames",
             "offset_confidence", "offset_real_frames")


class EvalError(MirageError, ValueError):
    """The held-out data does not fit the checkpoint; the message names what and where."""

    exit_code = ExitCode.REFUSED


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The held-out clips evaluated, as one batch (`LOADER_KEYS`, shard order), and why lip-sync cannot be
    scored on them (None: it can)."""

    batch: dict[str, np.ndarray]
    lipsync_skipped: str | None = None
    indices: tuple[int, ...] = ()  # each row's record position in shard order (SyncNet re-reads its speech)


def read_heldout(data: str, clips: int, encs: Encoders) -> HeldOut:
    """The first `clips` full-length held-out clips with a true mouth track. When fewer than MIN_SYNC_CLIPS
    have one, the first `clips` clips of any kind (padded frames are masked out of the loss), for the loss alone."""
    from data_pipeline.dataset import manifest as mf
    from data_pipeline.loader.grain_loader import make_loader

    held_manifest = mf.read_manifest(dataset_dir(data))
    for kind in STREAMS:
        # the encoder itself; its feature_shape follows the frame size (buckets of other sizes, same encoder)
        want, got = ({k: v for k, v in m["encoders"][kind].items() if k != "feature_shape"}
                     for m in (encs.manifest, held_manifest))
        if want != got:
            raise EvalError(f"{data}: its {kind} encoder {got['name']} v{got['version']} {got['params']} is not the "
                            f"one the model was trained with ({want['name']} v{want['version']} {want['params']}); "
                            "prepare the held-out data with the same encoder flags")
    loader = make_loader(data, global_batch_size=1, shuffle=False, num_epochs=1, random_crop=False, worker_count=0,
                         process_index=0, process_count=1, slow_batch_warn_s=0)
    synced, first, synced_at, first_at = [], [], [], []
    for n, ex in enumerate(loader):
        row = {k: np.asarray(v[0]) for k, v in ex.items()}
        if len(first) < clips:
            first.append(row)
            first_at.append(n)
        if bool(row["mouth_valid"]) and bool(np.all(row["video_mask"])):
            synced.append(row)
            synced_at.append(n)
        if len(synced) == clips:
            break
    if len(synced) >= MIN_SYNC_CLIPS:
        return HeldOut(_stack(synced), indices=tuple(synced_at))
    if not first:
        raise EvalError(f"{data}: no clips to evaluate")
    return HeldOut(_stack(first), indices=tuple(first_at), lipsync_skipped=(
        f"lip-sync skipped (sync_*, gap_closed, offset_* are null): {data} has {len(synced)} full-length clip(s) "
        f"with a mouth track, lip-sync needs {MIN_SYNC_CLIPS} (footage without `mouth` in its clip sidecars has "
        f"none; data_pipeline.synthesize writes it); held-out loss computed on {len(first)} clip(s)"))


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def heldout_loss(run: LoadedRun, batch: dict[str, np.ndarray], seed: int = 0) -> dict[float, float]:
    """`flow_matching_loss` (velocity MSE over valid latent frames) at each of LOSS_LEVELS, with the noise of
    `seed` and nothing dropped (`diffusion.flow.fixed_draws`)."""
    x = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    noise = jax.random.normal(jax.random.key(seed), x["video"].shape, jnp.float32)
    cfg = run.diffusion_config
    graphdef, state = nnx.split(run.model)

    @jax.jit
    def loss_at(t: jax.Array, state: Any) -> jax.Array:
        return flow_matching_loss(nnx.merge(graphdef, state), x, None, cfg, fixed_draws(t, noise))[0]

    return {t: float(loss_at(jnp.float32(t), state)) for t in LOSS_LEVELS}


def bucket_losses(run: LoadedRun, encs: Encoders, data: str, clips: int) -> dict[str, dict[str, Any]] | None:
    """The held-out loss of each bucket of a shape-bucketed dataset (data_pipeline/buckets.py), None for a
    single-shape one: {bucket name: {"loss" (mean over LOSS_LEVELS), "per_level", "clips"}}, each on the bucket's
    own first `clips` clips (`read_heldout` of its folder, so the same as pointing eval at that folder)."""
    import os

    from data_pipeline.dataset import manifest as mf

    d = dataset_dir(data)
    top = mf.read_buckets_manifest(d)
    if top is None:
        return None
    out = {}
    for e in top["buckets"]:
        held = read_heldout(os.path.join(d, e["path"]), clips, encs)
        losses = heldout_loss(run, held.batch)
        out[e["name"]] = {"loss": float(np.mean(list(losses.values()))),
                          "per_level": {f"{t:.1f}": v for t, v in losses.items()},
                          "clips": int(held.batch["video"].shape[0])}
    return out


def _mean_std(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, np.float64)
    return float(a.mean()), float(a.std())


def generate_frames(run: LoadedRun, encs: Encoders, batch: dict[str, np.ndarray], settings: SamplingSettings, *,
                    seeds: int, progress: bool, keep: Callable[[np.ndarray], Any]) -> list[list[Any]]:
    """`keep(frames)` [seed][clip] of the generated uint8 frames [frames, H, W, 3] (as many frames as the clips'
    mouth tracks) for the held-out clips' conditions; noise seed settings.seed + 1000 * seed + the clip's index.
    One seed's frames are held at a time (keep what the reports need, not the frames)."""
    n = batch["video"].shape[0]
    frames_n = batch["mouth"].shape[1]  # 25 fps frames (one mouth value per video frame)
    b = settings.batch_size
    out = []
    for s in range(seeds):
        lat = np.concatenate([
            sample_latents(run, {k: v[j : j + b] for k, v in batch.items()}, (min(b, n - j), *batch["video"].shape[1:]),
                           settings, seed=settings.seed + 1000 * s + j, progress=progress, desc=f"eval seed {s}")
            for j in range(0, n, b)])
        out.append([keep(decode_video(lat[i], encs, frames_n)) for i in range(n)])
    return out


def lipsync_report(encs: Encoders, batch: dict[str, np.ndarray], generated: list[list[np.ndarray]], *,
                   max_offset: int) -> dict[str, Any]:
    """The SYNC_KEYS of the report for clips with a mouth track, from the generated videos' mouth openings
    (`lipsync.mouth_opening`) [seed][clip]."""
    n = batch["video"].shape[0]
    frames_n = batch["mouth"].shape[1]
    truth = [batch["mouth"][i] for i in range(n)]
    real = [lipsync.sync_frames(decode_video(batch["video"][i], encs, frames_n), truth[i], max_offset)
            for i in range(n)]
    gen_scores, shuf_scores, offsets, confs = [], [], [], []
    for s, tracks in enumerate(generated):
        per = [lipsync.sync(tracks[i], truth[i], max_offset) for i in range(n)]
        gen_scores.append(float(np.mean([p.score for p in per])))
        offsets += [p.offset for p in per]
        confs += [p.confidence for p in per]
        # floor: the same videos against other clips' speech (a derangement that changes with the seed)
        shift = 1 + s % (n - 1)
        shuf_scores.append(float(np.mean([lipsync.pearson(tracks[i], truth[(i + shift) % n]) for i in range(n)])))
    g, g_sd = _mean_std(gen_scores)
    f, f_sd = _mean_std(shuf_scores)
    r, r_sd = _mean_std([x.score for x in real])
    return {
        "sync_generated": g, "sync_generated_std": g_sd, "sync_generated_per_seed": gen_scores,
        "sync_shuffled": f, "sync_shuffled_std": f_sd, "sync_shuffled_per_seed": shuf_scores,
        "sync_real": r, "sync_real_std": r_sd,
        "gap_closed": (g - f) / (r - f) if r - f > 1e-9 else float("nan"),
        "offset_frames": int(np.median(offsets)), "offset_confidence": float(np.mean(confs)),
        "offset_real_frames": int(np.median([x.offset for x in real])),
    }


def syncnet_report(scorer: Any, data: str, held: HeldOut, encs: Encoders, generated: list[list[Any]], *,
                   cropped: bool) -> tuple[dict[str, Any], str | None]:
    """The LSE_KEYS (mirage_jax.eval.lse) of the held-out clips and the generated videos' face crops
    (`lse.face_crops`, or the SyncInputError a video raised) [seed][clip], or the reason they are null (fewer
    than MIN_SYNC_CLIPS clips, no readable speech, a video SyncNet cannot score)."""
    from mirage_jax.eval.lse import face_crops, heldout_waves, lse_report
    from mirage_jax.eval.sync import SyncInputError

    n = held.batch["video"].shape[0]
    if n < MIN_SYNC_CLIPS:
        return {}, f"LSE skipped: {n} held-out clip(s), the shuffled-audio floor needs {MIN_SYNC_CLIPS}"
    frames_n = held.batch["mouth"].shape[1]
    waves = heldout_waves(data, list(held.indices), frames_n)
    if isinstance(waves, str):
        return {}, waves
    try:
        bad = next((e for videos in generated for e in videos if isinstance(e, Exception)), None)
        if bad is not None:
            raise bad
        real = [face_crops(decode_video(held.batch["video"][i], encs, frames_n), cropped) for i in range(n)]
        return lse_report(scorer, generated, real, waves), None
    except SyncInputError as e:
        return {}, f"LSE skipped: {e}" + ("" if cropped else " (pass --syncnet-cropped if the clips are face crops)")


def evaluate(run: LoadedRun, encs: Encoders, data: str, settings: SamplingSettings, *, clips: int = 8,
             seeds: int = 3, max_offset: int = 8, progress: bool = True, keep_frames: bool = False,
             syncnet: Any = None, syncnet_cropped: bool = True) -> dict[str, Any]:
    """The held-out report (see module docstring) on the first `clips` held-out clips, lip-sync over `seeds`
    sampling seeds (noise seed settings.seed + 1000 * seed + the clip's index) and offsets up to `max_offset`
    frames; `skipped` is None or the one line saying which metric was not computed and why. `keep_frames`
    adds the generated frames under `_frames`. `syncnet` (a mirage_jax.eval.sync.Scorer) adds SyncNet's
    LSE-C / LSE-D (mirage_jax.eval.lse.LSE_KEYS; null without it), on face crops when `syncnet_cropped`, else on
    detected faces."""
    from mirage_jax.eval.lse import LSE_KEYS, face_crops
    from mirage_jax.eval.sync import SyncInputError

    check_fit(run.model_config, encs)
    per_bucket = bucket_losses(run, encs, data, clips)
    if per_bucket is not None:  # shape buckets: lip-sync on the clips generate's window is (the longest length)
        import os

        from data_pipeline.dataset import manifest as mf
        from mirage_jax.run_encoders import window_bucket

        d = dataset_dir(data)
        data = os.path.join(d, window_bucket(mf.read_buckets_manifest(d))["path"])
    held = read_heldout(data, clips, encs)
    out: dict[str, Any] = dict.fromkeys(SYNC_KEYS + LSE_KEYS)
    skipped = [held.lipsync_skipped] if held.lipsync_skipped else []
    mouths = held.lipsync_skipped is None

    def keep(frames: np.ndarray) -> dict[str, Any]:
        kept = {"mouth": lipsync.mouth_opening(frames) if mouths else None, "frames": frames if keep_frames else None}
        if syncnet is not None:
            try:
                kept["crops"] = face_crops(frames, syncnet_cropped)
            except SyncInputError as e:
                kept["crops"] = e
        return kept

    generated: list[list[dict[str, Any]]] = []
    if mouths or syncnet is not None:
        generated = generate_frames(run, encs, held.batch, settings, seeds=seeds, progress=progress, keep=keep)
    if mouths:
        out.update(lipsync_report(encs, held.batch, [[v["mouth"] for v in g] for g in generated],
                                  max_offset=max_offset))
    if syncnet is not None:
        lse, why = syncnet_report(syncnet, data, held, encs, [[v["crops"] for v in g] for g in generated],
                                  cropped=syncnet_cropped)
        out.update(lse)
        skipped += [why] if why else []
    if per_bucket is None:
        losses = heldout_loss(run, held.batch)
    else:  # every bucket's clips, each clip weighing the same
        n = sum(b["clips"] for b in per_bucket.values())
        losses = {t: sum(b["per_level"][f"{t:.1f}"] * b["clips"] for b in per_bucket.values()) / n
                  for t in LOSS_LEVELS}
        out["heldout_loss_per_bucket"] = per_bucket
    out.update({
        "heldout_loss": float(np.mean(list(losses.values()))),
        "heldout_loss_per_level": {f"{t:.1f}": v for t, v in losses.items()},
        "clips": int(held.batch["video"].shape[0]), "seeds": seeds, "steps": settings.steps,
        "cfg_audio": settings.cfg_audio, "cfg_text": settings.cfg_text, "cache": settings.cache,
        "checkpoint_step": run.step, "weights": run.weights, "skipped": "; ".join(skipped) or None,
    })
    if keep_frames:
        out["_frames"] = [v["frames"] for videos in generated for v in videos]
    return out
