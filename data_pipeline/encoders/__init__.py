"""Frozen encoders by name, for the pipeline (prepare) and the model side (generate) alike.

    enc = get_video_encoder("s2d", spatial_factor=8)      # encode(frames) / decode(latents)
    enc = get_audio_encoder("logmel", n_mels=80)          # encode(waveform_16k) -> [frames, 80]
    enc = get_text_encoder("hash", max_len=32, dim=64)    # encode(caption) -> ([32, 64], mask [32])
    enc = get_video_encoder("dct", luma=10, chroma=3)     # JPEG-like low-pass DCT: 8x8 px -> 16 channels
    enc = get_video_encoder("mochi_vae", weights="mochi-1-preview/vae")  # Mochi's causal VAE (JAX)
    enc = get_audio_encoder("wav2vec2", weights="wav2vec2-large-960h")  # 1024-d features at 25 fps
    enc = get_text_encoder("t5", weights="mochi-1-preview/text_encoder", max_len=256)  # T5-XXL (JAX)
    enc = from_manifest(manifest, "video")                # exactly the encoder a dataset was built with

New encoders register a factory with `register(kind, name, factory)`; the factory takes keyword params
and returns an object with `name`, `version`, `params`, `spec()` and `encode` (and `decode` for video).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data_pipeline.encoders.audio_logmel import LogMel
from data_pipeline.encoders.base import EncoderSpec
from data_pipeline.encoders.text_hash import HashText
from data_pipeline.encoders.video_dct import DCT
from data_pipeline.encoders.video_s2d import SpaceToDepth
from mirage_base.batch_keys import STREAMS as KINDS  # the encoder kinds are the model's streams
from mirage_base.errors import InputError
from mirage_base.time_map import TimeMap


def _mochi_vae(**params: Any) -> Any:
    from data_pipeline.encoders import mochi_vae  # imports jax only when used

    return mochi_vae.get(**params)


def _wav2vec2(**params: Any) -> Any:
    from data_pipeline.encoders import wav2vec2

    return wav2vec2.get(**params)


def _t5(**params: Any) -> Any:
    from data_pipeline.encoders import t5

    return t5.get(**params)


_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {
    "video": {"s2d": SpaceToDepth, "dct": DCT, "mochi_vae": _mochi_vae},
    "audio": {"logmel": LogMel, "wav2vec2": _wav2vec2},
    "text": {"hash": HashText, "t5": _t5},
}


def register(kind: str, name: str, factory: Callable[..., Any]) -> None:
    """Make `factory(**params)` available as encoder `name` of `kind` ('video', 'audio' or 'text')."""
    if kind not in _REGISTRY:
        raise ValueError(f"encoder kind {kind!r} is not one of {KINDS}")
    _REGISTRY[kind][name] = factory


def names(kind: str) -> list[str]:
    """Registered encoder names of `kind`."""
    return sorted(_REGISTRY[kind])


def get_encoder(kind: str, name: str, **params: Any) -> Any:
    """The encoder `name` of `kind`, built with `params` (unknown params raise TypeError)."""
    if kind not in _REGISTRY:
        raise ValueError(f"encoder kind {kind!r} is not one of {KINDS}")
    if name not in _REGISTRY[kind]:
        raise InputError(f"unknown {kind} encoder {name!r}; registered: {names(kind)}")
    return _REGISTRY[kind][name](**params)


def get_video_encoder(name: str = "s2d", **params: Any) -> Any:
    """Video encoder with `encode(frames [T,H,W,3]) -> latents` and `decode(latents) -> pixels in [-1, 1]`."""
    return get_encoder("video", name, **params)


def get_audio_encoder(name: str = "logmel", **params: Any) -> Any:
    """Audio encoder with `encode(waveform [N] at 16 kHz) -> [N // 640, D]` (one row per 25 fps frame)."""
    return get_encoder("audio", name, **params)


def get_text_encoder(name: str = "hash", **params: Any) -> Any:
    """Text encoder with `encode(caption) -> (embeddings [L, D], mask uint8 [L])`."""
    return get_encoder("text", name, **params)


def spatial_factor(video_encoder: Any) -> int:
    """Pixels per latent along H and W of any video encoder (`spatial_factor` property, or s2d's `f`)."""
    return int(getattr(video_encoder, "spatial_factor", None) or video_encoder.f)


def temporal_factor(video_encoder: Any) -> int:
    """Frames per latent frame of any video encoder (Mochi: 6, with a causal first frame)."""
    return int(getattr(video_encoder, "temporal_factor", None) or getattr(video_encoder, "tf", 1))


def time_map(video_encoder: Any) -> TimeMap:
    """The encoder's frame-to-latent map (`time_map` property; otherwise uniform by its temporal factor)."""
    tm = getattr(video_encoder, "time_map", None)
    return tm if tm is not None else TimeMap("uniform", temporal_factor(video_encoder))


def frame_multiple(video_encoder: Any) -> int:
    """What clip lengths must be a multiple of: s2d's temporal factor; 1 for causal encoders such as
    mochi_vae, which take any T and give 1 + (T - 1) // 6 latents (6k + 1 frames waste none)."""
    m = getattr(video_encoder, "frame_multiple", None)
    return int(m) if m is not None else temporal_factor(video_encoder)


def from_spec(kind: str, spec: dict[str, Any]) -> Any:
    """Rebuild an encoder from a manifest entry; refuses a version other than the registered one."""
    enc = get_encoder(kind, spec["name"], **spec.get("params", {}))
    if str(spec.get("version")) != str(enc.version):
        raise InputError(
            f"{kind} encoder {spec['name']!r}: the data was built with version {spec.get('version')}, "
            f"this code has version {enc.version}; re-run data_pipeline.prepare or pin the old code"
        )
    return enc


def from_manifest(manifest: dict[str, Any], kind: str) -> Any:
    """The `kind` encoder recorded in a prepared dataset's manifest.json (a dict; data_pipeline.dataset.manifest)."""
    try:
        spec = manifest["encoders"][kind]
    except KeyError as e:
        raise KeyError(f"manifest has no encoders.{kind}; was it written by data_pipeline.prepare?") from e
    return from_spec(kind, spec)


__all__ = [
    "DCT",
    "EncoderSpec",
    "HashText",
    "LogMel",
    "SpaceToDepth",
    "frame_multiple",
    "from_manifest",
    "from_spec",
    "get_audio_encoder",
    "get_encoder",
    "get_text_encoder",
    "get_video_encoder",
    "names",
    "register",
    "spatial_factor",
    "temporal_factor",
    "time_map",
]
