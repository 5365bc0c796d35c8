"""`python -m data_pipeline.prepare`'s flags, and the IngestConfig they describe (encoder params per encoder,
weight folders made absolute so the manifest can rebuild the encoders from any directory)."""

from __future__ import annotations

import math
import os
from typing import Any

from absl import app, flags

from data_pipeline.curate.plan import CurateConfig, parse_stages
from data_pipeline.ingest.per_source import DEFAULT_HELD_BYTES, IngestConfig
from mirage_base.errors import InputError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string(
        "input", None, "Source videos: a directory (searched recursively) or a glob.", required=True
    )
    flags.DEFINE_string(
        "output", None, "Output directory for shards + manifest.json (local or gs://).", required=True
    )
    flags.DEFINE_string(
        "runner",
        "local",
        "'local' (in-process FnApiRunner), 'dask' (Beam's DaskRunner on a dask.distributed cluster: --workers, "
        "--dask-address) or a Beam runner name: DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, "
        "PortableRunner. Extra Beam flags go after `--`.",
    )
    flags.DEFINE_integer("workers", 2, "--runner=dask: worker processes of the local Dask cluster prepare starts "
                         "and stops (one thread each).")
    flags.DEFINE_string("dask_address", None, "--runner=dask: join the running Dask scheduler at tcp://HOST:PORT "
                        "instead of starting a local cluster (its workers must import data_pipeline and reach "
                        "--input/--output); Beam's own --dask_client_address after `--` works too.")
    flags.DEFINE_list("clip_seconds", ["2"], "Clip length in seconds (at 25 fps); a list (4,8) makes one shape "
                      "bucket per length (data_pipeline/buckets.py).")
    flags.DEFINE_float(
        "min_seconds", None, "Keep a source's tail if at least this long (default: --clip-seconds)."
    )
    flags.DEFINE_string(
        "size",
        None,
        "Training frame size WxH: each source (display orientation) is scaled to cover it and cropped "
        "(--crop). Default: the sources' own size, which must then be the same for all. A list "
        "(720x1280,1280x720) makes shape buckets: each source goes to the size of nearest aspect.",
    )
    flags.DEFINE_string("crop", "center", "Crop policy with --size: center; face (curation's crop stage: the "
                        "window follows the tracked face; the default with --curate and --size); or one "
                        "registered with data_pipeline.ingest.geometry.register_crop.")
    flags.DEFINE_integer(
        "max_held_mb", DEFAULT_HELD_BYTES >> 20, "Decoded frames one source may hold in memory (MiB); "
        "past it reference frames are fetched by seeking (same output)."
    )
    flags.DEFINE_string("video_encoder", "s2d", "Video encoder name: s2d, dct, or mochi_vae (docs/encoders.md).")
    flags.DEFINE_integer("spatial_factor", 8, "s2d / dct: spatial factor (block size in pixels).")
    flags.DEFINE_integer("dct_luma", 10, "dct: luma DCT coefficients kept per block (zig-zag order).")
    flags.DEFINE_integer("dct_chroma", 3, "dct: coefficients kept per chroma channel.")
    flags.DEFINE_integer("temporal_factor", 1, "s2d: temporal factor.")
    flags.DEFINE_string(
        "video_weights", None, "mochi_vae: diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors)."
    )
    flags.DEFINE_integer("vae_tile", 256, "mochi_vae: spatial tile in pixels (0: none).")
    flags.DEFINE_integer("vae_tile_stride", 192, "mochi_vae: tile stride in pixels (overlap is blended).")
    flags.DEFINE_integer("vae_encode_chunk_latents", 0, "mochi_vae: latent frames per encoder chunk (0: whole clip).")
    flags.DEFINE_integer("vae_decode_chunk_latents", 4, "mochi_vae: latent frames per decoder chunk (0: whole clip).")
    flags.DEFINE_integer(
        "vae_chunk_frames", 0, "mochi_vae time map: 0 encodes each clip whole and causally (100 frames -> 17 "
        "latents, causal:6); 25 encodes independent 25-frame chunks (100 -> 20, causal:6/25: configs/mirage_10b.py)."
    )
    flags.DEFINE_string("audio_encoder", "logmel", "Audio encoder name: logmel, or wav2vec2 (docs/encoders.md).")
    flags.DEFINE_integer("n_mels", 80, "logmel: mel bands.")
    flags.DEFINE_string("audio_weights", None, "wav2vec2: folder with config.json + model.safetensors.")
    flags.DEFINE_string("text_encoder", "hash", "Text encoder name: hash, or t5 (docs/encoders.md).")
    flags.DEFINE_integer("text_len", 32, "hash, t5: tokens L (Mochi's T5: 256).")
    flags.DEFINE_string("text_weights", None, "t5: folder with config.json + model*.safetensors (T5EncoderModel).")
    flags.DEFINE_string("text_tokenizer", None, "t5: folder with tokenizer.json (default: weights, ../tokenizer).")
    flags.DEFINE_integer("text_dim", 64, "hash: embedding width D.")
    flags.DEFINE_list(
        "filters", [], "Quality filters by name (data_pipeline.ingest.filters): silence, static, black."
    )
    flags.DEFINE_enum("audio_backend", "pyav", ["pyav", "tfio"], "Audio decode/resample backend.")
    flags.DEFINE_string(
        "tfio_python",
        None,
        "Python of the tensorflow-io venv (default $MIRAGE_TFIO_PYTHON or .venv-tfio/bin/python).",
    )
    flags.DEFINE_integer("records_per_shard", 64, "Records per ArrayRecord shard.")
    flags.DEFINE_integer("batch_sources", 8, "Sources per Beam work item (and per tfio subprocess).", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed for reference-frame choice.")
    flags.DEFINE_bool("force", False, "Rewrite even if the output is up to date.")
    # curation (data_pipeline/curate; docs/data_pipeline.md "Curation")
    flags.DEFINE_string(
        "curate", None, "Curate before ingest: a bare --curate (or 'all') runs every stage, else a comma list of "
        "shots,faces,crop,sync,motion. crop (the face crop, with --size) and sync (with --syncnet-weights) need "
        "faces. Drops and reasons go to manifest.json's `curation` and curation.png.")
    flags.DEFINE_string("syncnet_weights", None, "Curation's sync stage: SyncNet weights (syncnet_v2.model or "
                        "safetensors); without them the stage is off and the manifest says so.")
    flags.DEFINE_float("cut_threshold", 27.0, "shots: PySceneDetect ContentDetector threshold (mean HSV change, "
                       "0-255).", lower_bound=0.0, upper_bound=255.0)
    flags.DEFINE_integer("face_every", 5, "faces: detect on every N-th frame.", lower_bound=1)
    flags.DEFINE_float("min_face", 0.1, "faces: smallest face box height, as a fraction of the frame height.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("min_visible", 0.5, "faces: the speaker must be seen in this fraction of sampled frames.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("crop_smooth", 25, "crop: frames the face crop's centre is averaged over.", lower_bound=1)
    flags.DEFINE_integer("max_offset", 6, "sync: largest |SyncNet offset| (frames) shifted; beyond, dropped.",
                         lower_bound=0)
    flags.DEFINE_float("min_confidence", 3.0, "sync: smallest SyncNet confidence (LSE-C) kept.")
    flags.DEFINE_float("max_pan", 0.25, "motion: fastest camera pan kept, frame widths per second.",
                       lower_bound=0.0)
    flags.DEFINE_float("min_change", 0.25, "motion: smallest mean frame change (0-255) kept (near-static below).",
                       lower_bound=0.0, upper_bound=255.0)
    for name in ("min_seconds", "cut_threshold", "min_face", "min_visible", "min_confidence", "max_pan",
                 "min_change"):  # absl's bounds let nan (and, unbounded, inf) through: the manifest got NaN
        flags.register_validator(name, _finite, message="must be a finite number")


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def _weights_flag(flag: str, encoder: str) -> str:
    value = getattr(FLAGS, flag)
    if not value:
        raise app.UsageError(f"--{encoder} needs --{flag.replace('_', '-')}=<weights folder>; see docs/encoders.md")
    return os.path.abspath(os.path.expanduser(value))  # the manifest must rebuild it from any directory


def encoder_params_from_flags() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Video, audio and text encoder params from the flags of the chosen encoders (paths made absolute)."""
    video: dict[str, Any] = {}
    if FLAGS.video_encoder == "s2d":
        video = {"spatial_factor": FLAGS.spatial_factor, "temporal_factor": FLAGS.temporal_factor}
    elif FLAGS.video_encoder == "dct":
        video = {"spatial_factor": FLAGS.spatial_factor, "luma": FLAGS.dct_luma, "chroma": FLAGS.dct_chroma}
    elif FLAGS.video_encoder == "mochi_vae":
        video = {
            "weights": _weights_flag("video_weights", "video-encoder=mochi_vae"),
            "tile": FLAGS.vae_tile,
            "tile_stride": FLAGS.vae_tile_stride,
            "encode_chunk_latents": FLAGS.vae_encode_chunk_latents,
            "decode_chunk_latents": FLAGS.vae_decode_chunk_latents,
            "chunk_frames": FLAGS.vae_chunk_frames,
        }
    audio: dict[str, Any] = {}
    if FLAGS.audio_encoder == "logmel":
        audio = {"n_mels": FLAGS.n_mels}
    elif FLAGS.audio_encoder == "wav2vec2":
        audio = {"weights": _weights_flag("audio_weights", "audio-encoder=wav2vec2")}
    text: dict[str, Any] = {}
    if FLAGS.text_encoder == "hash":
        text = {"max_len": FLAGS.text_len, "dim": FLAGS.text_dim}
    elif FLAGS.text_encoder == "t5":
        tok = os.path.abspath(os.path.expanduser(FLAGS.text_tokenizer)) if FLAGS.text_tokenizer else ""
        weights = _weights_flag("text_weights", "text-encoder=t5")
        text = {"weights": weights, "tokenizer": tok, "max_len": FLAGS.text_len}
    return video, audio, text


def check_runner_flags(runner: str, workers_given: bool, dask_address: str | None) -> None:
    """Refuse, in one line (InputError), a --workers or --dask-address the chosen runner would silently ignore:
    both belong to --runner=dask, and --workers only to the local cluster prepare starts (a joined cluster at
    --dask-address runs on its own workers)."""
    if runner != "dask":
        for flag, given in (("--workers", workers_given), ("--dask-address", dask_address is not None)):
            if given:
                raise InputError(f"{flag}: only --runner=dask uses it (this run is --runner={runner}); "
                                 f"add --runner=dask or drop {flag}")
    elif workers_given and dask_address is not None:
        raise InputError(f"--workers with --dask-address={dask_address}: the joined cluster runs on its own "
                         "workers (start them with `dask worker --nworkers N`); drop --workers")
    if runner == "dask" and dask_address is not None:
        check_dask_address(dask_address)
    if runner not in ("local", "dask"):
        check_beam_runner(runner)


def check_beam_runner(name: str) -> None:
    """InputError naming --runner unless Beam knows a runner by `name` (apache_beam.runners.create_runner: a
    short name such as DirectRunner, DataflowRunner, FlinkRunner, or a PipelineRunner subclass's dotted path);
    Beam's own ValueError surfaced only when the pipeline ran, as a traceback."""
    from apache_beam.runners.runner import create_runner

    try:
        create_runner(name)
    except (ValueError, ImportError, AttributeError, TypeError):  # unknown name, module, class, or not a runner
        raise InputError(f"--runner={name}: no such runner; use local, dask, or a Beam runner's name as Beam spells "
                         "it (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, PortableRunner) or the dotted "
                         "path of a PipelineRunner subclass") from None


def check_dask_address(address: str) -> None:
    """InputError naming --dask-address unless dask.distributed can parse `address` (a known scheme, default tcp,
    and HOST:PORT for the socket schemes): a malformed one is refused here, before a Client is made (a Client
    that fails to parse its address leaves an 'Exception ignored in Client.__del__' traceback and a 10 s wait)."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address)
        registry.get_backend(scheme)  # ValueError naming the known schemes
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(loc)  # ValueError: missing port number
    except ValueError as e:
        raise InputError(f"--dask-address={address}: not a Dask scheduler address ({e}); give the address "
                         "`dask scheduler` prints, tcp://HOST:PORT") from None


def bare_curate(argv: list[str]) -> None:
    """Rewrite a bare `--curate` (before `--`) in place as `--curate=all`: absl would take the next argument
    as its value."""
    for i, a in enumerate(argv):
        if a == "--":
            return
        if a == "--curate":
            argv[i] = "--curate=all"


def curate_from_flags() -> CurateConfig | None:
    """The curation stages and thresholds; None without --curate (and without --crop=face, which adds
    faces,crop). `--curate=` with an empty value counts as a bare --curate (every stage)."""
    spec = FLAGS.curate
    if spec is None and FLAGS.crop == "face":
        spec = "faces,crop"
    stages = parse_stages(spec)
    if FLAGS.syncnet_weights and "sync" not in stages:
        raise InputError(f"--syncnet-weights={FLAGS.syncnet_weights}: only curation's sync stage uses it (this run "
                         f"has {'no --curate' if not stages else 'stages ' + ','.join(stages)}); add --curate or "
                         "drop the flag")
    if not stages:
        return None
    if FLAGS.crop == "face" and "crop" not in stages:
        stages = parse_stages(",".join([*stages, "faces", "crop"]))
    w = FLAGS.syncnet_weights
    return CurateConfig(
        stages=stages, cut_threshold=FLAGS.cut_threshold, face_every=FLAGS.face_every, min_face=FLAGS.min_face,
        min_visible=FLAGS.min_visible, crop_smooth=FLAGS.crop_smooth,
        syncnet_weights=os.path.abspath(os.path.expanduser(w)) if w else None, max_offset=FLAGS.max_offset,
        min_confidence=FLAGS.min_confidence, max_pan=FLAGS.max_pan, min_change=FLAGS.min_change,
    )


def _crop_policy() -> str:
    """--crop, except that curation's crop stage with --size means the face crop unless --crop was given."""
    if FLAGS.size and FLAGS.curate is not None and not FLAGS["crop"].present:
        stages = parse_stages(FLAGS.curate)
        if "crop" in stages:
            return "face"
    return FLAGS.crop


def bucket_lists() -> tuple[list[float], list[tuple[int, int]] | None]:
    """`--clip-seconds` and `--size` as lists (one value each: a single-shape dataset)."""
    from data_pipeline import buckets

    return buckets.parse_seconds(FLAGS.clip_seconds), buckets.parse_sizes(FLAGS.size)


def config_from_flags() -> IngestConfig:
    """The IngestConfig of the flags; with lists of lengths or sizes, the first of each (`buckets.run` replaces
    them per bucket)."""
    video_params, audio_params, text_params = encoder_params_from_flags()
    seconds, sizes = bucket_lists()
    return IngestConfig(
        clip_seconds=seconds[0],
        min_seconds=FLAGS.min_seconds,
        size=sizes[0] if sizes else None,
        crop=_crop_policy(),
        video_encoder=FLAGS.video_encoder,
        video_params=tuple(sorted(video_params.items())),
        audio_encoder=FLAGS.audio_encoder,
        audio_params=tuple(sorted(audio_params.items())),
        text_encoder=FLAGS.text_encoder,
        text_params=tuple(sorted(text_params.items())),
        filters=tuple(FLAGS.filters),
        audio_backend=FLAGS.audio_backend,
        seed=FLAGS.seed,
    )
