"""`python -m mirage_jax.eval --checkpoint=WORKDIR --data=SHARDS_OR_DIR [--json]`: held-out lip-sync and loss.

Prints the report (mirage_jax/eval/heldout.py) as text, or as one JSON object with `--json` (keys include
sync_generated, sync_shuffled, sync_real, offset_frames, heldout_loss, each sync with its spread over seeds).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags, logging

from data_pipeline.cli import dashed_flags_parser

flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ folder, or one step folder.", required=True)
flags.DEFINE_string("data", None, "Held-out prepared dataset: a data_pipeline.prepare output dir or shard glob.",
                    required=True)
flags.DEFINE_integer("clips", 8, "Held-out clips (full-length, with a mouth track) to evaluate.")
flags.DEFINE_integer("seeds", 3, "Sampling seeds (the spread of the generated scores).")
flags.DEFINE_integer("steps", None, "Euler steps (default: the run's diffusion.sample_steps).")
flags.DEFINE_float("cfg_audio", 2.0, "Audio guidance scale.")
flags.DEFINE_float("cfg_text", 1.0, "Text guidance scale.")
flags.DEFINE_bool("ema", False, "Evaluate the EMA parameters.")
flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.DEFINE_string("train_data", None, "The run's training data (for its encoders), if not the saved data.source.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    from mirage_jax.checkpoint_format import CheckpointError
    from mirage_jax.eval.heldout import EvalError, EvalSettings, evaluate
    from mirage_jax.generate import GenerateError, load_encoders
    from mirage_jax.inference import load_run

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    from mirage_jax.paths import exit_on_storage_error

    F = flags.FLAGS
    exit_on_storage_error("eval", F.checkpoint, F.data, F.train_data)
    try:
        run = load_run(F.checkpoint, ema=F.ema)
        encs = load_encoders(run.config, F.train_data)
        settings = EvalSettings(clips=F.clips, seeds=F.seeds, steps=F.steps or run.diffusion_config.sample_steps,
                                cfg_audio=F.cfg_audio, cfg_text=F.cfg_text)
        report = evaluate(run, encs, F.data, settings, progress=not F.json)
    except (EvalError, GenerateError, CheckpointError, FileNotFoundError) as e:  # a user's path or input: one line
        print(f"eval: {e}", file=sys.stderr)
        sys.exit(2)
    if F.json:
        print(json.dumps(report))
        return
    for k, v in report.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    app.run(main, flags_parser=dashed_flags_parser)
