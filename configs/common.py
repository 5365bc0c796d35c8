"""Runtime defaults shared by every config: mesh, train loop, optimizer, checkpoints, metrics, data.

Model files (`configs/tiny.py`, `configs/mirage_10b.py`) start from `get_base_config()` and add the
`model`, `shapes` and `diffusion` sections. Every field can be overridden on the command line:
`python -m mirage_jax.train --config=configs/tiny.py --config.train.steps=20 --config.mesh.ici.fsdp=4`.
docs/runtime.md explains what each section drives.
"""

from __future__ import annotations

import ml_collections

# Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated).
# Parameters and activations use SEPARATE tables: the model names a parameter's model dimension and an
# activation's hidden dimension both `embed`, and FSDP wants the first on `fsdp` and the second unsharded
# (the batch already sits on `fsdp`; one mesh axis cannot shard two dimensions of an array).
PARAM_RULES = (
    ("layers", None),  # the stacked (scanned) block axis
    ("embed", "fsdp"),  # FSDP (ZeRO-3): every weight is split along its model dimension
    ("heads", "tensor"),  # Megatron tensor parallelism over attention heads ...
    ("mlp", "tensor"),  # ... and MLP hidden units
    ("mod", "tensor"),  # adaLN modulation outputs
    ("vocab", None),  # input feature dims (latent patch, text / audio features)
    ("norm", None),
)
ACTIVATION_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),  # context parallelism: tokens split over `sequence` between attentions
    ("embed", None),
    ("act_heads", ("sequence", "tensor")),  # Ulysses: inside attention the heads take the sequence axis
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


def get_base_config() -> ml_collections.ConfigDict:
    """The runtime sections with their defaults (a model config adds `model`, `shapes`, `diffusion`)."""
    cfg = ml_collections.ConfigDict()

    # Device mesh. Axes, outermost first: data, fsdp, sequence, tensor. `ici` sizes are per slice
    # (fast interconnect), `dcn` sizes across slices (multi-slice TPU; 1 everywhere else). -1 = the rest.
    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.ici = ml_collections.ConfigDict(dict(data=1, fsdp=-1, sequence=1, tensor=1))
    cfg.mesh.dcn = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))
    cfg.mesh.rules = ml_collections.ConfigDict(dict(params=PARAM_RULES, activations=ACTIVATION_RULES))

    cfg.train = ml_collections.ConfigDict()
    cfg.train.global_batch_size = 8  # samples per optimizer step, over all processes and micro-batches
    cfg.train.steps = 1000  # total optimizer steps of the run (a resumed run continues up to this)
    cfg.train.grad_accum = 1  # micro-batches per step; each is global_batch_size / grad_accum samples
    # How gradients are summed over the batch axes: 'xla' (XLA's partitioner places the reductions; any mesh) or
    # 'flat' (one explicit all-reduce of all gradients raveled into one buffer; pure data parallelism only). 'flat'
    # is for multi-process CPU, where each buffer of XLA's tuple all-reduces is its own Gloo collective.
    cfg.train.grad_sync = "xla"
    cfg.train.clip_norm = 1.0  # global gradient-norm clip; <= 0 disables
    cfg.train.ema_decay = 0.999  # EMA of the parameters kept in the state; 0 keeps a copy of the params
    cfg.train.seed = 0  # parameter init, timesteps, noise and condition dropout (all folded with the step)
    cfg.train.max_nonfinite_steps = 10  # K: this many consecutive NaN/Inf steps (each skipped) stop the run
    cfg.train.log_every = 10  # metrics cadence (console, TensorBoard, JSONL)
    cfg.train.profile_start_step = -1  # >= 0: trace `profile_steps` steps from there into WORKDIR/profile
    cfg.train.profile_steps = 5
    cfg.train.fault_kill_at_step = -1  # drills/tests only: SIGKILL this process right after that step

    # AdamW with linear warmup then cosine decay to lr * end_lr_ratio at `decay_steps` (-1: train.steps).
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=100, decay_steps=-1, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.01,
    ))

    cfg.checkpoint = ml_collections.ConfigDict()
    cfg.checkpoint.save_every = 500  # steps between checkpoints (the last step is always saved)
    cfg.checkpoint.keep_last_n = 3  # keep the newest N ...
    cfg.checkpoint.keep_every_k = 0  # ... plus every checkpoint whose step is a multiple of K (0: none)
    cfg.checkpoint.async_save = True  # write in a background thread while training continues
    cfg.checkpoint.allow_config_change = False  # resume even if the config changes the state's structure

    cfg.metrics = ml_collections.ConfigDict()
    cfg.metrics.peak_flops_per_device = 0.0  # for MFU; 0 = look the device kind up (docs/runtime.md)
    cfg.metrics.tensorboard = True
    cfg.metrics.jsonl = True

    cfg.data = ml_collections.ConfigDict()
    cfg.data.source = "synthetic"  # 'synthetic', or a path / glob of prepared shards (data_pipeline.prepare)
    cfg.data.worker_count = -1  # Grain worker processes per host; -1 = automatic, 0 = in-process
    cfg.data.prefetch = 2  # batches prefetched per host
    cfg.data.shuffle_seed = 0
    # resume on another dataset (fingerprint) or shuffle_seed at the same sample offset instead of refusing
    cfg.data.allow_dataset_change = False
    cfg.data.verify = "auto"  # shard check at start: 'sha256' | 'size' | 'none'; auto = sha256 local, size on gs://
    cfg.data.row_hash_log = ""  # debug: PREFIX -> PREFIX.p<i>.jsonl, sha256 of every batch row fed (docs/runtime.md)
    return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Lets `--config=configs/common.py` load (for inspecting defaults); it has no model section."""
    del arg
    return get_base_config()
