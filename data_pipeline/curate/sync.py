"""Audio-visual sync (`--syncnet-weights`): each kept clip's SyncNet offset and confidence on its face crop.

The face crop is the SyncNet reference's (data_pipeline.ingest.faces: the clip's track interpolated to every
frame, median-smoothed, cropped 224 x 224). The scoring is mirage_jax.eval.sync's, run as its command
(`python -m mirage_jax.eval.sync --cropped --json`) in a child process per source on the clips' crops written
as mp4 (H.264 crf 18 + AAC, as any scored video): data_pipeline never imports mirage_jax (the import rule of
docs/architecture.md), and the child loads JAX and the weights once per source batch, not in the pipeline.

Per clip: offset o (frames; audio delayed by d frames gives o = -d) and confidence c (LSE-C). c <
`min_confidence` drops the clip; |o| > `max_offset` drops it (too far to trust a shift); otherwise the clip's
audio is read -o frames later (`plan.shifts`), which puts it in sync. Both are recorded (`sync_offset`,
`sync_conf`). A source without audio fails this stage (named; kept out). Cost: the child process starts JAX
and compiles SyncNet once per source (seconds), on top of the embedding work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from data_pipeline.curate.plan import Clip, CurateConfig, SourcePlan, display_frames
from data_pipeline.ingest import faces, media
from mirage_base.errors import InputError

TIMEOUT_S = 1800


def face_crops(clip: Clip, frames: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 [T, 224, 224, 3]: the reference crop of each of the clip's display frames around its track."""
    assert clip.track is not None
    ks = np.arange(clip.start, clip.stop)
    boxes = np.stack([np.interp(ks, clip.track[:, 0], clip.track[:, j]) for j in range(1, 5)], axis=1)
    s, x, y = faces.smooth_boxes(boxes)
    return np.stack([faces.crop(f, s[i], x[i], y[i]) for i, f in enumerate(frames)])


def _scorer(weights: str, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """`python -m mirage_jax.eval.sync --weights=weights *args` as a child process (data_pipeline never imports
    mirage_jax); returns it and the last line of its stderr."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mirage_jax.eval.sync", f"--weights={weights}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    return out, (out.stderr.strip().splitlines() or ["no output"])[-1]


def check_weights(weights: str) -> None:
    """InputError naming --syncnet-weights unless the scorer loads `weights` as SyncNet's state dict (its
    `--check_weights`: the reader and key/shape check of mirage_jax.eval.syncnet, nothing scored)."""
    out, tail = _scorer(weights, "--check_weights")
    if out.returncode != 0:
        why = tail.split(f"--weights={weights}", 1)[-1].lstrip(": ")
        raise InputError(f"--syncnet-weights={weights}: {why}")


def score(files: list[str], weights: str) -> list[dict]:
    """mirage_jax.eval.sync's JSON line per file (offset, lse_c, ... or error), run as a child process."""
    out, tail = _scorer(weights, "--cropped", "--json", *files)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if len(lines) != len(files):
        raise RuntimeError(f"the SyncNet scorer (python -m mirage_jax.eval.sync) failed: {tail}")
    return lines


def apply(plan: SourcePlan, cfg: CurateConfig) -> None:
    info = media.probe(plan.path)
    if not info.has_audio:
        raise ValueError("no audio stream: SyncNet scores speech against the face")
    live = [c for c in plan.live() if c.track is not None]
    if not live:
        return
    raw, off = media.decode_audio_16k(plan.path, info.t0)
    audio = media.align_audio(raw, off, info.num_frames)
    owner = {k: c for c in live for k in range(c.start, c.stop)}
    held: dict[int, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="mirage-sync-") as tmp:
        files = []
        for k, rgb in display_frames(plan.path):
            c = owner.get(k)
            if c is None:
                continue
            held.setdefault(c.start, []).append(rgb)
            if k + 1 == c.stop:
                f = os.path.join(tmp, f"clip_{c.start:07d}.mp4")
                crops = face_crops(c, held.pop(c.start))
                media.write_mp4(f, crops, audio[c.start * media.HOP:c.stop * media.HOP])
                files.append((c, f))
        if len(files) != len(live):
            raise RuntimeError(f"decoding stopped before frame {max(c.stop for c in live)}; the file may be truncated")
        results = score([f for _, f in files], cfg.syncnet_weights or "")
    for (c, _), r in zip(files, results, strict=True):
        if "error" in r:
            c.drop, c.stage = f"sync: {r['error'].rsplit(': ', 1)[-1]}", "sync"
            continue
        o, conf = int(r["offset"]), float(r["lse_c"])
        c.values["sync_offset"], c.values["sync_conf"] = o, round(conf, 3)
        if conf < cfg.min_confidence:
            c.drop, c.stage = f"SyncNet confidence {conf:.2f} < {cfg.min_confidence:g}", "sync"
        elif abs(o) > cfg.max_offset:
            c.drop, c.stage = f"SyncNet offset {o:+d} frames beyond +-{cfg.max_offset}", "sync"
        elif o:
            plan.shifts[c.start] = -o
