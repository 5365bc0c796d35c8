"""The distributed training runtime: `python -m mirage_jax.train --config=... --workdir=...`.

Modules, one job each:
- `__main__`: the CLI (flags, one-line errors, exit codes);
- `distributed`: join the processes of a multi-host run (`jax.distributed.initialize`);
- `setup`: `RunSetup`, everything derived from the config before data or checkpoints (mesh, rules, layout,
  optimizer, batch shapes and shardings, the jitted step);
- `state`: the train state and `StateLayout` (abstract shapes, shardings, sharded creation);
- `optim`: AdamW with warmup + cosine decay, clipping;
- `step`: the jitted update (gradient accumulation, EMA, NaN/Inf guard);
- `data`: batch shapes, which rows a process feeds, the synthetic source, per-process rows -> global arrays;
- `data_fit`: does the config fit the prepared dataset's manifest (checked before compiling);
- `grain_source`: the Grain loader of `data_pipeline` as the loop's data source;
- `shape_buckets`: training on a dataset of shape buckets (per-bucket batches, the bucket loader, one compiled
  step per bucket, the bucket metrics hook);
- `checkpoint`: the Orbax checkpoint store of a workdir (state, data state, config, meta);
- `resume`: restore the newest committed checkpoint or initialize, with the config-change checks;
- `preemption`: SIGTERM or Ctrl-C -> agree on the stop step -> save the newest completed step -> exit 0;
- `ownership`: one owner per workdir (a file lock locally, a renewed lease on gs://), taken by the CLI;
- `metrics`: console, TensorBoard and JSONL metrics, throughput and MFU;
- `loop`: the `Trainer` (holds the `RunSetup`): resume, then the loop as a driver that calls the hooks;
- `hooks`: one module per concern of the loop (profiler window, goodput events, non-finite guard, metrics
  window, stop agreement, checkpoint policy), each a small object with an injectable clock.

Rehearsals run a training job from outside and live elsewhere: the demo's preemption drill is
`mirage_jax.demo.preempt`, the chaos drill is `python -m tools.chaos` (tools/, never imported by the library).
"""
