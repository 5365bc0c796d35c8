"""The runtime sections of a config (train, optim, checkpoint, mesh, data, metrics, lora), typed and validated once.

`RunConfig.from_config(cfg)` is called by `train.setup.RunSetup` before anything compiles: an unknown field,
a value of the wrong type or out of range raises `ConfigError` naming the field as the override that fixes it
(`--config.checkpoint.save_every=0: must be >= 1`), and the training CLI prints that one line and exits 2.
A checkpoint's saved config (JSON) is parsed back through the same call (`checkpoint_format.read_config`), so
every reader of a checkpoint gets the same typed objects, and an old or partial saved config one line naming
the field. Past the door, every consumer takes its typed section (`TrainConfig`, `DataConfig`, `MeshConfig`,
...), not the ConfigDict.

`base_config()` builds the runtime sections of every config file from the same dataclasses' defaults
(configs/tiny.py and configs/mirage_10b.py add `model`, `shapes` and `diffusion`); `parse_arg` parses a
config file's `:key=value,...` argument (big_vision's style). docs/runtime.md explains what each field drives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

from mirage_base.errors import ConfigArgError, did_you_mean
from mirage_jax.config import ConfigError, DiffusionConfig, ModelConfig, _check, _from_mapping

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
RULE_TABLES = ("params", "activations")
GRAD_SYNCS = ("xla", "flat")
T = TypeVar("T")
VERIFY_LEVELS = ("auto", "sha256", "size", "none")


def _at_least(obj: Any, section: str, minimum: int, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(v >= minimum, f"{section}.{name}", f"must be >= {minimum}", v)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` section: batch, length and cadence of the run."""

    global_batch_size: int = 8  # samples per optimizer step, over all processes and micro-batches
    steps: int = 1000  # total optimizer steps of the run (a resumed run continues up to this)
    grad_accum: int = 1  # micro-batches per step; each is global_batch_size / grad_accum samples
    # How gradients are summed over the batch axes: 'xla' (XLA's partitioner places the reductions; any mesh) or
    # 'flat' (one explicit all-reduce of all gradients raveled into one buffer; pure data parallelism only). 'flat'
    # is for multi-process CPU, where each buffer of XLA's tuple all-reduces is its own Gloo collective.
    grad_sync: str = "xla"
    clip_norm: float = 1.0  # global gradient-norm clip; <= 0 disables
    ema_decay: float = 0.999  # EMA of the parameters kept in the state; 0 keeps a copy of the params
    seed: int = 0  # parameter init, timesteps, noise and condition dropout (all folded with the step)
    max_nonfinite_steps: int = 10  # K: this many consecutive NaN/Inf steps (each skipped) stop the run
    log_every: int = 10  # metrics cadence (console, TensorBoard, JSONL)
    profile_start_step: int = -1  # >= 0: trace `profile_steps` steps from there into WORKDIR/profile
    profile_steps: int = 5
    # shape buckets (a data.source prepared with lists of lengths / sizes): each bucket's global batch is this
    # many tokens / its tokens per sample, rounded down to what the batch axes divide; 0: global_batch_size
    tokens_per_batch: int = 0

    def validate(self) -> None:
        _at_least(self, "train", 1, "global_batch_size", "grad_accum", "max_nonfinite_steps", "log_every",
                  "profile_steps")
        _at_least(self, "train", 0, "steps", "tokens_per_batch")
        _check(self.grad_sync in GRAD_SYNCS, "train.grad_sync", f"one of {GRAD_SYNCS}", repr(self.grad_sync))
        _check(0.0 <= self.ema_decay <= 1.0, "train.ema_decay", "must be in [0, 1]", self.ema_decay)
        _check(self.profile_start_step >= -1, "train.profile_start_step", "a step >= 0, or -1 (no trace)",
               self.profile_start_step)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `optim` section: AdamW with linear warmup, then cosine decay to lr * end_lr_ratio at `decay_steps`."""

    lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = -1  # -1: train.steps
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01

    def validate(self) -> None:
        _check(self.lr >= 0.0, "optim.lr", "must be >= 0", self.lr)
        _at_least(self, "optim", 0, "warmup_steps")
        _check(self.decay_steps == -1 or self.decay_steps >= 1, "optim.decay_steps", "a step count >= 1, or -1 "
               "(train.steps)", self.decay_steps)
        _check(0.0 <= self.end_lr_ratio <= 1.0, "optim.end_lr_ratio", "must be in [0, 1]", self.end_lr_ratio)
        for name in ("b1", "b2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"optim.{name}", "must be in [0, 1)", getattr(self, name))
        _check(self.eps > 0.0, "optim.eps", "must be > 0", self.eps)
        _check(self.weight_decay >= 0.0, "optim.weight_decay", "must be >= 0", self.weight_decay)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` section: cadence and retention of Orbax checkpoints in WORKDIR/checkpoints."""

    save_every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_last_n: int = 3  # keep the newest N ...
    keep_every_k: int = 0  # ... plus every checkpoint whose step is a multiple of K (0: none)
    async_save: bool = True  # write in a background thread while training continues
    allow_config_change: bool = False  # resume even if the config changes the state's structure

    def validate(self) -> None:
        _at_least(self, "checkpoint", 1, "save_every", "keep_last_n")
        _at_least(self, "checkpoint", 0, "keep_every_k")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """The `metrics` section: where metrics go and the peak FLOP/s that MFU divides by."""

    peak_flops_per_device: float = 0.0  # for MFU; 0 = look the device kind up (docs/runtime.md)
    tensorboard: bool = True
    jsonl: bool = True

    def validate(self) -> None:
        _check(self.peak_flops_per_device >= 0.0, "metrics.peak_flops_per_device", "must be >= 0 (0: look the "
               "device kind up)", self.peak_flops_per_device)


def parse_buckets(text: str) -> list[tuple[str, tuple[int, int, int]]]:
    """`data.buckets` 'NAME=TxHxW,NAME=TxHxW' -> [(NAME, (latent frames, height, width))], in order; ConfigError
    naming the field for anything else (a repeated name, a size < 1)."""
    out: list[tuple[str, tuple[int, int, int]]] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, dims = item.partition("=")
        parts = dims.lower().split("x")
        if not name.strip() or len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"--config.data.buckets={text!r}: expected NAME=TxHxW,... (latent frames x height x "
                              f"width, e.g. 4s_720x1280=20x160x90,8s_720x1280=40x160x90); got {item!r}")
        if name.strip() in {n for n, _ in out}:
            raise ConfigError(f"--config.data.buckets={text!r}: bucket {name.strip()!r} is listed twice")
        t, h, w = (int(p) for p in parts)
        out.append((name.strip(), (t, h, w)))
    return out


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section: the training data and how the loader reads it."""

    source: str = "synthetic"  # 'synthetic', or a path / glob of prepared shards (data_pipeline.prepare)
    worker_count: int = -1  # Grain worker processes per host; -1 = automatic, 0 = in-process
    prefetch: int = 2  # batches prefetched per host
    shuffle_seed: int = 0
    # resume on another dataset (fingerprint) or shuffle_seed at the same sample offset instead of refusing
    allow_dataset_change: bool = False
    verify: str = "auto"  # shard check at start: 'sha256' | 'size' | 'none'; auto = sha256 local, size on gs://
    row_hash_log: str = ""  # debug: PREFIX -> PREFIX.p<i>.jsonl, sha256 of every batch row fed (docs/runtime.md)
    # shape buckets: explicit global batches, 'NAME=B,NAME=B' (e.g. '4s_720x1280=32,8s_720x1280=16'); a bucket
    # not listed takes train.tokens_per_batch's (or train.global_batch_size); B=0 leaves the bucket out
    bucket_batch: str = ""
    # the shape buckets the config is planned for (`mirage_jax.aot` compiles each, `describe` counts each):
    # 'NAME=TxHxW,...' latent frames x height x width per bucket (audio frames from model.time_map), e.g.
    # '4s_720x1280=20x160x90,8s_720x1280=40x160x90'; '' = the `shapes` section alone. Training takes its buckets
    # from data.source's manifest (data_pipeline/buckets.py), batches as aot does (train/shape_buckets.py)
    buckets: str = ""

    def validate(self) -> None:
        _check(bool(self.source), "data.source", "'synthetic' or a path / glob of prepared shards", "''")
        parse_buckets(self.buckets)
        _check(self.worker_count >= -1, "data.worker_count", "worker processes >= 0, or -1 (automatic)",
               self.worker_count)
        _at_least(self, "data", 1, "prefetch")
        _check(self.verify in VERIFY_LEVELS, "data.verify", f"one of {VERIFY_LEVELS}", repr(self.verify))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` section. Axes, outermost first: data, fsdp, sequence, tensor. `ici` sizes are per slice (fast
    interconnect), `dcn` sizes across slices (multi-slice TPU; 1 everywhere else); -1 = the rest. `rules` map
    logical axes to mesh axes (`params`, `activations`). The sizes are checked against the devices by
    `parallel.mesh.build_mesh` and the rules by `parallel.rules.normalize_rules` (both take this object), each
    naming the field."""

    ici: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: dict(data=1, fsdp=-1, sequence=1, tensor=1))
    dcn: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: dict(data=-1, fsdp=1, sequence=1, tensor=1))
    rules: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(params=PARAM_RULES, activations=ACTIVATION_RULES))

    def validate(self) -> None:
        for name in ("ici", "dcn"):
            for axis, v in dict(getattr(self, name)).items():
                _check(isinstance(v, int) and not isinstance(v, bool), f"mesh.{name}.{axis}", "must be an int", v)
        for name in dict(self.rules):
            _check(name in RULE_TABLES, f"mesh.rules.{name}", f"no such table {RULE_TABLES}")
        for name in RULE_TABLES:
            _check(name in self.rules, f"mesh.rules.{name}", "missing: a list of (logical axis, mesh axes) rules")


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The `shapes` section: per-sample input shapes (latent T x H x W, audio frames, text tokens, reference
    latent frames) for synthetic data, the batch layout and FLOPs; a prepared dataset's manifest must agree
    (`train.data_fit`)."""

    latent_frames: int
    latent_height: int
    latent_width: int
    audio_frames: int
    text_len: int
    ref_frames: int = 1

    def validate(self) -> None:
        _at_least(self, "shapes", 1, "latent_frames", "latent_height", "latent_width", "audio_frames", "text_len",
                  "ref_frames")


# Every stream's attention projections and MLP in the joint blocks (module paths of the nnx tree, the naming
# table's targets without `/kernel`: mirage_jax/interop/mochi.py).
LORA_TARGETS = r"(blocks|last_block)/(video|audio|text)/(q|k|v|o|mlp/(up|gate|down))"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` section: low-rank adapters trained on a frozen base (docs/lora.md). `rank` 0: off (full training).

    Each dense layer whose module path (`blocks/video/q`, `last_block/text/mlp/up`: the naming table's target path
    without `/kernel`) fully matches the regex `targets` gets y += (alpha / rank) * dropout(x) @ A @ B with
    A (in, rank) and B (rank, out) initialized as PEFT does (A Kaiming-uniform, B zero: step 0 is the base)."""

    rank: int = 0
    alpha: float = 0.0  # the scale is alpha / rank; 0: alpha = rank (scale 1)
    targets: str = LORA_TARGETS
    dropout: float = 0.0  # on the adapter's input only (PEFT's lora_dropout)
    base: str = ""  # the frozen base: a Mirage workdir (its latest step), a step folder or a warm-start output

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank (PEFT's `scaling`)."""
        return (self.alpha or self.rank) / self.rank if self.rank else 0.0

    def validate(self) -> None:
        import re

        _at_least(self, "lora", 0, "rank")
        _check(self.alpha >= 0.0, "lora.alpha", "must be >= 0 (0: alpha = rank)", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)", self.dropout)
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"--config.lora.targets={self.targets!r}: not a regular expression ({e})") from None
        _check(not self.enabled or bool(self.base), "lora.base", "set it to the base run's workdir (or a step "
               "folder, or a warm-start output) whose parameters the adapters train on (lora.rank > 0)", "''")


SECTIONS: dict[str, type] = {"train": TrainConfig, "optim": OptimConfig, "checkpoint": CheckpointConfig,
                             "metrics": MetricsConfig, "data": DataConfig, "mesh": MeshConfig, "lora": LoraConfig}


def section(cls: type[T], name: str, values: ml_collections.ConfigDict | Mapping[str, Any]) -> T:
    """The validated `cls` of the config section `name` (a ConfigDict or a mapping)."""
    obj = _from_mapping(cls, name, values)
    obj.validate()  # type: ignore[attr-defined]
    return obj


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every section of a training config, typed and validated (`run.train.steps`, `run.shapes.audio_frames`)."""

    model: ModelConfig
    diffusion: DiffusionConfig
    shapes: ShapesConfig
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    metrics: MetricsConfig
    data: DataConfig
    mesh: MeshConfig
    lora: LoraConfig = LoraConfig()

    def __post_init__(self) -> None:
        """Across sections: every latent frame (the `shapes` section's and each `data.buckets` entry's) must cut into
        whole model.patch_size x patch_size patches (the patch embedding's stride); ConfigError naming the field."""
        p = self.model.patch_size
        sized = [("shapes.latent_height/latent_width", self.shapes.latent_height, self.shapes.latent_width)]
        sized += [(f"data.buckets={self.data.buckets!r}: bucket {name!r}", h, w)
                  for name, (_, h, w) in parse_buckets(self.data.buckets)]
        for field, h, w in sized:
            if h % p or w % p:
                raise ConfigError(f"--config.{field}: latent {h}x{w} (height x width) is not a multiple of "
                                  f"model.patch_size={p}; give latent sizes that are")

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> RunConfig:
        """A config file's ConfigDict, or a checkpoint's saved config (JSON: lists for tuples; a model section of
        an older version is upgraded by `upgrade_model_fields`). Sections other than model, diffusion and shapes
        default when absent. Raises ConfigError naming the first missing section or bad field."""
        for name in ("model", "diffusion", "shapes"):
            if name not in cfg:
                raise ConfigError(f"the config has no `{name}` section; start from a model config such as "
                                  "configs/tiny.py or configs/mirage_10b.py")
        return cls(model=ModelConfig.from_config(cfg["model"]), diffusion=DiffusionConfig.from_config(cfg["diffusion"]),
                   shapes=section(ShapesConfig, "shapes", cfg["shapes"]),
                   **{name: section(c, name, cfg[name] if name in cfg else {}) for name, c in SECTIONS.items()})


def base_config() -> ml_collections.ConfigDict:
    """The runtime sections with their defaults, as a ConfigDict that `--config.a.b=v` overrides (a model
    config adds `model`, `shapes` and `diffusion`)."""
    cfg = ml_collections.ConfigDict()
    for name, cls in SECTIONS.items():
        cfg[name] = ml_collections.ConfigDict(dataclasses.asdict(cls()))
    return cfg


def clip_shapes(seconds: int, time_map: str, *, latent_height: int, latent_width: int, text_len: int,
                ref_frames: int = 1) -> dict[str, int]:
    """The `shapes` section of 25 fps clips of `seconds`: the latent frames the encoder's time map gives and the
    audio frames they cover (causal:6/25: 4 s -> 20 latents, 100 audio frames)."""
    from mirage_base.time_map import TimeMap

    tm = TimeMap.parse(time_map)
    latents = tm.latent_count(25 * seconds)
    return dict(latent_frames=latents, latent_height=latent_height, latent_width=latent_width,
                audio_frames=tm.frames_for_latents(latents), text_len=text_len, ref_frames=ref_frames)


def parse_arg(arg: str | None, where: str, **defaults: Any) -> ml_collections.ConfigDict:
    """A config file's argument `key=value,key2,...` (big_vision's `parse_arg`) over `defaults`.

    Each value takes its default's type (int, float, bool, str); a bare `key` means `key=True`. An unknown key or
    a value of the wrong type raises ConfigArgError naming `where` (the config file) and the valid keys.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigArgError(f"{where}:{arg}: unknown argument `{key}`{did_you_mean(key, defaults)} "
                              f"(it takes {', '.join(f'{k}=' for k in defaults)})")
        kind = type(defaults[key])
        if not eq:
            value: Any = True
        elif kind is bool:
            value = {"true": True, "1": True, "false": False, "0": False}.get(raw.strip().lower())
        else:
            try:
                value = kind(raw.strip())
            except ValueError:
                value = None
        if value is None or (kind is not bool and value is True):
            raise ConfigArgError(f"{where}:{arg}: `{key}` takes a {kind.__name__}, got {raw!r}")
        out[key] = value
    return ml_collections.ConfigDict(out)
