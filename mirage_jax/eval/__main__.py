"""`python -m mirage_jax.eval --checkpoint=WORKDIR --data=SHARDS_OR_DIR [--syncnet-weights=PATH] [--json]`: held-out
lip-sync and loss.

Prints the report (mirage_jax/eval/heldout.py) as text, or as one JSON object with `--json` (keys include
sync_generated, sync_shuffled, sync_real, offset_frames, heldout_loss, each sync with its spread over seeds).
Sampling steps and guidance default to the run's own `diffusion` section. Held-out footage without mouth tracks
gets the loss only: the lip-sync keys are null and one line on stderr says why.
`--syncnet-weights` (the published syncnet_v2.model, docs/eval.md) adds SyncNet's LSE-C / LSE-D of the generated
videos, of the same videos against shuffled audio (floor) and of the real clips (ceiling): the lse_* keys, null
without it. The clips' speech is re-read from each record's source file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags, logging

flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ folder, or one step folder.", required=True)
flags.DEFINE_string("data", None, "Held-out prepared dataset: a data_pipeline.prepare output dir or shard glob.",
                    required=True)
flags.DEFINE_integer("clips", 8, "Held-out clips (full-length, with a mouth track) to evaluate.", lower_bound=1)
flags.DEFINE_integer("seeds", 3, "Sampling seeds (the spread of the generated scores).", lower_bound=1)
flags.DEFINE_integer("steps", None, "Euler steps (default: the run's diffusion.sample_steps).", lower_bound=1)
flags.DEFINE_float("cfg_audio", None, "Audio guidance scale (default: the run's diffusion.cfg_audio).")
flags.DEFINE_float("cfg_text", None, "Text guidance scale (default: the run's diffusion.cfg_text).")
flags.DEFINE_enum("cfg_schedule", None, ["constant", "cosine"],
                  "Guidance over noise levels (default: the run's diffusion.cfg_schedule).")
flags.DEFINE_bool("ema", False, "Evaluate the EMA parameters.")
flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.DEFINE_string("syncnet_weights", None, "SyncNet weights (syncnet_v2.model or safetensors): adds LSE-C / "
                    "LSE-D (docs/eval.md).")
flags.DEFINE_bool("syncnet_cropped", False, "The clips are face crops: score them whole (default: detect the face).")
flags.DEFINE_enum("cache", "none", ["none", "cfg", "mag", "cfg+mag"],
                  "Sampler caching, as generate's --cache (the 'mag' modes read --cache_schedule).")
flags.DEFINE_string("cache_schedule", None, "The MagCache schedule file (default: WORKDIR/cache_schedule.json).")
flags.DEFINE_string("train_data", None, "The run's training data (for its encoders), if not the saved data.source.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    from mirage_jax.cache_schedule import apply_cache
    from mirage_jax.eval.heldout import evaluate
    from mirage_jax.inference import load_run
    from mirage_jax.run_encoders import load_encoders
    from mirage_jax.sampling import SamplingSettings

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    from mirage_base.storage import check_storage

    F = flags.FLAGS
    scorer = None
    if F.syncnet_weights is not None:
        from mirage_jax.eval.sync import Scorer, default_mesh
        from mirage_jax.eval.syncnet import load_weights

        scorer = Scorer(load_weights(F.syncnet_weights, "--syncnet-weights"), mesh=default_mesh())
    check_storage(F.checkpoint, F.data, F.train_data)
    run = load_run(F.checkpoint, ema=F.ema)
    settings = SamplingSettings.of_run(run.diffusion_config, steps=F.steps or None, cfg_audio=F.cfg_audio,
                                       cfg_text=F.cfg_text, schedule=F.cfg_schedule)
    settings, _ = apply_cache(run, settings, F.cache, F.cache_schedule)
    encs = load_encoders(run.config.data, F.train_data, flag="--train-data")
    report = evaluate(run, encs, F.data, settings, clips=F.clips, seeds=F.seeds, progress=not F.json,
                      syncnet=scorer, syncnet_cropped=F.syncnet_cropped)
    if report["skipped"]:
        print(f"eval: {report['skipped']}", file=sys.stderr)
    if F.json:
        print(json.dumps(report))
        return
    for k, v in report.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    from mirage_base.cli import run
    from mirage_base.errors import ExitCode

    run(main, "eval", also={FileNotFoundError: (ExitCode.REFUSED, "")})  # a user's path or input: one line, exit 2
