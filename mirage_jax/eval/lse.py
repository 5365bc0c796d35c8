"""SyncNet's LSE-C / LSE-D in the held-out report (`mirage_jax.eval --syncnet-weights=PATH`, the demo).

For the held-out clips: the generated videos against their own speech (per seed), the same videos against
another clip's speech (the floor: clip i's video with clip (i + shift) % n's speech, shift = 1 + seed % (n - 1),
the derangement eval/heldout.py's mouth-track floor uses) and the real clips (the ceiling), each averaged over
clips; generated and floor then as mean and spread (std) over seeds. Scoring: mirage_jax.eval.sync.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.ingest import faces
from mirage_jax.eval.mfcc import int16_scale, mfcc
from mirage_jax.eval.sync import AUDIO_PER_FRAME, WINDOW, Scorer, SyncInputError, SyncScore

LSE_KEYS = ("lse_c_generated", "lse_c_generated_std", "lse_d_generated", "lse_d_generated_std",
            "lse_c_shuffled", "lse_c_shuffled_std", "lse_d_shuffled", "lse_d_shuffled_std",
            "lse_c_real", "lse_d_real", "lse_offset_generated", "lse_offset_real")


def face_crops(rgb: np.ndarray, cropped: bool) -> tuple[np.ndarray, int, int]:
    """uint8 RGB frames [T, H, W, 3] -> (BGR 224 x 224 crops, first, last frame they cover). `cropped`: the frames
    are the face (resized); else the longest face track (data_pipeline.ingest.faces). SyncInputError without a face."""
    bgr = [np.ascontiguousarray(f[..., ::-1]) for f in np.asarray(rgb)]
    if cropped:
        return np.stack([faces.fit(f) for f in bgr]), 0, len(bgr) - 1
    tr = faces.track([faces.detect(f) for f in bgr])
    if tr is None:
        raise SyncInputError(f"no face detected in {len(bgr)} frames (OpenCV's Haar cascade)")
    s, x, y = faces.smooth_boxes(tr.boxes)
    first, last = int(tr.frames[0]), int(tr.frames[-1])
    return np.stack([faces.crop(bgr[k], s[k - first], x[k - first], y[k - first])
                     for k in range(first, last + 1)]), first, last


class _Pairs:
    """Scores of (video crops, speech) pairs with each video's lip embeddings and each speech stretch's audio
    embeddings computed once (the floor pairs every video with another clip's speech)."""

    def __init__(self, scorer: Scorer, waves: list[np.ndarray], vshift: int):
        self.scorer, self.waves, self.vshift = scorer, waves, vshift
        self._aud: dict[tuple[int, int, int], np.ndarray] = {}
        self._lip: dict[int, np.ndarray] = {}

    def score(self, video: Crops, wave: int) -> SyncScore:
        crops, first, last = video
        audio = int16_scale(self.waves[wave])[first * AUDIO_PER_FRAME:(last + 1) * AUDIO_PER_FRAME]
        n = min(len(crops), len(audio) // AUDIO_PER_FRAME)
        windows = n - WINDOW
        if windows < 1:  # the same one line as the CLI's
            return self.scorer.score_frames(crops, audio, self.vshift)
        key = (wave, first, last)
        if key not in self._aud:
            self._aud[key] = self.scorer.embed_audio(mfcc(audio), len(audio) // AUDIO_PER_FRAME - WINDOW)
        if id(crops) not in self._lip:
            self._lip[id(crops)] = self.scorer.embed_lip(crops, len(crops) - WINDOW)
        lip, aud = self._lip[id(crops)][:windows], self._aud[key][:windows]
        return self.scorer.score_embeddings(lip, aud, self.vshift, frames=n)


def _mean_std(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, np.float64)
    return float(a.mean()), float(a.std())


Crops = tuple[np.ndarray, int, int]


def lse_report(scorer: Scorer, generated: list[list[Crops]], real: list[Crops], waves: list[np.ndarray], *,
               vshift: int = 15) -> dict[str, Any]:
    """The LSE_KEYS for the generated videos' face crops [seed][clip] and the `real` clips' (`face_crops` of each
    video's uint8 RGB frames) against the clips' 16 kHz float speech `waves` [clip] (on the video clock). Needs 2
    clips or more (the floor)."""
    n = len(real)
    if n < 2 or len(waves) != n or any(len(g) != n for g in generated):
        raise ValueError(f"lse_report: {n} real clips, {len(waves)} waves, generated {[len(g) for g in generated]}")
    pairs = _Pairs(scorer, waves, vshift)
    gen_c, gen_d, shuf_c, shuf_d, offsets = [], [], [], [], []
    for s, crops in enumerate(generated):
        own = [pairs.score(crops[i], i) for i in range(n)]
        shift = 1 + s % (n - 1)
        other = [pairs.score(crops[i], (i + shift) % n) for i in range(n)]
        gen_c.append(float(np.mean([r.lse_c for r in own])))
        gen_d.append(float(np.mean([r.lse_d for r in own])))
        shuf_c.append(float(np.mean([r.lse_c for r in other])))
        shuf_d.append(float(np.mean([r.lse_d for r in other])))
        offsets += [r.offset for r in own]
    ceil = [pairs.score(v, i) for i, v in enumerate(real)]
    out: dict[str, Any] = {}
    for key, vals in (("lse_c_generated", gen_c), ("lse_d_generated", gen_d), ("lse_c_shuffled", shuf_c),
                      ("lse_d_shuffled", shuf_d)):
        out[key], out[f"{key}_std"] = _mean_std(vals)
    out["lse_c_real"] = float(np.mean([r.lse_c for r in ceil]))
    out["lse_d_real"] = float(np.mean([r.lse_d for r in ceil]))
    out["lse_offset_generated"] = int(np.median(offsets))
    out["lse_offset_real"] = int(np.median([r.offset for r in ceil]))
    return {k: out[k] for k in LSE_KEYS}


def heldout_waves(data: str, indices: list[int], frames: int) -> list[np.ndarray] | str:
    """16 kHz float speech [frames * 640] of the held-out records at sample positions `indices` (shard order),
    re-read from each record's source file at its start_frame; or the one-line reason it cannot be."""
    from data_pipeline.dataset.records import decode_record
    from data_pipeline.ingest import media
    from data_pipeline.loader.shards import ShardSource, resolve_shards

    shards = resolve_shards(data, "none")
    src = ShardSource(shards.paths, shards.counts)
    out = []
    for i in indices:
        _, data_bytes, why = src[i]
        if data_bytes is None:
            return f"LSE skipped: held-out record {i} cannot be read ({why})"
        meta = decode_record(data_bytes)[1]
        path, start = meta.get("source", ""), int(meta.get("start_frame", 0))
        try:
            info = media.probe(path)
        except (ValueError, OSError) as e:
            return f"LSE skipped: held-out clip {meta.get('clip_id')}'s source cannot be read for its speech ({e})"
        if not info.has_audio:
            return f"LSE skipped: held-out clip {meta.get('clip_id')}'s source {path} has no audio"
        raw, off = media.decode_audio_16k(path, info.t0)
        wave = media.align_audio(raw, off, info.num_frames)
        seg = wave[start * AUDIO_PER_FRAME:(start + frames) * AUDIO_PER_FRAME]
        out.append(np.pad(seg, (0, frames * AUDIO_PER_FRAME - len(seg))))
    return out
