"""`python -m mirage_jax.train --config=configs/X.py --workdir=DIR [--config.a.b=value ...]`.

The same command runs on one CPU, a GPU box, or every host of a TPU pod (see docs/pods.md). Exit status:
0 when training finished or was preempted (SIGTERM at any moment: the newest completed step is saved, or,
before the first step, nothing new was trained; the message says which), 3 when it stopped on too many
non-finite steps, 2 on a config that is invalid or does not fit its data (one line naming the fields and the
`--config.` overrides), whose data.source has no shards, or that cannot resume the workdir's checkpoint
(changed model, data or seed; named), 4 when a checkpoint could not be written, 1 on any other error.
"""

from __future__ import annotations

from mirage_jax.train import preemption  # first: SIGTERM is handled from here on (imports no JAX)

preemption.install_handler()

import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/.")
_ALLOW = flags.DEFINE_bool("allow_config_change", False,
                           "Resume even if the config changes the model or the train state's structure "
                           "(restores what fits, initializes the rest).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of JAX processes (multi-process runs).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4


class _QuietLibraries:
    """absl log filter: drop INFO chatter of Orbax and Grain (one line per file written); keep warnings."""

    NOISY = ("/orbax/", "/grain/")

    def filter(self, record: Any) -> bool:
        return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if os.environ.get("MIRAGE_LAUNCHER_PID"):  # under launch/local.py: die with the launcher
        from data_pipeline.lifetime import exit_with_parent

        exit_with_parent(int(os.environ["MIRAGE_LAUNCHER_PID"]))
    from mirage_jax.train import distributed

    distributed.initialize(_COORD.value, _NPROC.value, _PID.value)

    from data_pipeline.order import DataStateError
    from data_pipeline.storage import exit_on_storage_error
    from mirage_jax.config import ConfigError
    from mirage_jax.train.checkpoint import CheckpointSaveError
    from mirage_jax.train.loop import NonFiniteError, Trainer
    from mirage_jax.train.resume import ConfigChangeError

    exit_on_storage_error("train", _WORKDIR.value, _CONFIG.value.data.get("source"))

    try:
        trainer = Trainer(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value)
        step = trainer.run()
    except preemption.Preempted as e:
        logging.warning("%s", e)
        print(f"PREEMPTED (clean exit): {e}", flush=True)
        sys.exit(0)
    except ConfigError as e:  # a user's config mistake: one line naming the fields, no traceback
        print(f"CONFIG ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (ConfigChangeError, DataStateError) as e:  # a healthy checkpoint this config/data cannot resume
        print(f"RESUME REFUSED: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FileNotFoundError as e:  # e.g. a data.source with no (committed) shards: the path, no traceback
        print(f"DATA ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteError as e:
        logging.error("%s", e)
        print(f"STOPPED: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_NONFINITE)
    except CheckpointSaveError as e:
        print(f"CHECKPOINT SAVE FAILED: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # not sys.exit: tensorstore's pending callbacks of the failed write would each print an "Event loop
        # is closed" traceback during interpreter shutdown, burying this line; committed steps are on disk
        os._exit(EXIT_SAVE_FAILED)
    print(f"DONE: trained to step {step}; workdir {_WORKDIR.value}", flush=True)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
