"""Generate A-roll video from speech with a trained checkpoint.

    python -m mirage_jax.generate --checkpoint=WORKDIR --out=video.mp4 (--audio=speech.wav | --say="text")
        [--caption=...] [--ref=image.png] [--seconds=S] [--steps=N] [--cfg_audio=A] [--cfg_text=T] [--seed=K]

Speech comes from any file PyAV reads (WAV, MP3, MP4, ...), or is synthesized with espeak-ng (`--say`,
the report's TTS integration). It goes through the SAME frozen encoders the run was trained with (named
with their versions in the data manifest the checkpoint's config points at, or `--data`), then the Euler
sampler with per-modality guidance, then the video encoder's decoder, and is written as an mp4 (H.264 at
25 fps) with the input audio muxed in, plus a JSON sidecar (prompt, settings, checkpoint step).

Several prompts in one call: repeat `--audio` / `--say` (and `--caption` / `--ref`, once for all or once
per prompt); `--out` is then a directory. Prompts run together as one batch (padded frames are masked),
sharded over all devices on the mesh's batch axis, and over its `sequence` axis with
`--sequence_parallel=N` for long clips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax.core import spmd as core_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from data_pipeline import encoders as enc_lib
from data_pipeline import manifest as mf
from data_pipeline import media, speech
from data_pipeline.encoders.time_map import TimeMap, of_manifest
from mirage_jax.config import ModelConfig
from mirage_jax.diffusion.sampler import guided_velocity, model_velocity_fn
from mirage_jax.diffusion.schedules import linear_quadratic_schedule
from mirage_jax.inference import LoadedRun
from mirage_jax.parallel import mesh as mesh_lib
from mirage_jax.parallel import rules as rules_lib

COND_KEYS = ("text", "text_mask", "audio", "audio_mask", "ref", "ref_time", "ref_mask", "video_mask")
SAY_VOICE = {"voice": "en-us+m3", "rate": 160, "pitch": 50}


class GenerateError(ValueError):
    """The checkpoint, the encoders and the inputs do not fit together; the message says which and why."""


# ----------------------------------------------------------------------------------------------- encoders
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
    p = os.fspath(source)
    if p.endswith(mf.MANIFEST):
        return os.path.dirname(p)
    if any(ch in os.path.basename(p) for ch in "*?["):
        return os.path.dirname(p)
    return p


def load_encoders(run_config: dict[str, Any], data: str | None = None) -> Encoders:
    """Encoders from `data` (a prepared dataset) or from the dataset the run trained on."""
    source = data or run_config.get("data", {}).get("source", "synthetic")
    if source == "synthetic":
        raise GenerateError("the checkpoint was trained on data.source='synthetic' (random arrays): no manifest "
                            "says which encoders its latents belong to. Pass --data=DIR, a data_pipeline.prepare "
                            "output whose encoders match the model")
    d = dataset_dir(source)
    try:
        manifest = mf.read_manifest(d)
    except (FileNotFoundError, ValueError) as e:
        raise GenerateError(f"cannot read the encoders of the run's data ({e}); pass --data=DIR of the prepared "
                            "dataset the model was trained on") from e
    try:
        encs = [enc_lib.from_manifest(manifest, k) for k in ("video", "audio", "text")]
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


# ----------------------------------------------------------------------------------------------- prompts
@dataclasses.dataclass
class Prompt:
    """One video to generate: speech (16 kHz mono), caption, optional reference frame."""

    waveform: np.ndarray
    num_frames: int
    caption: str = ""
    ref_frame: np.ndarray | None = None  # uint8 [H, W, 3] at the model's frame size
    ref_time: float = -25.0  # 25 fps frames relative to the clip start (outside the clip, as in training)
    source: str = ""


def read_speech(path: str) -> np.ndarray:
    """16 kHz mono float32 waveform of any file PyAV can decode (WAV, MP3, MP4, ...)."""
    if not epath.Path(path).exists():
        raise GenerateError(f"--audio={path}: no such file")
    try:
        wave, offset = media.decode_audio_16k(path, 0.0)
    except Exception as e:  # noqa: BLE001 - PyAV raises many types
        raise GenerateError(f"--audio={path}: cannot decode audio ({type(e).__name__}: {e})") from e
    if wave.size == 0:
        raise GenerateError(f"--audio={path}: the file has no audio stream (or it is empty)")
    if offset > 0:
        wave = np.concatenate([np.zeros(int(round(offset * media.SAMPLE_RATE)), np.float32), wave])
    return wave.astype(np.float32)


def say(text: str) -> np.ndarray:
    """Speech for `text` from espeak-ng (16 kHz mono), the report's TTS integration."""
    if not text.strip():
        raise GenerateError("--say: empty text")
    return speech.speak(text, **SAY_VOICE)


def read_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """First frame of an image (or video) file, resized to (height, width), uint8 RGB."""
    import av

    if not epath.Path(path).exists():
        raise GenerateError(f"--ref={path}: no such file")
    h, w = size
    try:
        with av.open(path) as c:
            frame = next(c.decode(video=0))
            return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
    except (StopIteration, av.error.FFmpegError, IndexError) as e:
        raise GenerateError(f"--ref={path}: cannot read an image from it ({e})") from e


def frames_for(seconds: float | None, waveform: np.ndarray) -> int:
    """25 fps frames to generate: `seconds`, or the speech's length (latents are sized to cover them by the
    encoder's time map, and the decoded video is cropped to exactly this many frames)."""
    n = int(round(seconds * media.FPS)) if seconds else len(waveform) // media.HOP
    if n < 8:
        raise GenerateError(f"the clip would have {n} frames ({n / media.FPS:.2f} s); give at least 0.32 s of "
                            "speech (or --seconds)")
    return n


def encode_prompts(prompts: Sequence[Prompt], encs: Encoders, mcfg: ModelConfig, pad_to: int) -> dict[str, np.ndarray]:
    """Conditioning batch (padded to `pad_to` rows and the longest clip; padding masked out)."""
    tf = encs.temporal_factor
    frames = max(p.num_frames for p in prompts)
    latents = encs.latent_frames(frames)
    audio_frames = encs.time_map.frames_for_latents(latents)  # every audio token has a latent frame
    rows = []
    for p in prompts:
        audio = encs.audio.encode(p.waveform[: p.num_frames * media.HOP], num_frames=p.num_frames)
        text, text_mask = encs.text.encode(p.caption)
        if text.shape[0] > mcfg.max_text_len:
            raise GenerateError(f"the text encoder gives {text.shape[0]} tokens; model.max_text_len is "
                                f"{mcfg.max_text_len}")
        if p.ref_frame is not None:
            ref = encs.video.encode(np.repeat(p.ref_frame[None], tf, axis=0))[:1]
        else:
            ref = np.zeros((1, *encs.latent_hwc), np.float32)
        pad = audio_frames - p.num_frames
        rows.append({
            "audio": np.pad(audio, ((0, pad), (0, 0))),
            "audio_mask": np.arange(audio_frames) < p.num_frames,
            "text": text, "text_mask": text_mask.astype(bool),
            "ref": ref, "ref_time": np.float32(p.ref_time), "ref_mask": np.bool_(p.ref_frame is not None),
            "video_mask": np.arange(latents) < encs.latent_frames(p.num_frames),
        })
    while len(rows) < pad_to:  # filler rows: every token masked, outputs discarded
        filler = {k: np.zeros_like(v) for k, v in rows[0].items()}
        rows.append(filler)
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------------------------- sampling
def generation_mesh(sequence_parallel: int = 1) -> Mesh:
    """All devices: `sequence` = `sequence_parallel`, `data` = the rest (fsdp = tensor = 1)."""
    cfg = ml_collections.ConfigDict({"ici": dict(data=-1, fsdp=1, sequence=sequence_parallel, tensor=1),
                                     "dcn": dict(data=1, fsdp=1, sequence=1, tensor=1)})
    return mesh_lib.build_mesh(cfg)


def sample_latents(run: LoadedRun, cond: dict[str, np.ndarray], latent_shape: tuple[int, ...], *, steps: int,
                   cfg_audio: float, cfg_text: float, schedule: str = "constant", seed: int = 0,
                   mesh: Mesh | None = None, progress: bool = True, desc: str = "sample") -> np.ndarray:
    """Euler sampling (the same update as `diffusion.sampler.euler_sample`) with a progress bar.

    One jitted guided Euler step per noise level; the batch is sharded on the mesh's batch axes (and tokens
    over `sequence`) by the run's activation rules. Returns latents (B, T, H, W, C) as numpy.
    """
    act_rules: Any = ()
    if mesh is not None:
        act_rules, _ = rules_lib.effective_activation_rules(rules_lib.normalize_rules(
            run.config["mesh"]["rules"]["activations"], "mesh.rules.activations", mesh))
    batch_axes = dict(act_rules).get("batch") if act_rules else None

    def put(x: np.ndarray) -> jax.Array:
        if mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))))

    levels = np.asarray(linear_quadratic_schedule(steps, run.diffusion_config.lq_threshold), np.float32)
    noise = jax.random.normal(jax.random.key(seed), latent_shape, jnp.float32)
    c = {k: put(np.asarray(v)) for k, v in cond.items() if k in COND_KEYS}
    fn, state = model_velocity_fn(run.model, c)
    if mesh is not None:  # a model restored onto one device (load_run without a mesh) is replicated over the mesh
        devices = set(mesh.devices.flat)
        rep = NamedSharding(mesh, PartitionSpec())
        state = jax.tree.map(lambda v: v if isinstance(v, jax.Array) and v.sharding.device_set == devices
                             else jax.device_put(v, rep), state)

    def step(x: jax.Array, t: jax.Array, t_next: jax.Array, st: Any) -> jax.Array:
        with core_spmd.logical_axis_rules(act_rules):
            v = guided_velocity(fn, x, t, cfg_text, cfg_audio, schedule, st)
        return x + (t - t_next) * v.astype(x.dtype)

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        x = put(np.asarray(noise))
        step_fn = jax.jit(step)
        for i in tqdm(range(len(levels) - 1), desc=desc, unit="step", disable=not progress, leave=False):
            x = step_fn(x, levels[i], levels[i + 1], state)
        return np.asarray(jax.device_get(x))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_video(latents: np.ndarray, encs: Encoders, num_frames: int) -> np.ndarray:
    """uint8 frames [num_frames, H, W, 3] from one sample's latents (T, H, W, C): the latents covering
    `num_frames` by the time map, through the encoder's decoder, cropped to `num_frames`."""
    return to_uint8(encs.video.decode(np.asarray(latents)[: encs.latent_frames(num_frames)]))[:num_frames]


def write_video(path: str | epath.Path, frames: np.ndarray, waveform: np.ndarray, sidecar: dict[str, Any]) -> None:
    """mp4 (H.264 25 fps + AAC 16 kHz of `waveform`) and `<path>.json`, each written whole or not at all."""
    dst = epath.Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = frames.shape[0]
    audio = np.zeros(n * media.HOP, np.float32)
    audio[: min(len(waveform), len(audio))] = waveform[: len(audio)]
    tmp = dst.parent / f".tmp-{uuid.uuid4().hex}-{dst.name}"
    try:
        media.write_mp4(tmp, frames, audio)
        tmp.replace(dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    side = dst.with_suffix(".json")
    tmp_side = dst.parent / f".tmp-{uuid.uuid4().hex}-{side.name}"
    tmp_side.write_text(json.dumps(sidecar, indent=1) + "\n")
    tmp_side.replace(side)


@dataclasses.dataclass
class Settings:
    steps: int = 16
    cfg_audio: float = 2.0
    cfg_text: float = 1.0
    schedule: str = "constant"
    seed: int = 0
    batch_size: int = 8
    sequence_parallel: int = 1
    window: int = 0  # > 0: speech longer than this many frames is generated in consecutive windows of it


def split_windows(p: Prompt, window: int, time_map: TimeMap) -> list[Prompt]:
    """A long prompt as consecutive windows of `window` frames (the clip length the model was trained on,
    rounded down to what its latents cover), each a fresh clip of the time map with its own slice of the
    speech; the last is padded with silence and cropped after decoding."""
    window = time_map.covered_frames(window)
    if window <= 0 or p.num_frames <= window:
        return [p]
    out = []
    for start in range(0, p.num_frames, window):
        n = min(window, p.num_frames - start)
        wave = np.zeros(window * media.HOP, np.float32)
        piece = p.waveform[start * media.HOP : (start + n) * media.HOP]
        wave[: len(piece)] = piece
        out.append(dataclasses.replace(p, waveform=wave, num_frames=window, ref_time=p.ref_time - start,
                                       source=f"{p.source}@{start}+{n}"))
    return out


def generate(run: LoadedRun, encs: Encoders, prompts: Sequence[Prompt], settings: Settings,
             progress: bool = True) -> list[np.ndarray]:
    """uint8 frames [T_i, H, W, 3] for every prompt (batched, sharded over all devices).

    With `settings.window`, prompts longer than it are cut into windows that are sampled as separate rows
    of the batch and concatenated (each window stays at the length the model was trained on)."""
    mcfg = run.model_config
    check_fit(mcfg, encs)
    if settings.window > 0:
        pieces = [split_windows(p, settings.window, encs.time_map) for p in prompts]
        flat = generate(run, encs, [q for ps in pieces for q in ps], dataclasses.replace(settings, window=0),
                        progress)
        out_w, k = [], 0
        for p, ps in zip(prompts, pieces, strict=True):
            out_w.append(np.concatenate(flat[k : k + len(ps)])[: p.num_frames])
            k += len(ps)
        return out_w
    mesh = generation_mesh(settings.sequence_parallel) if len(jax.devices()) > 1 else None
    data_size = mesh.shape["data"] if mesh is not None else 1
    per_call = max(data_size, settings.batch_size - settings.batch_size % data_size)
    h, w = encs.frame_size
    out: list[np.ndarray] = []
    for start in range(0, len(prompts), per_call):
        chunk = list(prompts[start : start + per_call])
        rows = math.ceil(len(chunk) / data_size) * data_size
        cond = encode_prompts(chunk, encs, mcfg, rows)
        t_lat = cond["video_mask"].shape[1]
        lat_h, lat_w = cond["ref"].shape[2:4]
        shape = (rows, t_lat, lat_h, lat_w, mcfg.latent_channels)
        lat = sample_latents(run, cond, shape, steps=settings.steps, cfg_audio=settings.cfg_audio,
                             cfg_text=settings.cfg_text, schedule=settings.schedule, seed=settings.seed + start,
                             mesh=mesh, progress=progress, desc=f"sample {start + 1}-{start + len(chunk)}")
        for i, p in enumerate(chunk):
            frames = decode_video(lat[i], encs, p.num_frames)
            if frames.shape[1:3] != (h, w):
                raise GenerateError(f"decoded frames are {frames.shape[1:3]}, expected {(h, w)}")
            out.append(frames)
    return out


__all__ = [
    "Encoders", "GenerateError", "Prompt", "Settings", "check_fit", "decode_video", "encode_prompts", "frames_for",
    "generate", "load_encoders", "read_image", "read_speech", "sample_latents", "say", "split_windows", "write_video",
]


# ----------------------------------------------------------------------------------------------- CLI
def _per_prompt(values: list[str], n: int, name: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise GenerateError(f"--{name} was given {len(values)} times for {n} prompts; give it once (for all) or once "
                            "per prompt")
    return list(values)


def output_paths(out: str, n: int) -> list[epath.Path]:
    """`--out`: the mp4 for one prompt; for several, a directory (NNN.mp4 inside) or a pattern with `{i}`."""
    if "{i}" in out:
        return [epath.Path(out.format(i=i)) for i in range(n)]
    p = epath.Path(out)
    if n == 1 and p.suffix.lower() == ".mp4":
        return [p]
    if p.suffix:
        raise GenerateError(f"--out={out}: {n} prompts need a directory or a pattern with {{i}}, not one file")
    return [p / f"{i:03d}.mp4" for i in range(n)]


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    from mirage_jax.inference import load_run
    from mirage_jax.paths import exit_on_storage_error

    if len(argv) > 1:
        raise GenerateError(f"unexpected arguments {list(argv[1:])}")
    F = flags.FLAGS
    exit_on_storage_error("generate", F.checkpoint, F.out, F.data, *F.audio, *F.ref)
    speeches: list[tuple[np.ndarray, str]] = [(read_speech(a), f"audio:{a}") for a in F.audio or []]
    speeches += [(say(t), f"say:{t}") for t in F.say or []]
    if not speeches:
        raise GenerateError("give the speech: --audio=FILE (WAV/MP3/MP4...) or --say='text to speak' (repeatable)")
    run = load_run(F.checkpoint, ema=F.ema)
    encs = load_encoders(run.config, F.data)
    check_fit(run.model_config, encs)
    n = len(speeches)
    captions = _per_prompt(F.caption or [], n, "caption")
    refs = _per_prompt(F.ref or [], n, "ref")
    paths = output_paths(F.out, n)
    prompts = []
    for (wave, src), cap, ref in zip(speeches, captions, refs, strict=True):
        frames = frames_for(F.seconds, wave)
        if frames > encs.clip_frames:
            how = (f"in {math.ceil(frames / encs.clip_frames)} windows of {encs.clip_frames}" if F.window
                   else "in one piece (--nowindow)")
            print(f"note: {src} gives {frames} frames; the model was trained on {encs.clip_frames}-frame clips: "
                  f"generating {how}")
        prompts.append(Prompt(waveform=wave, num_frames=frames, caption=cap or "",
                              ref_frame=read_image(ref, encs.frame_size) if ref else None,
                              ref_time=float(F.ref_time), source=src))
    d = run.diffusion_config
    settings = Settings(steps=F.steps or d.sample_steps, cfg_audio=F.cfg_audio, cfg_text=F.cfg_text,
                        schedule=F.cfg_schedule, seed=F.seed, batch_size=F.batch_size,
                        sequence_parallel=F.sequence_parallel, window=encs.clip_frames if F.window else 0)
    videos = generate(run, encs, prompts, settings)
    for p, frames, path in zip(prompts, videos, paths, strict=True):
        side = {"source": p.source, "caption": p.caption, "num_frames": int(frames.shape[0]), "fps": media.FPS,
                "checkpoint": os.fspath(run.step_dir), "step": run.step, "weights": run.weights,
                "settings": dataclasses.asdict(settings), "encoders": encs.manifest["encoders"],
                "mouth": [round(float(v), 6) for v in speech.mouth_track(p.waveform, int(frames.shape[0]))]}
        write_video(path, frames, p.waveform, side)
        print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[0] / media.FPS:.2f} s)")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ folder, or one step folder.",
                        required=True)
    flags.DEFINE_string("out", None, "Output mp4 (one prompt), or a directory / pattern with {i} (several).",
                        required=True)
    flags.DEFINE_multi_string("audio", [], "Speech file (WAV, MP3, MP4, ...); repeat for several prompts.")
    flags.DEFINE_multi_string("say", [], "Text to speak with espeak-ng; repeat for several prompts.")
    flags.DEFINE_multi_string("caption", [], "Caption (once for all prompts, or once per prompt).")
    flags.DEFINE_multi_string("ref", [], "Reference image (once for all prompts, or once per prompt).")
    flags.DEFINE_float("ref_time", -25.0, "Reference frame position in 25 fps frames relative to the clip start.")
    flags.DEFINE_float("seconds", None, "Clip length (default: the speech's length).")
    flags.DEFINE_integer("steps", None, "Euler steps (default: the run's diffusion.sample_steps).")
    flags.DEFINE_float("cfg_audio", 2.0, "Audio guidance scale (1 = no guidance).")
    flags.DEFINE_float("cfg_text", 1.0, "Text guidance scale (1 = no guidance).")
    flags.DEFINE_enum("cfg_schedule", "constant", ["constant", "cosine"], "Guidance over noise levels.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 8, "Prompts sampled together.")
    flags.DEFINE_integer("sequence_parallel", 1, "Devices that split each clip's tokens (long clips).")
    flags.DEFINE_bool("window", True, "Generate speech longer than the training clips in windows of that length "
                      "(--nowindow: one long clip; use --sequence-parallel for memory).")
    flags.DEFINE_bool("ema", False, "Use the EMA parameters instead of the raw ones.")
    flags.DEFINE_string("data", None, "Prepared dataset whose encoders to use (default: the run's data.source).")


if __name__ == "__main__":
    import sys

    from absl import app

    from data_pipeline.cli import dashed_flags_parser

    define_flags()

    def _main(argv: Sequence[str]) -> None:
        from mirage_jax.checkpoint_format import CheckpointError

        try:
            main(argv)
        except (GenerateError, CheckpointError, FileNotFoundError) as e:  # a user's path or input: one line
            print(f"generate: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, flags_parser=dashed_flags_parser)
