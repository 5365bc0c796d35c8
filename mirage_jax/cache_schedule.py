"""The per-checkpoint MagCache skip schedule: calibrate it from one sample, write it, read it back for sampling.

    schedule = calibrate(run, cond, latent_shape, settings)          # one uncached sample, per-step norms
    schedule.write(default_path(run))                                 # WORKDIR/cache_schedule.json
    schedule = read_schedule(path, run, steps=64)                     # refused (one line) for another checkpoint

The file (JSON) holds the steps, threshold, max skips, retention, the skip mask, the measured magnitude ratios,
the guidance it was calibrated with, and the checkpoint's identity: its step and a SHA-256 over every parameter
leaf's name, shape, dtype and first and last 64 values (`params_fingerprint`), so a schedule calibrated for one
checkpoint is never applied to another. The PyTorch export's sampling loop reads the same file (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mirage_base.batch_keys import CONDITION_KEYS
from mirage_jax.diffusion.cache import mag_skip_mask, magnitude_ratios, velocity_norms
from mirage_jax.diffusion.sampler import model_velocity_fn
from mirage_jax.inference import LoadedRun
from mirage_jax.run_encoders import GenerateError
from mirage_jax.sampling import SamplingSettings

FILE_NAME = "cache_schedule.json"
FORMAT = 1


class CacheScheduleError(GenerateError):
    """A cache schedule file that cannot be used: missing, unreadable, or for another checkpoint or step count."""


def params_fingerprint(model: Any) -> str:
    """SHA-256 (hex) over every parameter leaf's path, shape, dtype and first and last 64 values (raw bytes), in
    path order: cheap for any model size, different for any two trainings or steps in practice."""
    from flax import nnx

    h = hashlib.sha256()
    leaves = sorted(((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))
                     if hasattr(v, "shape")), key=lambda kv: kv[0])
    for name, v in leaves:
        flat = jnp.ravel(v)
        head = np.asarray(jax.device_get(flat[:64]))
        tail = np.asarray(jax.device_get(flat[-64:]))
        h.update(f"{name}|{tuple(v.shape)}|{v.dtype}|".encode())
        h.update(head.tobytes())
        h.update(tail.tobytes())
    return h.hexdigest()


def checkpoint_identity(run: LoadedRun) -> dict[str, Any]:
    """{"step", "weights" ('params' | 'ema'), "params_sha256"} of a restored run."""
    return {"step": int(run.step), "weights": run.weights, "params_sha256": params_fingerprint(run.model)}


def default_path(run: LoadedRun) -> epath.Path:
    """WORKDIR/cache_schedule.json for a step folder WORKDIR/checkpoints/STEP (else beside the step folder)."""
    parent = run.step_dir.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / FILE_NAME


def _describe(identity: dict[str, Any]) -> str:
    return f"step {identity.get('step')} ({identity.get('weights')}, params {str(identity.get('params_sha256'))[:12]})"


@dataclasses.dataclass(frozen=True)
class CacheSchedule:
    """A calibrated MagCache schedule (see the module docstring for the file's fields)."""

    steps: int
    threshold: float
    max_skips: int
    retention: float
    skip: tuple[bool, ...]
    ratios: tuple[float, ...]
    checkpoint: dict[str, Any]
    calibration: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"], d["ratios"] = list(self.skip), [round(r, 8) for r in self.ratios]
        return {"format": FORMAT, **d, "skipped_steps": int(sum(self.skip))}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheSchedule:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: d[k] for k in fields}
        values["skip"] = tuple(bool(s) for s in values["skip"])
        values["ratios"] = tuple(float(r) for r in values["ratios"])
        return cls(**values)

    def write(self, path: str | os.PathLike) -> None:
        """Written whole or not at all (temporary file + rename)."""
        dst = epath.Path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".tmp-{dst.name}"
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(dst)


def read_schedule(path: str | os.PathLike, run: LoadedRun | None = None, steps: int | None = None,
                  identity: dict[str, Any] | None = None) -> CacheSchedule:
    """The schedule at `path`, checked against the run's checkpoint (or a given `identity`) and step count;
    CacheScheduleError (one line naming both) when it was calibrated for something else."""
    p = epath.Path(path)
    if not p.exists():
        raise CacheScheduleError(f"--cache_schedule={p}: no such file; write it first with "
                                 "`python -m mirage_jax.generate --calibrate_cache ...`")
    try:
        d = json.loads(p.read_text())
        sched = CacheSchedule.from_json(d)
    except (ValueError, KeyError, TypeError) as e:
        raise CacheScheduleError(f"--cache_schedule={p}: not a cache schedule ({type(e).__name__}: {e})") from e
    if identity is None and run is not None:
        identity = checkpoint_identity(run)
    if identity is not None and sched.checkpoint != identity:
        raise CacheScheduleError(f"--cache_schedule={p} was calibrated for checkpoint {_describe(sched.checkpoint)}, "
                                 f"not for this one, {_describe(identity)}: recalibrate with --calibrate_cache")
    if steps is not None and sched.steps != steps:
        raise CacheScheduleError(f"--cache_schedule={p} was calibrated for {sched.steps} steps, not {steps}: "
                                 "recalibrate with --calibrate_cache --steps=" + str(steps))
    return sched


def calibrate(run: LoadedRun, cond: dict[str, np.ndarray], latent_shape: tuple[int, ...],
              settings: SamplingSettings, *, threshold: float = 0.06, max_skips: int = 2, retention: float = 0.2,
              seed: int | None = None) -> CacheSchedule:
    """One uncached sample (unsharded, the run's model and `cond`) with the per-step velocity norms -> the
    magnitude ratios -> `diffusion.cache.mag_skip_mask`."""
    noise = jax.random.normal(jax.random.key(settings.seed if seed is None else seed), latent_shape, jnp.float32)
    c = {k: jnp.asarray(np.asarray(v)) for k, v in cond.items() if k in CONDITION_KEYS}
    fn, state = model_velocity_fn(run.model, c)

    def go(x, st):
        return velocity_norms(fn, x, steps=settings.steps, threshold=run.diffusion_config.lq_threshold,
                              cfg_text=settings.cfg_text, cfg_audio=settings.cfg_audio, schedule=settings.schedule,
                              state=st)

    _, norms = jax.jit(go)(noise, state)
    ratios = magnitude_ratios(np.asarray(jax.device_get(norms)))
    skip = mag_skip_mask(ratios, threshold, max_skips, retention)
    return CacheSchedule(steps=settings.steps, threshold=threshold, max_skips=max_skips, retention=retention,
                         skip=skip, ratios=tuple(ratios), checkpoint=checkpoint_identity(run),
                         calibration={"cfg_text": settings.cfg_text, "cfg_audio": settings.cfg_audio,
                                      "schedule": settings.schedule, "seed": settings.seed if seed is None else seed,
                                      "latent_shape": list(latent_shape)})


def apply_cache(run: LoadedRun, settings: SamplingSettings, cache: str,
                schedule: str | None) -> tuple[SamplingSettings, str | None]:
    """`settings` with `--cache` applied, and the schedule file read for the 'mag' modes (its path; None for the
    others); a schedule for another checkpoint or step count is refused with one line (`read_schedule`)."""
    if "mag" not in cache:
        return dataclasses.replace(settings, cache=cache), None
    path = schedule or os.fspath(default_path(run))
    sched = read_schedule(path, run, steps=settings.steps)
    now = {"cfg_text": settings.cfg_text, "cfg_audio": settings.cfg_audio, "schedule": settings.schedule}
    then = {k: sched.calibration.get(k) for k in now}
    if then != now:
        print(f"note: {path} was calibrated with guidance {then}, this run samples with {now}; the skip mask "
              "still applies, but recalibrate (--calibrate_cache) for the best one")
    return dataclasses.replace(settings, cache=cache, skip=sched.skip), os.fspath(path)
