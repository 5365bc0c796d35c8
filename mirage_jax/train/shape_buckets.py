"""Shape buckets in training: a data.source prepared with several clip lengths / frame sizes (data_pipeline/buckets.py).

`BucketPlan.of(run, mesh, batch_axes)` (None for a single-shape source) reads the dataset's buckets and gives each
its global batch: `data.bucket_batch` ('NAME=B,...') where listed, else `train.tokens_per_batch` / the bucket's
tokens per sample (describe.count_tokens) rounded down to a multiple of what the batch axes and grad_accum
divide (at least one such multiple), else `train.global_batch_size`. A bucket with fewer records than its batch
(or B=0) is left out with a note; none left is a ConfigError. `describe()` is the table printed at start.

Batch n's bucket is the loader's `BucketSchedule.bucket(n)` (data_pipeline/loader/buckets.py), so the loop, the
metrics and every process agree on it from the step number alone. `compile_steps` lowers and compiles the train
step once per bucket before the first step (AOT: no shape compiles mid-run), logging each compile time, and
returns `BucketSteps`, which runs the compiled step of the batch's bucket (the state is donated whatever the
bucket: one jit, one state layout). `BucketMetrics` adds `bucket`, `batch` and, at log steps, per-bucket loss
and tokens/s (`bucket/NAME/loss`, `bucket/NAME/tokens_per_s`) to the metrics row.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from mirage_jax.config import ConfigError
from mirage_jax.parallel.checks import axes_size
from mirage_jax.run_config import RunConfig, parse_buckets
from mirage_jax.train import data as data_lib
from mirage_jax.train.hooks import Hook, StepInfo


@dataclasses.dataclass(frozen=True)
class ShapeBucket:
    """One bucket as the run trains it: global batch, per-sample shapes, tokens and train FLOPs per sample."""

    name: str
    batch: int
    records: int
    shapes: Any  # run_config.ShapesConfig
    tokens: int
    flops: int


def parse_bucket_batch(text: str) -> dict[str, int]:
    """'NAME=B,NAME=B' -> {NAME: B}; ConfigError naming data.bucket_batch otherwise."""
    out: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, b = item.partition("=")
        try:
            if not eq or int(b) < 0:
                raise ValueError(item)
            out[name.strip()] = int(b)
        except ValueError:
            raise ConfigError(f"--config.data.bucket_batch={text!r}: expected NAME=B,NAME=B with B >= 0 "
                              f"(e.g. 4s_720x1280=32,8s_720x1280=16); got {item!r}") from None
    return out


def check_bucket_names(explicit: Mapping[str, int], known: list[str], of: str) -> None:
    """ConfigError unless every name of `explicit` (parsed data.bucket_batch) is one of `known`, the buckets of `of`
    ('data.buckets=...' for a config's plan, 'data.source=...' for a dataset's): one line naming the flag, the
    unknown names, the known ones and what to do. The one check config_buckets and BucketPlan share."""
    unknown = sorted(set(explicit) - set(known))
    if unknown:
        raise ConfigError(f"--config.data.bucket_batch names {unknown}, not buckets of {of} (its buckets: "
                          f"{', '.join(known)}): give each NAME=B one of those names, or drop it")


def batch_unit(mesh: Mesh, batch_axes: Any, grad_accum: int) -> int:
    """What every bucket's global batch must be a multiple of: the batch axes' devices x micro-batches, and the
    process count (each process feeds whole rows)."""
    return math.lcm(axes_size(mesh, batch_axes) * grad_accum, jax.process_count())


def make_bucket(run: RunConfig, name: str, latent: tuple[int, int, int], audio_frames: int, unit: int,
                explicit: Mapping[str, int], records: int = 0) -> ShapeBucket:
    """One bucket of `run` with latent (T, H, W) and `audio_frames` replacing `run.shapes`' clip fields, and its
    global batch: `explicit[name]` (data.bucket_batch; a multiple of `unit` or ConfigError), else
    train.tokens_per_batch // its tokens per sample rounded down to a multiple of `unit` (at least `unit`), else
    train.global_batch_size. Batch 0 (explicit) means "leave it out". The one rule train and aot share."""
    from mirage_jax.describe import count_flops, count_tokens

    shapes = dataclasses.replace(run.shapes, latent_frames=latent[0], latent_height=latent[1], latent_width=latent[2],
                                 audio_frames=audio_frames)
    sd = dataclasses.asdict(shapes)
    tokens = int(count_tokens(run.model, sd)["total"])
    tpb = run.train.tokens_per_batch
    if name in explicit:
        batch = explicit[name]
        if batch % unit:
            raise ConfigError(f"--config.data.bucket_batch: {name}={batch} is not a multiple of {unit} "
                              "(the devices of the batch axes x train.grad_accum, and the process count)")
    elif tpb:
        batch = max(unit, tpb // tokens // unit * unit)
    else:
        batch = run.train.global_batch_size
    return ShapeBucket(name, batch, records, shapes, tokens, int(count_flops(run.model, sd)))


def config_buckets(run: RunConfig, unit: int) -> list[ShapeBucket]:
    """The buckets a config is planned for (`data.buckets`, batches by `make_bucket`), those of batch 0 left out;
    [] when it lists none. What `mirage_jax.aot` compiles and `describe` counts."""
    explicit = parse_bucket_batch(run.data.bucket_batch)
    listed = parse_buckets(run.data.buckets)
    if listed:
        check_bucket_names(explicit, [n for n, _ in listed], f"data.buckets={run.data.buckets!r}")
    tm = run.model.frame_map
    out = [make_bucket(run, name, lat, tm.frames_for_latents(lat[0]), unit, explicit) for name, lat in listed]
    return [b for b in out if b.batch > 0]


class BucketPlan:
    """The kept buckets (`buckets`, with the loader's `loader_buckets` in the same order), the dropped ones' notes."""

    def __init__(self, run: RunConfig, loader_buckets: list[Any], unit: int):
        explicit = parse_bucket_batch(run.data.bucket_batch)
        check_bucket_names(explicit, [b.name for b in loader_buckets], f"data.source={run.data.source}")
        self.unit, self.buckets, self.loader_buckets, self.notes = unit, [], [], []
        for lb in loader_buckets:
            e = lb.entry
            b = make_bucket(run, lb.name, (e["latent_frames"], e["latent_height"], e["latent_width"]),
                            e["audio_frames"], unit, explicit, lb.num_records)
            if b.batch == 0:
                self.notes.append(f"bucket {lb.name}: left out (data.bucket_batch {lb.name}=0)")
                continue
            if lb.num_records < b.batch:
                self.notes.append(f"bucket {lb.name}: left out: {lb.num_records} records, fewer than its global batch "
                                  f"{b.batch} (lower it with --config.data.bucket_batch={lb.name}=B, B a multiple of "
                                  f"{unit}, or prepare more footage of this shape)")
                continue
            self.buckets.append(b)
            self.loader_buckets.append(lb)
        if not self.buckets:
            raise ConfigError(f"data.source={run.data.source}: no shape bucket can be trained: "
                              + "; ".join(self.notes))
        from data_pipeline.loader.buckets import schedule_for

        self.schedule = schedule_for(self.loader_buckets, [b.batch for b in self.buckets], run.data.shuffle_seed)

    @classmethod
    def of(cls, run: RunConfig, mesh: Mesh, batch_axes: Any, verify: str = "none") -> BucketPlan | None:
        """The plan of `run.data.source`, or None when it is synthetic or a single-shape dataset."""
        if run.data.source == "synthetic":
            return None
        from data_pipeline.loader.buckets import read_buckets

        lbs = read_buckets(run.data.source, verify)
        if lbs is None:
            if run.train.tokens_per_batch or run.data.bucket_batch:
                logging.warning("train.tokens_per_batch / data.bucket_batch size shape buckets, and data.source=%s "
                                "has one shape: ignored; train.global_batch_size=%d is the batch",
                                run.data.source, run.train.global_batch_size)
            return None
        return cls(run, lbs, batch_unit(mesh, batch_axes, run.train.grad_accum))

    def process_rows(self, mesh: Mesh, batch_axes: Any) -> list[data_lib.RowRange]:
        """This process's rows of each kept bucket's global batch, in `buckets` order (the rows it feeds)."""
        return [data_lib.process_rows(mesh, batch_axes, b.batch) for b in self.buckets]

    def describe_rows(self, mesh: Mesh, batch_axes: Any) -> str:
        """'rows [0, 16) of bucket A's batch 16, [0, 8) of B's 8': what this process feeds per bucket."""
        return ", ".join(f"rows [{r.start}, {r.stop}) of {'bucket ' if i == 0 else ''}{b.name}'s batch {b.batch}"
                         for i, (b, r) in enumerate(zip(self.buckets, self.process_rows(mesh, batch_axes),
                                                        strict=True)))

    def bucket_of(self, step: int) -> ShapeBucket:
        """The bucket of global batch `step` (every process computes the same)."""
        return self.buckets[self.schedule.bucket(step)]

    def describe(self) -> str:
        """The start-up table: one line per bucket (batch, records, share of steps, tokens, FLOPs), then notes."""
        p = self.schedule.probabilities
        lines = [f"{len(self.buckets)} shape bucket(s), global batches multiples of {self.unit}:"]
        lines += [f"  {b.name}: batch {b.batch}, {b.records} records, {100 * q:.1f}% of steps, latent "
                  f"{b.shapes.latent_frames}x{b.shapes.latent_height}x{b.shapes.latent_width}, {b.tokens} tokens and "
                  f"{b.flops / 1e9:.3g} GFLOP (train) per sample, {b.batch * b.tokens} tokens per batch"
                  for b, q in zip(self.buckets, p, strict=True)]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def batch_shapes(run: RunConfig, bucket: ShapeBucket) -> dict[str, tuple[tuple[int, ...], Any]]:
    """`data.batch_shapes` of one bucket's clips."""
    return data_lib.batch_shapes(dataclasses.replace(run, shapes=bucket.shapes))


def make_source(run: RunConfig, plan: BucketPlan, mesh: Mesh, batch_axes: Any) -> Any:
    """The bucket loader feeding this process's rows of every bucket's batches (a `GrainSource`-like iterator whose
    batches carry `bucket`), wrapped in a `RowHashLog` when `data.row_hash_log` is set."""
    from data_pipeline.loader.buckets import make_bucket_loader
    from mirage_jax.train.grain_source import GrainSource

    rows = plan.process_rows(mesh, batch_axes)
    index, count = rows[0].index, rows[0].count
    loader = make_bucket_loader(plan.loader_buckets, [b.batch for b in plan.buckets], seed=run.data.shuffle_seed,
                                process_index=index, process_count=count, worker_count=_workers(run.data.worker_count),
                                prefetch=run.data.prefetch, allow_dataset_change=run.data.allow_dataset_change)
    source: Any = GrainSource(iter(loader), extra_keys=("bucket",))
    prefix = run.data.row_hash_log
    return data_lib.RowHashLog(source, rows[0], f"{prefix}.p{jax.process_index()}.jsonl") if prefix else source


def _workers(n: int) -> int:
    from data_pipeline.loader.grain_loader import _auto_workers

    return _auto_workers() if n < 0 else n


def feeder(setup: Any) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
    """Per-process rows -> global arrays: of the batch's bucket's global batch under buckets, else the run's."""
    plan, shardings = setup.buckets, setup.batch_shardings
    if plan is None:
        gb = setup.run_cfg.train.global_batch_size
        return lambda local: data_lib.to_global(local, shardings, gb)
    return lambda local: data_lib.to_global(local, shardings, plan.buckets[int(local["bucket"])].batch)


class BucketSteps:
    """The compiled train step of each bucket; called like the jitted step, it runs the one of the batch's shape."""

    def __init__(self, compiled: dict[tuple[int, ...], Any]):
        self.compiled = compiled

    def __call__(self, state: Any, batch: dict[str, jax.Array]) -> Any:
        return self.compiled[tuple(batch["video"].shape)](state, batch)


def compile_steps(setup: Any, step_fn: Any, state: Any, batch: dict[str, jax.Array], log: Any = logging.info) -> Any:
    """`step_fn` lowered and compiled before the first step: for `batch`'s shape alone without buckets, for every
    bucket's shape with them (each compile time logged; the persistent compilation cache applies when configured)."""
    plan = setup.buckets
    if plan is None:
        return step_fn.lower(state, batch).compile()
    compiled = {}
    for b in plan.buckets:
        shapes = batch_shapes(setup.run_cfg, b)
        abstract = {k: jax.ShapeDtypeStruct((b.batch, *shape), dtype, sharding=setup.batch_shardings[k])
                    for k, (shape, dtype) in shapes.items()}
        t = time.perf_counter()
        compiled[(b.batch, *shapes["video"][0])] = step_fn.lower(state, abstract).compile()
        log("compiled the train step of bucket %s (batch %d) in %.1f s", b.name, b.batch, time.perf_counter() - t)
    return BucketSteps(compiled)


class BucketMetrics(Hook):
    """Adds `bucket` (name) and `batch` to every step's metrics row, and at log steps each bucket's mean loss and
    tokens/s over the window (`bucket/NAME/loss`, `bucket/NAME/tokens_per_s`), plus the window's true
    `samples_per_s`, `tokens_per_s_per_device`, `tflops_per_device` and `mfu` (against `peak` FLOP/s per device;
    0: not reported), which the metrics window computes for one shape."""

    def __init__(self, plan: BucketPlan, log_every: int, n_devices: int, peak: float = 0.0):
        self.plan, self.log_every, self.n_dev, self.peak = plan, log_every, n_devices, peak
        self._reset()

    def _reset(self) -> None:
        self.loss: dict[str, list[float]] = {}
        self.time: dict[str, float] = {}
        self.tokens: dict[str, float] = {}
        self.samples = self.flops = 0.0

    def on_step(self, info: StepInfo) -> None:
        b = self.plan.bucket_of(info.step)
        info.scalars.update(bucket=b.name, batch=b.batch)
        self.loss.setdefault(b.name, []).append(float(info.metrics["loss"]))
        if not info.first:  # the compile warm-up step is kept out of the rates, as in the metrics window
            self.time[b.name] = self.time.get(b.name, 0.0) + info.step_time_s
            self.tokens[b.name] = self.tokens.get(b.name, 0.0) + b.batch * b.tokens
            self.samples += b.batch
            self.flops += b.batch * b.flops
        if info.new_step % self.log_every == 0 or info.last:
            for name, losses in self.loss.items():
                info.scalars[f"bucket/{name}/loss"] = float(np.mean(losses))
            for name, t in self.time.items():
                if t > 0:
                    info.scalars[f"bucket/{name}/tokens_per_s"] = self.tokens[name] / t
            total = sum(self.time.values())
            if total > 0:
                info.scalars["samples_per_s"] = self.samples / total
                info.scalars["tokens_per_s_per_device"] = sum(self.tokens.values()) / total / self.n_dev
                info.scalars["tflops_per_device"] = self.flops / total / self.n_dev / 1e12
                if self.peak:
                    info.scalars["mfu"] = self.flops / total / self.n_dev / self.peak
            self._reset()
