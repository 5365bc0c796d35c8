"""LSE-C / LSE-D: SyncNet's audio-video offset and confidence for any video, and its CLI.

    python -m mirage_jax.eval.sync --weights=syncnet_v2.model [--cropped] [--vshift=15] [--json] VIDEO [VIDEO ...]

Per video: offset (frames, the reference's `vshift - argmin`: audio delayed by d frames against the mouth
gives -d, audio early by d gives +d; 0 is in sync), LSE-D
(the minimum over shifts of the mean embedding distance; lower is better) and LSE-C (median minus minimum of
that curve; higher is better). With `--json`, one object per line: video, offset, lse_d, lse_c, frames. A video
that cannot be scored (no audio, shorter than a window, no face) gets one line saying so (a JSON object with
`error` under `--json`); the others are still scored; the exit status is 2 if any video could not be scored.

The scoring is SyncNetInstance.evaluate of joonson/syncnet_python (`score`), batched and jitted over windows:
- frames: 25 fps BGR uint8 224 x 224 face crops, values 0..255 (no normalisation); audio: 16 kHz mono at
  int16 scale -> MFCC (mirage_jax.eval.mfcc, python_speech_features' numbers), 4 MFCC frames per video frame;
- n = min(frames, floor(samples / 640)); windows i = 0 .. n - 6 (the reference's `range(0, n - 5)`): lip
  frames i..i+4, MFCC frames 4i..4i+19; each embedded (SyncNet, 1024-d);
- dists[i, k] = || lip[i] - aud_padded[i + k] + 1e-6 ||_2 for k = 0 .. 2 vshift, the audio embeddings padded
  with vshift zero rows on each side (calc_pdist with torch's pairwise_distance eps);
- mean over windows -> curve [2 vshift + 1]; offset = vshift - argmin; LSE-D = min; LSE-C = median - min.

Batches of windows can be spread over a device mesh (the batch axis sharded; `Scorer(mesh=...)`). Speed on
XLA:CPU (docs/eval.md, Benchmark): the network runs as 2D convolutions with BatchNorm folded in
(mirage_jax.eval.syncnet), compiled with CPU_COMPILER_OPTIONS; each batch size compiles once (`batch_sizes`, the
last batch padded) and so does the distance curve per power-of-two number of windows.
The curation filter and `mirage_jax.eval --syncnet-weights` call `Scorer` and `score_frames` from here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipeline.ingest import faces
from mirage_base.errors import ExitCode, MirageError
from mirage_jax.eval.mfcc import int16_scale, mfcc
from mirage_jax.eval.syncnet import SyncNet

WINDOW = 5  # video frames per window
MFCC_PER_FRAME = 4  # 100 Hz MFCC over 25 fps video
AUDIO_PER_FRAME = 640  # 16000 / 25 samples
VSHIFT = 15
BATCH = 32  # windows per jitted call


class SyncInputError(MirageError):
    """A video SyncNet cannot score (no audio, shorter than a window, no face); the message says which."""


@dataclasses.dataclass(frozen=True)
class SyncScore:
    """One video's scores. `offset` frames (the reference's `vshift - argmin`), `lse_d` (min mean distance),
    `lse_c` (median - min), `frames` the video frames scored, `windows` the 5-frame windows embedded,
    `curve` the mean distance per shift [2 vshift + 1] (shift k pairs video window i with audio window
    i + k - vshift)."""

    offset: int
    lse_d: float
    lse_c: float
    frames: int
    windows: int
    curve: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "lse_d": self.lse_d, "lse_c": self.lse_c, "frames": self.frames}


def audio_windows(feats: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """MFCC windows [len(starts), 13, 20, 1] float32 from MFCC frames `feats` [M, 13] (window i starts at MFCC
    frame 4 starts[i])."""
    idx = MFCC_PER_FRAME * starts[:, None] + np.arange(WINDOW * MFCC_PER_FRAME)[None]
    return np.ascontiguousarray(feats[idx].transpose(0, 2, 1)[..., None], np.float32)


def lip_windows(frames: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Lip windows [len(starts), 5, 224, 224, 3] uint8 from BGR frames [T, 224, 224, 3]."""
    return frames[starts[:, None] + np.arange(WINDOW)[None]]


def distance_curve(lip: jax.Array, aud: jax.Array, vshift: int) -> jax.Array:
    """[W, 2 vshift + 1] distances ||lip[i] - aud_padded[i + k] + 1e-6|| (the reference's calc_pdist)."""
    w = lip.shape[0]
    audp = jnp.pad(aud, ((vshift, vshift), (0, 0)))
    idx = jnp.arange(w)[:, None] + jnp.arange(2 * vshift + 1)[None]
    return jnp.sqrt(jnp.sum(jnp.square(lip[:, None, :] - audp[idx] + 1e-6), axis=-1))


# XLA:CPU hands 2D convolutions, dots and elementwise ops to YNNPACK by default (jax 0.10); on SyncNet's towers
# that ran 3-4x slower than XLA's own (Eigen) kernels, e.g. the first lip conv (7 x 7, stride 2, 15 -> 96
# channels on 224 x 224). An empty list of YNNPACK fusion kinds turns it off for the scorer's computations only.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options(platform: str) -> dict[str, Any]:
    """`jax.jit` compiler options for the scorer on `platform`: CPU_COMPILER_OPTIONS on "cpu" when this XLA
    knows them (an XLA without the option compiles with its defaults: slower, same numbers), else none."""
    if platform != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an XLA that does not know the option: keep its defaults
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def batch_sizes(batch: int, multiple: int = 1) -> list[int]:
    """The batch sizes a Scorer compiles for: powers of two times `multiple` below `batch`, and `batch` (a
    multiple of `multiple`); a video's windows go through the largest that is needed, the short last batch
    padded, so scoring many videos compiles at most log2(batch) + 1 shapes per tower."""
    out, b = [], multiple
    while b < batch:
        out.append(b)
        b *= 2
    return [*out, batch]


def mean_distance_curve(lip: jax.Array, aud: jax.Array, windows: jax.Array, vshift: int) -> jax.Array:
    """The mean over windows 0 .. windows-1 of `distance_curve` [2 vshift + 1], from embeddings [Wp, 1024] of
    which rows >= `windows` are zero padding (exact: the audio's zero rows stand where the reference pads
    with zeros, and the padded windows' rows are left out of the mean)."""
    d = distance_curve(lip, aud, vshift)
    keep = (jnp.arange(d.shape[0]) < windows)[:, None]
    return jnp.sum(jnp.where(keep, d, 0.0), axis=0) / windows


class Scorer:
    """SyncNet embeddings and scores, jitted; `mesh` (optional, 1-D) shards each batch of windows over its
    devices (the batch is rounded up to a multiple of the mesh size; the weights are replicated). One compiled
    shape per entry of `batch_sizes`; batches are dispatched without waiting for the previous one's result;
    `compiler_options` (`compiler_options(platform)`) are the XLA options every computation is compiled with."""

    def __init__(self, model: SyncNet, *, batch: int = BATCH, mesh: Mesh | None = None):
        self.mesh = mesh
        self._n = mesh.devices.size if mesh is not None else 1
        self.batch = -(-batch // self._n) * self._n
        self.sizes = batch_sizes(self.batch, self._n)
        graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self.state = state
        self._in = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])) if mesh is not None else None
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        self.compiler_options = opts = dict(compiler_options(platform))

        def lip(state: Any, lips: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).lip(lips)

        def audio(state: Any, auds: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).audio(auds)

        self._lip = jax.jit(lip, compiler_options=opts)
        self._audio = jax.jit(audio, compiler_options=opts)
        self._curve = jax.jit(mean_distance_curve, static_argnums=3, compiler_options=opts)

    def _batches(self, windows: int, make: Any, fn: Any) -> np.ndarray:
        b = next((s for s in self.sizes if s >= windows), self.batch)
        out = []
        for i in range(0, windows, b):
            starts = np.arange(i, min(windows, i + b))
            x = make(np.concatenate([starts, np.full(b - len(starts), starts[-1])]))
            if self._in is not None:
                x = jax.device_put(x, self._in)
            out.append((fn(self.state, x), len(starts)))  # not waited for: the next batch is built meanwhile
        return np.concatenate([np.asarray(y)[:k] for y, k in out])

    def embed_lip(self, frames: np.ndarray, windows: int) -> np.ndarray:
        """Lip embeddings [windows, 1024] of windows 0 .. windows-1 of BGR uint8 frames [T, 224, 224, 3]."""
        return self._batches(windows, lambda s: lip_windows(frames, s), self._lip)

    def embed_audio(self, feats: np.ndarray, windows: int) -> np.ndarray:
        """Audio embeddings [windows, 1024] of windows 0 .. windows-1 of MFCC frames [M, 13]."""
        return self._batches(windows, lambda s: audio_windows(feats, s), self._audio)

    def embed(self, frames: np.ndarray, feats: np.ndarray, windows: int) -> tuple[np.ndarray, np.ndarray]:
        """Lip and audio embeddings [windows, 1024] of windows 0 .. windows-1 (frames: BGR uint8
        [T, 224, 224, 3]; feats: MFCC [M, 13])."""
        return self.embed_lip(frames, windows), self.embed_audio(feats, windows)

    def score_embeddings(self, lip: np.ndarray, aud: np.ndarray, vshift: int = VSHIFT, *, frames: int) -> SyncScore:
        """Scores from lip and audio embeddings of the same windows [W, 1024] (`frames`: the frames they cover)."""
        w = len(lip)
        pad = ((0, (1 << (w - 1).bit_length()) - w), (0, 0))  # rows to a power of two: one compile per size class
        curve = np.asarray(self._curve(np.pad(lip, pad), np.pad(aud, pad), np.int32(w), vshift))
        return summarize(curve, vshift, frames=frames, windows=w)

    def score_frames(self, frames: np.ndarray, audio: np.ndarray, vshift: int = VSHIFT,
                     name: str = "video") -> SyncScore:
        """Scores of BGR uint8 face crops [T, 224, 224, 3] at 25 fps against 16 kHz mono audio at int16 scale
        (float audio in [-1, 1]: pass `mfcc.int16_scale(audio)`). SyncInputError when shorter than a window."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != (faces.SIZE, faces.SIZE, 3):
            raise ValueError(f"{name}: frames must be [T, 224, 224, 3], got {frames.shape}")
        audio = np.asarray(audio).reshape(-1)
        n = min(len(frames), len(audio) // AUDIO_PER_FRAME)
        windows = n - WINDOW
        if windows < 1:
            raise SyncInputError(
                f"{name}: too short to score: {len(frames)} frames and {len(audio) / 16000:.2f} s of audio give "
                f"{max(n, 0)} usable frames; SyncNet needs at least {WINDOW + 1} (0.24 s at 25 fps)")
        lip, aud = self.embed(frames, mfcc(audio), windows)
        return self.score_embeddings(lip, aud, vshift, frames=n)


def summarize(curve: np.ndarray, vshift: int, *, frames: int, windows: int) -> SyncScore:
    """offset / LSE-D / LSE-C from the mean distance per shift (torch.min's first index; the median of the odd
    number 2 vshift + 1 of shifts)."""
    k = int(np.argmin(curve))
    lo = float(curve[k])
    return SyncScore(vshift - k, lo, float(np.sort(curve)[(len(curve) - 1) // 2]) - lo, frames, windows,
                     np.asarray(curve))


# -- videos ---------------------------------------------------------------------------------------------


def read_video(path: str, cropped: bool) -> tuple[np.ndarray, np.ndarray]:
    """A video file -> (BGR uint8 face crops [T, 224, 224, 3] at 25 fps, 16 kHz mono audio at int16 scale on the
    same clock). `cropped`: the frames are the face already (resized to 224 if needed); else the longest face
    track is cropped (data_pipeline.ingest.faces) and the audio cut to its frames. SyncInputError when the file has
    no audio or no detectable face; ValueError when PyAV cannot read it."""
    from data_pipeline.ingest import media

    info = media.probe(path)
    if not info.has_audio:
        raise SyncInputError(f"{path}: no audio stream; SyncNet scores speech against the face")
    raw, offset = media.decode_audio_16k(path, info.t0)
    # on the video clock, but only as long as the real audio lasts (not padded to the picture's length: silence
    # scored as speech would hide a short audio track; the reference uses min(frames, samples / 640))
    audio = int16_scale(media.align_audio(raw, offset, info.num_frames, pad=False))
    if cropped:
        frames = np.stack([faces.fit(np.ascontiguousarray(rgb[..., ::-1])) for _, rgb in media.iter_frames(info)])
        return frames, audio
    dets = [faces.detect(np.ascontiguousarray(rgb[..., ::-1])) for _, rgb in media.iter_frames(info)]
    tr = faces.track(dets)
    if tr is None:
        raise SyncInputError(f"{path}: no face detected in {len(dets)} frames (OpenCV's Haar cascade, frontal "
                             "faces); if the video is already the face crop, pass --cropped")
    s, x, y = faces.smooth_boxes(tr.boxes)
    first, last = int(tr.frames[0]), int(tr.frames[-1])
    crops = [faces.crop(np.ascontiguousarray(rgb[..., ::-1]), s[k - first], x[k - first], y[k - first])
             for k, rgb in media.iter_frames(info) if first <= k <= last]
    return np.stack(crops), audio[first * AUDIO_PER_FRAME:(last + 1) * AUDIO_PER_FRAME]


def score_video(scorer: Scorer, path: str, *, cropped: bool = False, vshift: int = VSHIFT) -> SyncScore:
    """`Scorer.score_frames` of a video file (see read_video)."""
    frames, audio = read_video(path, cropped)
    return scorer.score_frames(frames, audio, vshift, name=path)


def score_videos(scorer: Scorer, paths: Iterable[str], *, cropped: bool = False, vshift: int = VSHIFT,
                 as_json: bool = False) -> tuple[list[str], int]:
    """One output line per video (text or JSON) and the number of videos that could not be scored."""
    lines, failed = [], 0
    for path in paths:
        try:
            r = score_video(scorer, path, cropped=cropped, vshift=vshift)
        except (SyncInputError, ValueError) as e:
            failed += 1
            msg = str(e) if str(e).startswith(path) else f"{path}: {e}"
            lines.append(json.dumps({"video": path, "error": msg}) if as_json else msg)
            continue
        if as_json:
            lines.append(json.dumps({"video": path, **r.as_dict()}))
        else:
            lines.append(f"{path}: offset {r.offset:+d} frames, LSE-D {r.lse_d:.3f}, LSE-C {r.lse_c:.3f} "
                         f"({r.frames} frames)")
    return lines, failed


def default_mesh() -> Mesh:
    """A 1-D mesh `batch` over every local device."""
    return Mesh(np.asarray(jax.local_devices()), ("batch",))


# -- CLI -------------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from mirage_base.cli import FlagError
    from mirage_jax.eval.syncnet import load_weights

    F = flags.FLAGS
    paths = list(argv[1:])
    net = load_weights(F.weights, "--weights")  # a file that is not SyncNet's: one line before anything else
    if F.check_weights:
        print(f"--weights={F.weights}: SyncNet's state dict", flush=True)
        return
    if not paths:
        raise FlagError("no videos given: python -m mirage_jax.eval.sync --weights=PATH VIDEO [VIDEO ...]")
    scorer = Scorer(net, batch=F.batch, mesh=default_mesh())
    failed = 0
    for path in paths:
        lines, bad = score_videos(scorer, [path], cropped=F.cropped, vshift=F.vshift, as_json=F.json)
        failed += bad
        print(lines[0], file=sys.stderr if bad and not F.json else sys.stdout, flush=True)
    if failed:  # README's table: a video that cannot be scored is a refused input (2), not a bug (1)
        sys.exit(int(ExitCode.REFUSED))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("weights", None, "SyncNet weights: the published syncnet_v2.model (a PyTorch state dict) "
                        "or a safetensors file with its keys.")
    flags.DEFINE_bool("cropped", False, "The videos are already the face crop (no detection).")
    flags.DEFINE_bool("check_weights", False, "Only load and check --weights (exit 2 with one line when they are "
                      "not SyncNet's state dict); score nothing.")
    flags.DEFINE_integer("vshift", VSHIFT, "Largest audio shift tried, in frames (either way).", lower_bound=1)
    flags.DEFINE_bool("json", False, "One JSON object per video and line.")
    flags.DEFINE_integer("batch", BATCH, "Windows per jitted call (rounded up to a multiple of the devices).",
                         lower_bound=1)


if __name__ == "__main__":
    from mirage_base.cli import run

    _define_flags()
    run(main, "sync")
