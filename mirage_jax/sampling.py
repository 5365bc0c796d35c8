"""Sampling latents from a restored run: the settings (the run's own guidance unless overridden), the
generation mesh and `sample_latents`, shared by generate and eval.

    settings = SamplingSettings.of_run(run.diffusion_config, steps=8)   # the run's cfg_audio/cfg_text/schedule
    latents = sample_latents(run, cond, (B, T, h, w, c), settings, mesh=generation_mesh())
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd as core_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mirage_base.batch_keys import CONDITION_KEYS
from mirage_jax.config import DiffusionConfig
from mirage_jax.diffusion.cache import MODES, cached_euler_sample, make_plan
from mirage_jax.diffusion.sampler import euler_sample, model_velocity_fn
from mirage_jax.inference import LoadedRun
from mirage_jax.parallel import mesh as mesh_lib
from mirage_jax.parallel import rules as rules_lib
from mirage_jax.run_config import MeshConfig

_RUN_FIELDS = {"steps": "sample_steps", "cfg_audio": "cfg_audio", "cfg_text": "cfg_text", "schedule": "cfg_schedule"}


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How generate and eval sample. Defaults are `DiffusionConfig`'s; `of_run` takes a run's own values.

    steps: Euler steps over the linear-quadratic schedule. cfg_audio / cfg_text: guidance scales (1 = none).
    schedule: 'constant' or 'cosine' guidance over noise levels. seed: of the first batch's noise (batch k
    of a call starts at seed + its first prompt's index). batch_size: prompts (clips) sampled together.
    sequence_parallel: devices that split each clip's tokens (generate). window: > 0, speech longer than
    this many 25 fps frames is generated in consecutive windows of it (generate).
    cache: 'none' | 'cfg' | 'mag' | 'cfg+mag' (diffusion/cache.py); skip: the calibrated MagCache skip mask
    (`cache_schedule.read_schedule(...).skip`), needed by the 'mag' modes.
    """

    steps: int = DiffusionConfig.sample_steps
    cfg_audio: float = DiffusionConfig.cfg_audio
    cfg_text: float = DiffusionConfig.cfg_text
    schedule: str = DiffusionConfig.cfg_schedule
    seed: int = 0
    batch_size: int = 8
    sequence_parallel: int = 1
    window: int = 0
    cache: str = "none"
    skip: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if self.cache not in MODES:
            raise ValueError(f"cache={self.cache!r}: one of {', '.join(MODES)}")
        if "mag" in self.cache and len(self.skip) != self.steps:
            raise ValueError(f"cache={self.cache!r} needs a skip mask of {self.steps} steps (a calibrated "
                             f"schedule), got {len(self.skip)}")

    @classmethod
    def of_run(cls, diffusion: DiffusionConfig, **overrides: Any) -> SamplingSettings:
        """The run's `diffusion.sample_steps / cfg_audio / cfg_text / cfg_schedule`, then every override that
        is not None (a command-line flag the user gave)."""
        values = {ours: getattr(diffusion, theirs) for ours, theirs in _RUN_FIELDS.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def generation_mesh(sequence_parallel: int = 1) -> Mesh:
    """All devices: `sequence` = `sequence_parallel`, `data` = the rest (fsdp = tensor = 1)."""
    cfg = MeshConfig(ici=dict(data=-1, fsdp=1, sequence=sequence_parallel, tensor=1),
                     dcn=dict(data=1, fsdp=1, sequence=1, tensor=1))
    cfg.validate()
    return mesh_lib.build_mesh(cfg)


def sample_latents(run: LoadedRun, cond: dict[str, np.ndarray], latent_shape: tuple[int, ...],
                   settings: SamplingSettings, *, seed: int | None = None, mesh: Mesh | None = None,
                   progress: bool = True, desc: str = "sample") -> np.ndarray:
    """Latents (B, T, H, W, C) as numpy: `diffusion.sampler.euler_sample` from the noise of `seed` (default
    `settings.seed`) with the run's model and `cond` (the `CONDITION_KEYS` of a batch; others are ignored).

    The whole sampler is one jitted loop, with a progress bar from its per-step callback. On `mesh` the batch
    is sharded on the mesh's batch axes (and tokens over `sequence`) by the run's activation rules.
    """
    act_rules: rules_lib.Rules = ()
    if mesh is not None:
        act_rules = rules_lib.normalize_rules(run.config.mesh, "activations", mesh)
    batch_axes = dict(act_rules).get("batch") if act_rules else None

    def put(x: np.ndarray) -> jax.Array:
        if mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))))

    noise = jax.random.normal(jax.random.key(settings.seed if seed is None else seed), latent_shape, jnp.float32)
    c = {k: put(np.asarray(v)) for k, v in cond.items() if k in CONDITION_KEYS}
    fn, state = model_velocity_fn(run.model, c)
    if mesh is not None:  # a model restored onto one device (load_run without a mesh) is replicated over the mesh
        devices = set(mesh.devices.flat)
        rep = NamedSharding(mesh, PartitionSpec())
        state = jax.tree.map(lambda v: v if isinstance(v, jax.Array) and v.sharding.device_set == devices
                             else jax.device_put(v, rep), state)
    with tqdm(total=settings.steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:

        plan = make_plan(settings.cache, settings.steps, settings.skip or None)

        def run_sampler(x: jax.Array, st: Any) -> jax.Array:
            with core_spmd.logical_axis_rules(act_rules):
                if plan is not None:
                    return cached_euler_sample(fn, x, plan, threshold=run.diffusion_config.lq_threshold,
                                               cfg_text=settings.cfg_text, cfg_audio=settings.cfg_audio,
                                               schedule=settings.schedule, state=st,
                                               on_step=(lambda _: bar.update(1)) if progress else None)
                return euler_sample(fn, x, steps=settings.steps, threshold=run.diffusion_config.lq_threshold,
                                    cfg_text=settings.cfg_text, cfg_audio=settings.cfg_audio,
                                    schedule=settings.schedule, state=st,
                                    on_step=(lambda _: bar.update(1)) if progress else None)

        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            x = jax.jit(run_sampler)(put(np.asarray(noise)), state)
            return np.asarray(jax.device_get(x))
