"""Everything a run derives from its config before it touches data or checkpoints, in one place.

`RunSetup(cfg)` validates every section once (`run_config.RunConfig`: a bad field raises ConfigError naming
it, before any compile) and builds the mesh over this process's devices; `RunSetup(cfg, devices)` over any
device list, such as a TPU topology's abstract devices (`mirage_jax.aot.plan` compiles the real train step from
it on a CPU host). `train.loop.Trainer` holds one (`trainer.setup`) with the workdir, this process's batch rows
and the loop, so the AOT report, the benchmarks and training always compile the same step from the same
derivations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import ml_collections

from mirage_jax.parallel import checks
from mirage_jax.parallel import mesh as mesh_lib
from mirage_jax.parallel import rules as rules_lib
from mirage_jax.run_config import RunConfig, TrainConfig
from mirage_jax.train import data as data_lib
from mirage_jax.train import data_fit, optim, shape_buckets
from mirage_jax.train import step as step_lib
from mirage_jax.train.state import StateLayout


class RunSetup:
    """Typed config (`run`), mesh, sharding rules, layout checks, optimizer, state layout, batch shardings."""

    def __init__(self, cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None):
        self.cfg = cfg  # as given: saved with every checkpoint (checkpoint_format.config_to_dict)
        self.run_cfg = run = RunConfig.from_config(cfg)
        self.mcfg, self.dcfg = run.model, run.diffusion
        # clip shapes and time map vs the dataset's manifest.json, before any compile; a training process
        # (devices None) also checks the shards themselves, before its state is built or restored
        data_fit.check(run, verify_shards=devices is None)
        self.mesh = mesh_lib.build_mesh(run.mesh, devices)
        self.param_rules = rules_lib.normalize_rules(run.mesh, "params", self.mesh)
        self.act_rules = rules_lib.normalize_rules(run.mesh, "activations", self.mesh)
        tc = run.train
        checks.check_layout(self.mesh, self.act_rules, self.mcfg.num_heads, tc.global_batch_size, tc.grad_accum)
        self.total_steps = tc.steps
        self.tx = optim.make_optimizer(run.optim, tc.clip_norm, self.total_steps)
        self.lr_schedule = optim.learning_rate_schedule(run.optim, self.total_steps)
        self.layout = StateLayout(self.mcfg, self.tx, self.mesh, self.param_rules, tc.seed, run.lora)
        self.batch_axes = dict(self.act_rules).get("batch")
        self.batch_shapes = data_lib.batch_shapes(run)
        self.batch_shardings = data_lib.batch_shardings(self.mesh, self.batch_axes, self.batch_shapes)
        # a dataset of shape buckets: each bucket's batch and shapes (None: one shape, `batch_shapes`)
        self.buckets = shape_buckets.BucketPlan.of(run, self.mesh, self.batch_axes)

    def make_step(self, train_cfg: TrainConfig | None = None) -> Any:
        """The run's jitted train step; `train_cfg` replaces the config's `train` section (bench.multiprocess_step
        times both `grad_sync` modes with `dataclasses.replace(setup.run_cfg.train, grad_sync=...)`)."""
        tc = self.run_cfg.train if train_cfg is None else train_cfg
        return step_lib.make_train_step(self.layout, self.dcfg, tc, self.lr_schedule, self.act_rules,
                                        self.batch_shardings)

    @functools.cached_property
    def step_fn(self) -> Any:
        """`make_step()` with the config's own `train` section, built once."""
        return self.make_step()
