"""Synthetic A-roll that behaves like real footage: talking heads speaking espeak-ng sentences.

    python -m data_pipeline.synthesize --out=DIR --clips=N --seconds=S --seed=K [--size=64x64] [--speaker=J]

Writes DIR/clip_00000.mp4 (H.264 at 25 fps + AAC 16 kHz mono, the same kind of file as real footage,
so it goes through the same ingest) and DIR/clip_00000.json, the ground truth for evaluation:
caption, transcript, voice, per-frame `mouth` opening (one float per 25 fps frame), `mouth_center`
(x, y pixels per frame) and the drawn identity. Clip i depends only on (seed, i): deterministic, and
any subset can be regenerated. By default every clip is a new speaker (its own face and voice); with
`--speaker=J` every clip is speaker J (the face and voice drawn from J alone, the same in any --out and
--seed), saying other sentences with other blinks per (seed, i): one presenter's footage, e.g. for LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from etils import epath
from tqdm import tqdm

from data_pipeline.buckets import parse_size
from data_pipeline.ingest import media
from data_pipeline.synthetic import speech, talking_head
from mirage_base.errors import ExitCode, MirageError

SIDECAR_VERSION = "1"
SPEAKER_STREAM = 0x5BEA4E  # the seed stream of `--speaker`: np.random.default_rng([SPEAKER_STREAM, speaker])


def speaker_identity(speaker: int) -> tuple[talking_head.Identity, tuple[str, int, int]]:
    """Speaker `speaker`'s face and voice (`speech.sample_voice`'s triple), a function of `speaker` alone."""
    who = np.random.default_rng([SPEAKER_STREAM, speaker])
    return talking_head.Identity.sample(who), speech.sample_voice(who)


def make_clip(out_dir: str, index: int, seconds: float, seed: int, size: tuple[int, int],
              speaker: int | None = None) -> str:
    """Write clip `index` (mp4 + sidecar json) into `out_dir`; returns the mp4 path. `speaker`: None, a new
    speaker per clip; else that speaker's face and voice (`speaker_identity`)."""
    rng = np.random.default_rng([seed, index])
    w, h = size
    n = int(round(seconds * media.FPS))
    fixed = speaker_identity(speaker) if speaker is not None else None
    audio, transcript, voice = speech.utterance(rng, n / media.FPS, fixed[1] if fixed else None)
    mouth = speech.mouth_track(audio, n)
    ident = fixed[0] if fixed else talking_head.Identity.sample(rng)
    eyes = talking_head.blink_track(rng, n)
    frames, centres = talking_head.render(ident, mouth, eyes, h, w, media.FPS)
    base = epath.Path(out_dir) / f"clip_{index:05d}"
    mp4 = base.with_suffix(".mp4")
    media.write_mp4(mp4, frames, audio)
    sidecar = {
        "version": SIDECAR_VERSION,
        "caption": ident.caption(),
        "transcript": transcript,
        "fps": media.FPS,
        "sample_rate": media.SAMPLE_RATE,
        "num_frames": n,
        "width": w,
        "height": h,
        "seed": seed,
        "index": index,
        "voice": voice,
        "identity": dataclasses.asdict(ident),
        "mouth": [round(float(v), 6) for v in mouth],
        "mouth_center": [[round(float(x), 3), round(float(y), 3)] for x, y in centres],
        "eyes": [round(float(v), 3) for v in eyes],
    }
    if speaker is not None:  # absent by default: the default sidecars keep their bytes
        sidecar["speaker"] = speaker
    base.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return os.fspath(mp4)


class StaleClipsError(MirageError, ValueError):
    """--out holds clips of an earlier, larger run that this one would leave behind (exit 2)."""

    exit_code = ExitCode.REFUSED


def _index_below(name: str, clips: int) -> bool:
    """Is `clip_NNNNN.mp4` one of the first `clips` clips (rewritten by this run)?"""
    digits = name[len("clip_"):-len(".mp4")]
    return digits.isdigit() and int(digits) < clips


def _job(args: tuple[str, int, float, int, tuple[int, int], int | None]) -> str:
    return make_clip(*args)


def synthesize(
    out: str,
    clips: int,
    seconds: float,
    seed: int,
    size: tuple[int, int] = (64, 64),
    workers: int = 0,
    progress: bool = True,
    speaker: int | None = None,
) -> list[str]:
    """Write `clips` synthetic clips of `seconds` each into `out`; returns the mp4 paths in order. `speaker`:
    every clip that one speaker (module docstring); None: a new speaker per clip."""
    if clips < 1 or seconds <= 0:
        raise ValueError(f"--clips={clips} must be >= 1 and --seconds={seconds} > 0")
    root = epath.Path(out)
    stale = sorted(p.name for p in root.glob("clip_*.mp4") if not _index_below(p.name, clips)) if root.exists() else []
    if stale:  # prepare ingests every clip of the folder: a smaller run must not leave an earlier run's behind
        raise StaleClipsError(f"--out={out} already holds {len(stale)} clip(s) this run would not rewrite "
                              f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); data_pipeline.prepare "
                              "would ingest them too. Use an empty --out, or delete them")
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, seconds, seed, size, speaker) for i in range(clips)]
    bar = tqdm(total=clips, desc="synthesize", unit="clip", disable=not progress)
    paths = []
    if workers > 0:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for p in pool.imap(_job, jobs):
                paths.append(p)
                bar.update()
    else:
        for j in jobs:
            paths.append(_job(j))
            bar.update()
    bar.close()
    return paths


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("out", None, "Output directory (local or gs://).", required=True)
    flags.DEFINE_integer("clips", 8, "Number of clips.", lower_bound=1)
    flags.DEFINE_float("seconds", 3.0, "Length of every clip in seconds.", lower_bound=0.04)
    flags.DEFINE_integer("seed", 0, "Seed; clip i depends only on (seed, i).")
    flags.DEFINE_string("size", "64x64", "Frame size WxH (even numbers).")
    flags.DEFINE_integer("workers", 0, "Worker processes (0: in this process).", lower_bound=0)
    flags.DEFINE_integer("speaker", None, "Every clip is this one speaker (face and voice from this number "
                         "alone); default: a new speaker per clip.", lower_bound=0)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    paths = synthesize(
        FLAGS.out, FLAGS.clips, FLAGS.seconds, FLAGS.seed, parse_size(FLAGS.size), FLAGS.workers,
        speaker=FLAGS.speaker,
    )
    print(f"wrote {len(paths)} clips to {FLAGS.out}")


if __name__ == "__main__":
    from mirage_base.cli import run

    define_flags()
    run(main, "synthesize")
