"""The frozen encoders a run was trained with, rebuilt from its data manifest, and the check that they fit
the model (generate and eval both start here).

    encs = load_encoders(run.config.data)       # or load_encoders(run.config.data, data="gs://bkt/prepared")
    check_fit(run.model_config, encs)           # GenerateError listing every mismatch
    frames = decode_video(latents, encs, 75)    # uint8 [75, H, W, 3] through the video encoder's decoder
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from data_pipeline import encoders as enc_lib
from data_pipeline.dataset import manifest as mf
from data_pipeline.loader.shards import dataset_dirs
from mirage_base.batch_keys import STREAMS
from mirage_base.errors import ExitCode, MirageError
from mirage_base.time_map import TimeMap, of_manifest
from mirage_jax.config import ModelConfig
from mirage_jax.run_config import DataConfig


class GenerateError(MirageError, ValueError):
    """The checkpoint, the encoders and the inputs do not fit together; the message says which and why."""

    exit_code = ExitCode.REFUSED


@dataclasses.dataclass
class Encoders:
    """The frozen encoders of a prepared dataset, as its manifest records them."""

    video: Any
    audio: Any
    text: Any
    manifest: dict[str, Any]
    source: str  # the dataset directory

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the frames the data was encoded from."""
        shape = self.manifest["encoders"]["video"]["feature_shape"]
        f = enc_lib.spatial_factor(self.video)
        if shape[1] is None or shape[2] is None:
            raise GenerateError(f"{self.source}/manifest.json: the video latents have no fixed size "
                                f"({shape}); cannot tell the frame size to generate")
        return int(shape[1]) * f, int(shape[2]) * f

    @property
    def temporal_factor(self) -> int:
        return enc_lib.temporal_factor(self.video)

    @property
    def latent_hwc(self) -> tuple[int, int, int]:
        """(h, w, c) of one latent frame."""
        h, w, c = self.manifest["encoders"]["video"]["feature_shape"][1:]
        return int(h), int(w), int(c)

    @property
    def time_map(self) -> TimeMap:
        """The frame-to-latent map the data was encoded with (manifest.json `time_map`)."""
        return of_manifest(self.manifest)

    def latent_frames(self, frames: int) -> int:
        """Latent frames to sample for `frames` frames of speech: the fewest whose decoded frames cover them
        (s2d: ceil(frames / tf); Mochi on 25-frame chunks: 5 per chunk; whole clip: 1 + ceil((frames - 1) / 6))."""
        return self.time_map.latents_to_cover(frames)

    @property
    def clip_frames(self) -> int:
        """Frames per training clip that its latents cover (time_map.covered_frames of the manifest's clip_frames)."""
        return self.time_map.covered_frames(int(self.manifest["clip_frames"]))


def dataset_dir(source: str) -> str:
    """The prepared-dataset directory behind a `data.source` value (directory, manifest path or shard glob)."""
    return os.fspath(dataset_dirs(os.fspath(source))[0][0])


def window_bucket(top: dict[str, Any]) -> dict[str, Any]:
    """The bucket of a shape-bucketed dataset (its top-level manifest `top`, data_pipeline/buckets.py) whose
    encoders, frame size and clip length generate uses: the longest clip of the first size listed, so speech up
    to the longest trained clip is one window."""
    first = top["buckets"][0]["size"]
    return max((b for b in top["buckets"] if b["size"] == first), key=lambda b: b["clip_frames"])


def load_encoders(run_data: DataConfig, data: str | None = None, *, flag: str = "--data") -> Encoders:
    """Encoders from `data` (a prepared dataset) or from the dataset the run trained on (`run_data.source`);
    `flag`: the command's flag that passes `data`, named in the errors (generate: --data, eval: --train-data)."""
    source = data or run_data.source
    if source == "synthetic":
        raise GenerateError("the checkpoint was trained on data.source='synthetic' (random arrays): no manifest "
                            f"says which encoders its latents belong to. Pass {flag}=DIR, a data_pipeline.prepare "
                            "output whose encoders match the model")
    d = dataset_dir(source)
    top = mf.read_buckets_manifest(d)
    if top is not None:  # shape buckets: generate's window is the longest clip of the first listed size
        d = os.path.join(d, window_bucket(top)["path"])
    try:
        manifest = mf.read_manifest(d)
    except (FileNotFoundError, ValueError) as e:
        raise GenerateError(f"cannot read the encoders of the run's data ({e}); pass {flag}=DIR of the prepared "
                            "dataset the model was trained on") from e
    try:
        encs = [enc_lib.from_manifest(manifest, k) for k in STREAMS]
    except (KeyError, ValueError, TypeError) as e:
        raise GenerateError(f"{d}/manifest.json: {e}") from e
    return Encoders(*encs, manifest=manifest, source=d)


def check_fit(mcfg: ModelConfig, encs: Encoders) -> None:
    """Refuse (listing every mismatch) when the model's input sizes are not the encoders' output sizes."""
    venc_c = int(encs.manifest["encoders"]["video"]["feature_shape"][-1])
    problems = []
    if venc_c != mcfg.latent_channels:
        problems.append(f"video encoder {encs.video.name!r} gives {venc_c} latent channels, the model takes "
                        f"model.latent_channels={mcfg.latent_channels}")
    if int(encs.audio.feature_dim) != mcfg.audio_feature_dim:
        problems.append(f"audio encoder {encs.audio.name!r} gives {encs.audio.feature_dim} features per frame, the "
                        f"model takes model.audio_feature_dim={mcfg.audio_feature_dim}")
    if int(encs.text.feature_dim) != mcfg.text_embed_dim:
        problems.append(f"text encoder {encs.text.name!r} gives width {encs.text.feature_dim}, the model takes "
                        f"model.text_embed_dim={mcfg.text_embed_dim}")
    if encs.time_map.rule != mcfg.frame_map.rule:
        problems.append(f"the video latents were encoded with time map {encs.time_map.rule} (manifest.json "
                        f"time_map.rule), the model places audio by model.time_map={mcfg.time_map}")
    if not mcfg.use_audio:
        problems.append("the model has no audio stream (model.use_audio=False): it cannot be driven by speech")
    if problems:
        raise GenerateError(f"the checkpoint and the encoders of {encs.source} do not fit together:\n  - "
                            + "\n  - ".join(problems))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_video(latents: np.ndarray, encs: Encoders, num_frames: int) -> np.ndarray:
    """uint8 frames [num_frames, H, W, 3] from one sample's latents (T, H, W, C): the latents covering
    `num_frames` by the time map, through the encoder's decoder, cropped to `num_frames`."""
    return to_uint8(encs.video.decode(np.asarray(latents)[: encs.latent_frames(num_frames)]))[:num_frames]
