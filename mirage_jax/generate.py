"""Generate A-roll video from speech with a trained checkpoint.

    python -m mirage_jax.generate --checkpoint=WORKDIR --out=video.mp4 (--audio=speech.wav | --say="text")
        [--caption=...] [--ref=image.png] [--seconds=S] [--steps=N] [--cfg_audio=A] [--cfg_text=T] [--seed=K]
        [--cache=none|cfg|mag|cfg+mag] [--calibrate_cache]

Speech comes from any file PyAV reads (WAV, MP3, MP4, ...), or is synthesized with espeak-ng (`--say`,
the report's TTS integration). It goes through the SAME frozen encoders the run was trained with (named
with their versions in the data manifest the checkpoint's config points at, or `--data`; `run_encoders`), then
the Euler sampler with per-modality guidance (`sampling`: steps and guidance default to the run's own
`diffusion.sample_steps / cfg_audio / cfg_text / cfg_schedule`), then the video encoder's decoder, and is written
as an mp4 (H.264 at 25 fps) with the input audio muxed in, plus a JSON sidecar (prompt, settings, checkpoint step).

Several prompts in one call: repeat `--audio` / `--say` (and `--caption` / `--ref`, once for all or once
per prompt, in the order the prompts appear on the command line); `--out` is then a directory, whose
000.mp4, 001.mp4, ... follow that order (an earlier run's numbered outputs beyond them are removed once this
run's are written, so the folder holds this run's outputs; other files stay). Prompts run together as one
batch (padded frames are masked), sharded over all devices on the mesh's batch axis, and over its `sequence`
axis with `--sequence_parallel=N` for long clips.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from data_pipeline.ingest import media
from data_pipeline.synthetic import speech
from mirage_base.time_map import TimeMap
from mirage_jax.config import ModelConfig
from mirage_jax.inference import LoadedRun
from mirage_jax.run_encoders import Encoders, GenerateError, check_fit, decode_video, load_encoders
from mirage_jax.sampling import SamplingSettings, generation_mesh, sample_latents

SAY_VOICE = {"voice": "en-us+m3", "rate": 160, "pitch": 50}


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


def generate(run: LoadedRun, encs: Encoders, prompts: Sequence[Prompt], settings: SamplingSettings,
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
        lat = sample_latents(run, cond, shape, settings, seed=settings.seed + start, mesh=mesh, progress=progress,
                             desc=f"sample {start + 1}-{start + len(chunk)}")
        for i, p in enumerate(chunk):
            frames = decode_video(lat[i], encs, p.num_frames)
            if frames.shape[1:3] != (h, w):
                raise GenerateError(f"decoded frames are {frames.shape[1:3]}, expected {(h, w)}")
            out.append(frames)
    return out


__all__ = [
    "Prompt", "encode_prompts", "frames_for", "generate", "output_paths", "prompt_order", "read_image", "read_speech",
    "say", "split_windows", "write_video",
]


# ----------------------------------------------------------------------------------------------- cache
def calibrate_cache(run: LoadedRun, encs: Encoders, prompt: Prompt, settings: SamplingSettings,
                    schedule: str | None, threshold: float, max_skips: int) -> None:
    """`--calibrate_cache`: one uncached sample of `prompt` (its first window) -> the MagCache schedule file."""
    from mirage_jax.cache_schedule import calibrate, default_path

    if settings.window > 0:
        prompt = split_windows(prompt, settings.window, encs.time_map)[0]
    cond = encode_prompts([prompt], encs, run.model_config, 1)
    shape = (1, cond["video_mask"].shape[1], *cond["ref"].shape[2:4], run.model_config.latent_channels)
    sched = calibrate(run, cond, shape, settings, threshold=threshold, max_skips=max_skips)
    path = schedule or os.fspath(default_path(run))
    sched.write(path)
    print(f"wrote {path}: {sum(sched.skip)} of {sched.steps} steps skipped (threshold {threshold}, at most "
          f"{max_skips} in a row) for checkpoint step {run.step}")


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


def stale_outputs(out: str, paths: Sequence[epath.Path]) -> list[epath.Path]:
    """An earlier run's numbered outputs that this run's `paths` do not replace: in a directory `--out`, every
    `NNN.mp4` and `NNN.json` (three or more digits) beside them; for a pattern with `{i}`, every file the pattern
    gives for another number (and its .json sidecar). Empty for a single-file `--out`. `main` deletes them once
    this run's videos are written (`remove_stale_outputs`), so the folder holds exactly this run's outputs; other
    files in the folder are never touched."""
    keep = {os.fspath(p) for p in paths} | {os.fspath(p.with_suffix(".json")) for p in paths}
    if "{i}" in out:
        head, _, tail = out.partition("{i}")
        folder = epath.Path(os.path.dirname(head) or ".")
        name = re.compile(re.escape(os.path.basename(head)) + r"\d+" + re.escape(tail))
        sidecar = re.compile(re.escape(os.path.basename(head)) + r"\d+" + re.escape(
            str(epath.Path("x" + tail).with_suffix(".json"))[1:]))
        match = lambda n: bool(name.fullmatch(n) or sidecar.fullmatch(n))  # noqa: E731
    elif paths and paths[0].name != epath.Path(out).name:  # a directory of NNN.mp4
        folder = epath.Path(out)
        match = lambda n: bool(re.fullmatch(r"\d{3,}\.(mp4|json)", n))  # noqa: E731
    else:
        return []
    if "{i}" in os.path.dirname(out) or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if match(p.name) and os.fspath(p) not in keep)


def remove_stale_outputs(out: str, paths: Sequence[epath.Path]) -> list[epath.Path]:
    """Delete `stale_outputs(out, paths)` (called after this run's outputs are written); returns what went."""
    stale = stale_outputs(out, paths)
    for old in stale:
        old.unlink(missing_ok=True)
    return stale


def prompt_order(argv: Sequence[str], audio: Sequence[str], said: Sequence[str]) -> list[tuple[str, str]]:
    """("audio" | "say", value) of every prompt in the order of the command line `argv` (absl keeps the values of
    each repeated flag, not their order across flags). When `argv` does not show them all (a --flagfile),
    every --audio comes first, then every --say."""
    found: list[tuple[str, str]] = []
    args = list(argv[1:])
    for i, a in enumerate(args):
        if a == "--":
            break
        for name in ("audio", "say"):
            for flag in (f"--{name}", f"-{name}"):
                if a.startswith(flag + "="):
                    found.append((name, a[len(flag) + 1 :]))
                elif a == flag and i + 1 < len(args):
                    found.append((name, args[i + 1]))
    if [v for k, v in found if k == "audio"] != list(audio) or [v for k, v in found if k == "say"] != list(said):
        return [("audio", a) for a in audio] + [("say", t) for t in said]
    return found


def main(argv: Sequence[str]) -> None:
    import sys

    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    from mirage_base.storage import check_storage
    from mirage_jax.cache_schedule import apply_cache
    from mirage_jax.inference import load_run

    if len(argv) > 1:
        raise GenerateError(f"unexpected arguments {list(argv[1:])}")
    F = flags.FLAGS
    check_storage(F.checkpoint, F.out, F.data, *F.audio, *F.ref)
    speeches = [(read_speech(v) if kind == "audio" else say(v), f"{kind}:{v}")
                for kind, v in prompt_order(sys.argv, F.audio or [], F.say or [])]
    if not speeches:
        raise GenerateError("give the speech: --audio=FILE (WAV/MP3/MP4...) or --say='text to speak' (repeatable)")
    run = load_run(F.checkpoint, ema=F.ema)
    encs = load_encoders(run.config.data, F.data)
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
    settings = SamplingSettings.of_run(
        run.diffusion_config, steps=F.steps or None, cfg_audio=F.cfg_audio, cfg_text=F.cfg_text,
        schedule=F.cfg_schedule, seed=F.seed, batch_size=F.batch_size, sequence_parallel=F.sequence_parallel,
        window=encs.clip_frames if F.window else 0)
    if F.calibrate_cache:
        calibrate_cache(run, encs, prompts[0], settings, F.cache_schedule, F.cache_threshold, F.cache_max_skips)
        return
    settings, schedule_path = apply_cache(run, settings, F.cache, F.cache_schedule)
    videos = generate(run, encs, prompts, settings)
    for p, frames, path in zip(prompts, videos, paths, strict=True):
        side = {"source": p.source, "caption": p.caption, "num_frames": int(frames.shape[0]), "fps": media.FPS,
                "checkpoint": os.fspath(run.step_dir), "step": run.step, "weights": run.weights,
                "settings": dataclasses.asdict(settings), "cache_schedule": schedule_path,
                "encoders": encs.manifest["encoders"],
                "mouth": [round(float(v), 6) for v in speech.mouth_track(p.waveform, int(frames.shape[0]))]}
        write_video(path, frames, p.waveform, side)
        print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[0] / media.FPS:.2f} s)")
    stale = remove_stale_outputs(F.out, paths)
    if stale:
        print(f"removed {len(stale)} numbered output(s) of an earlier run from {F.out}: "
              f"{', '.join(p.name for p in stale[:6])}{' ...' if len(stale) > 6 else ''}")


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
    flags.DEFINE_integer("steps", None, "Euler steps (default: the run's diffusion.sample_steps).",
                         lower_bound=1)
    flags.DEFINE_float("cfg_audio", None, "Audio guidance scale, 1 = none (default: the run's diffusion.cfg_audio).")
    flags.DEFINE_float("cfg_text", None, "Text guidance scale, 1 = none (default: the run's diffusion.cfg_text).")
    flags.DEFINE_enum("cfg_schedule", None, ["constant", "cosine"],
                      "Guidance over noise levels (default: the run's diffusion.cfg_schedule).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 8, "Prompts sampled together.", lower_bound=1)
    flags.DEFINE_integer("sequence_parallel", 1, "Devices that split each clip's tokens (long clips).",
                         lower_bound=1)
    flags.DEFINE_bool("window", True, "Generate speech longer than the training clips in windows of that length "
                      "(--nowindow: one long clip; use --sequence-parallel for memory).")
    flags.DEFINE_bool("ema", False, "Use the EMA parameters instead of the raw ones.")
    flags.DEFINE_string("data", None, "Prepared dataset whose encoders to use (default: the run's data.source).")
    define_cache_flags()


def define_cache_flags() -> None:
    """generate's --cache, --cache_schedule (eval defines the same two) and the calibration flags."""
    from absl import flags

    flags.DEFINE_enum("cache", "none", ["none", "cfg", "mag", "cfg+mag"],
                      "Sampler caching (docs/export.md, 'Cached sampling'): cfg = guidance branches reused between "
                      "full steps; mag = calibrated step skipping (needs --calibrate_cache first).")
    flags.DEFINE_string("cache_schedule", None, "The MagCache schedule file (default: WORKDIR/cache_schedule.json).")
    flags.DEFINE_bool("calibrate_cache", False, "Sample the first prompt once, uncached, write the MagCache schedule "
                      "for this checkpoint and these steps/guidance to --cache_schedule, and exit (no video).")
    flags.DEFINE_float("cache_threshold", 0.06, "MagCache accumulated-error threshold (--calibrate_cache).",
                       lower_bound=0.0)
    flags.DEFINE_integer("cache_max_skips", 2, "MagCache's most consecutive skipped steps (--calibrate_cache).",
                         lower_bound=0)


if __name__ == "__main__":
    from mirage_base.cli import run
    from mirage_base.errors import ExitCode

    define_flags()
    run(main, "generate", also={FileNotFoundError: (ExitCode.REFUSED, "")})  # a user's path or input: one line, exit 2
