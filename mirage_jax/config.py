"""Typed, validated views of the `model` and `diffusion` sections of an ml_collections config.

Config files stay plain `ConfigDict`s (big_vision style, overridable from the command line); the
library reads them through these frozen dataclasses so that a wrong field fails up front with its
name, not deep inside a traced function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from mirage_base.errors import ExitCode, MirageError, did_you_mean
from mirage_base.time_map import TimeMap

ATTENTION_BACKENDS = ("xla", "dot_product", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention", "save_splash", "save_splash_qkv",
                  "save_splash_down", "save_splash_mlp", "save_splash_mlp_o", "save_splash_dense", "offload_mlp",
                  "offload_dense")  # model/dit.py REMAT
DTYPES = ("float32", "bfloat16")
ROPE_INITS = ("mixed", "axial")
TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "linear_quadratic")

T = TypeVar("T")
# ModelConfig fields that change how the computation runs, not what the parameters mean (a resume, or a LoRA base,
# may differ in them)
MODEL_EXECUTION_FIELDS = ("compute_dtype", "attention_backend", "remat_policy")


class ConfigError(MirageError, ValueError):
    """A config field is missing, unknown or out of range; the message names the field (exit 2)."""

    exit_code = ExitCode.REFUSED
    label = "CONFIG ERROR"


# The Python types a field's annotation accepts (an int is a valid float; a bool is not an int).
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _from_mapping(cls: type[T], section: str, values: Mapping[str, Any] | Any) -> T:
    """`cls(**values)` after checking that every key is a field of `cls` and every value has its field's type."""
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    values = dict(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in sorted(set(values) - set(fields)):
        raise ConfigError(f"--config.{section}.{name}: `{section}` has no such field{did_you_mean(name, fields)} "
                          f"(its fields: {', '.join(sorted(fields))})")
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"--config.{section}.{name}: missing (the `{section}` section must set it)")
    for name, v in values.items():
        types = _TYPES.get(str(fields[name].type))
        if types and (not isinstance(v, types) or (bool not in types and isinstance(v, bool))):
            raise ConfigError(f"--config.{section}.{name}={v!r}: must be a {fields[name].type}")
    return cls(**values)


def upgrade_model_fields(values: dict[str, Any]) -> dict[str, Any]:
    """A model section as written before `time_map` existed, in today's fields: `frames_per_latent=K` (K video
    frames per latent) is `time_map="uniform:K"`. Other sections and fields are returned unchanged."""
    if "frames_per_latent" not in values:
        return values
    values = dict(values)
    values.setdefault("time_map", f"uniform:{int(values.pop('frames_per_latent'))}")
    return values


def _check(cond: bool, field: str, msg: str, value: Any = None) -> None:
    """Raise `--config.FIELD[=VALUE]: MSG` unless `cond` (FIELD is `section.name`)."""
    if not cond:
        raise ConfigError(f"--config.{field}{'' if value is None else f'={value}'}: {msg}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions and numerics of MirageDiT. Defaults are Mochi 1 / the Mirage report's 10B network."""

    patch_size: int = 2
    latent_channels: int = 12
    num_layers: int = 48
    num_heads: int = 24
    head_dim: int = 128
    video_dim: int = 3072  # visual stream width (Mochi: heads * head_dim)
    text_dim: int = 1536  # text stream width (diffusers: pooled_projection_dim)
    audio_dim: int = 1536  # audio stream width (new in Mirage)
    mlp_ratio_video: float = 4.0  # SwiGLU hidden = int(2 * ratio * dim) // 3 (Mochi: 8192 for 3072)
    mlp_ratio_text: float = 4.0
    mlp_ratio_audio: float = 4.0
    text_embed_dim: int = 4096  # T5-XXL features
    max_text_len: int = 256
    audio_feature_dim: int = 1024  # wav2vec2-large features at 25 fps
    # The video encoder's frame-to-latent map (mirage_base/time_map.py), the rule its dataset's
    # manifest.json records: audio token a sits at the time of the latent frame covering frame a. Mochi's VAE
    # on independent 25-frame chunks (the report's 20 latents for 4 s): causal:6/25; whole clip: causal:6;
    # s2d / dct: uniform:K. (Configs and checkpoints from before it say frames_per_latent=K = uniform:K.)
    time_map: str = "causal:6/25"
    time_embed_dim: int = 256
    pool_heads: int = 8  # heads of the attention pool over text
    rope_base_height: int = 192
    rope_base_width: int = 192
    # Initial RoPE-Mixed frequencies are 1 / rope_theta^(f / (head_dim/2)) (Mochi: 10000). Init only: the
    # frequencies are learned parameters, so checkpoints, warm start and export carry them, not this number.
    rope_theta: float = 10000.0
    # "mixed": per (head, pair) a random direction over (t, h, w) (RoPE-Mixed); "axial": each pair along one
    # axis, half of them time (rope.axial_rope_init). Init only, like rope_theta.
    rope_init: str = "mixed"
    use_audio: bool = True  # False builds exactly Mochi's AsymmDiT (no audio stream parameters)
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "xla"
    remat_policy: str = "none"
    # splash only: the kernel's fused backward (dq, dk, dv in one kernel: 5 matmuls instead of 7) at the cost
    # of a bf16 dq partial per kv block (model/attention.py); False: separate dq and dkv kernels
    splash_fused_bwd: bool = False
    scan_layers: bool = True

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | Any) -> ModelConfig:
        values = upgrade_model_fields(dict(section.to_dict() if hasattr(section, "to_dict") else section))
        cfg = _from_mapping(cls, "model", values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("patch_size", "latent_channels", "num_layers", "num_heads", "head_dim", "video_dim",
                     "text_dim", "audio_dim", "text_embed_dim", "max_text_len", "audio_feature_dim",
                     "time_embed_dim", "pool_heads"):
            _check(int(getattr(self, name)) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {self.head_dim}")
        try:
            TimeMap.parse(self.time_map, "model.time_map")
        except ValueError as e:
            raise ConfigError(f"--config.model.time_map: {e}") from None
        _check(self.rope_init in ROPE_INITS, "model.rope_init", f"one of {ROPE_INITS}, got {self.rope_init!r}")
        _check(float(self.rope_theta) > 1.0, "model.rope_theta", f"must be > 1, got {self.rope_theta}")
        _check(self.time_embed_dim % 2 == 0, "model.time_embed_dim", "must be even")
        _check(self.text_embed_dim % self.pool_heads == 0, "model.pool_heads",
               f"must divide model.text_embed_dim={self.text_embed_dim}")
        _check(self.compute_dtype in DTYPES, "model.compute_dtype", f"one of {DTYPES}")
        _check(self.param_dtype in DTYPES, "model.param_dtype", f"one of {DTYPES}")
        _check(self.attention_backend in ATTENTION_BACKENDS, "model.attention_backend",
               f"one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        _check(self.remat_policy in REMAT_POLICIES, "model.remat_policy",
               f"one of {REMAT_POLICIES}, got {self.remat_policy!r}")

    @property
    def frame_map(self) -> TimeMap:
        """`time_map` parsed: which latent frame covers each 25 fps frame."""
        return TimeMap.parse(self.time_map, "model.time_map")

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.latent_channels

    @staticmethod
    def mlp_hidden(dim: int, ratio: float) -> int:
        """SwiGLU hidden width as Mochi/diffusers compute it: (ratio * dim * 2) // 3."""
        return int(ratio * dim * 2) // 3


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Flow-matching objective, timestep sampling, condition dropout and the sampler."""

    timestep_sampler: str = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    lq_threshold: float = 0.025  # Mochi's linear-quadratic schedule threshold
    lq_steps: int = 64  # grid size when training timesteps come from the linear-quadratic schedule
    drop_text: float = 0.1
    drop_audio: float = 0.1
    drop_ref: float = 0.1
    loss_buckets: int = 4
    sample_steps: int = 64
    cfg_audio: float = 1.0  # 1.0 disables guidance for that modality
    cfg_text: float = 1.0
    cfg_schedule: str = "constant"  # or "cosine": guidance annealed from full at t=1 to none at t=0

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | Any) -> DiffusionConfig:
        cfg = _from_mapping(cls, "diffusion", section)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _check(self.timestep_sampler in TIMESTEP_SAMPLERS, "diffusion.timestep_sampler",
               f"one of {TIMESTEP_SAMPLERS}, got {self.timestep_sampler!r}")
        for name in ("drop_text", "drop_audio", "drop_ref"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"diffusion.{name}", f"a probability in [0, 1], got {v}")
        _check(0.0 < self.lq_threshold < 1.0, "diffusion.lq_threshold", "must be in (0, 1)")
        _check(self.lq_steps >= 2, "diffusion.lq_steps", "must be >= 2")
        _check(self.sample_steps >= 1, "diffusion.sample_steps", "must be >= 1")
        _check(self.loss_buckets >= 1, "diffusion.loss_buckets", "must be >= 1")
        _check(self.cfg_schedule in ("constant", "cosine"), "diffusion.cfg_schedule", "'constant' or 'cosine'")
