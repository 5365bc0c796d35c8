"""`python -m mirage_jax.train --config=configs/X.py --workdir=DIR [--config.a.b=value ...]`.

The same command runs on one CPU, a GPU box, or every host of a TPU pod (see docs/pods.md). Exit status:
0 when training finished or was preempted (SIGTERM or Ctrl-C at any moment: the newest completed step is saved,
or, before the first step, nothing new was trained; the message says which), 130 on a second Ctrl-C (exits at
once without saving, naming the last committed checkpoint; also 130 / 143 when a stop after SIGINT / SIGTERM
did not finish within MIRAGE_STOP_TIMEOUT_S), 5 when another live trainer owns the workdir (one line naming it;
`--takeover` for a gs:// workdir whose owner crashed; see train/ownership.py), 3 when it stopped on too many
non-finite steps, 2 on a config that is invalid or does not fit its data (one line naming the fields and the
`--config.` overrides), whose data.source has no shards, or that cannot resume the workdir's checkpoint
(changed model, data or seed; named), or whose checkpoint is damaged (CheckpointError naming the step
folder), 4 when a checkpoint could not be written, 1 on a bug (with its traceback). The same table for every
tool: `mirage_base.errors.ExitCode`, README's "Exit status".
"""

from __future__ import annotations

import time

STARTED_AT = time.time()  # the goodput log's job_start: before anything else of the CLI is imported

from mirage_jax.train import preemption  # noqa: E402  # first: SIGTERM is handled from here on (imports no JAX)

preemption.install_handler()

import functools  # noqa: E402
import os  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from absl import flags, logging  # noqa: E402
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
_TAKEOVER = flags.DEFINE_bool("takeover", False,
                              "Take a gs:// workdir over from the owner its lease names before the lease expires "
                              "(only when that run is gone; it stops without saving if it is not). A local "
                              "workdir's lock is released by the kernel when its owner dies.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
    """absl log filter: drop INFO chatter of Orbax and Grain (one line per file written); keep warnings."""

    NOISY = ("/orbax/", "/grain/")

    def filter(self, record: Any) -> bool:
        return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def main(argv: list[str], hooks: Sequence[Any] = ()) -> None:
    """Train; `hooks` go to `Trainer` (called with each new step; drills pass one, see tests/kill_at_step.py)."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if os.environ.get("MIRAGE_LAUNCHER_PID"):  # under launch/local.py: die with the launcher
        from mirage_base.lifetime import exit_with_parent

        exit_with_parent(int(os.environ["MIRAGE_LAUNCHER_PID"]))
    from mirage_jax.train import distributed

    distributed.initialize(_COORD.value, _NPROC.value, _PID.value)

    from mirage_base.storage import check_storage
    from mirage_jax.train import ownership
    from mirage_jax.train.loop import Trainer

    check_storage(_WORKDIR.value, _CONFIG.value.data.get("source"))
    # the config, mesh and data checks first: a refused config leaves no trace (Trainer() writes nothing). Then
    # one owner per workdir, taken before anything is written or cleaned there (Orbax removes unfinished step
    # directories when its manager starts); released when the run ends (a kill releases the local lock; a gs://
    # lease then expires by itself)
    trainer = Trainer(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value, hooks=hooks,
                      started_at=STARTED_AT)
    try:
        with ownership.take(_WORKDIR.value, takeover=_TAKEOVER.value):
            step = trainer.run()
    except preemption.Preempted as e:
        preemption.mark_finished()
        logging.warning("%s", e)
        print(f"PREEMPTED (clean exit): {e}", flush=True)
        return
    preemption.mark_finished()
    print(f"DONE: trained to step {step}; workdir {_WORKDIR.value}", flush=True)


def run(hooks: Sequence[Any] = ()) -> None:
    """The CLI: `main` through mirage_base.cli.run, which prints a user's mistake as one line with its exit
    status (ConfigError, MeshConfigError, LayoutError, ConfigChangeError, DataStateError, CheckpointError: 2;
    NonFiniteError: 3; WorkdirInUseError: 5;
    CheckpointSaveError: 4,
    through os._exit so that tensorstore's callbacks of the failed write cannot bury the line under
    "Event loop is closed" tracebacks at shutdown; committed steps are on disk)."""
    from mirage_base.cli import run as run_cli
    from mirage_base.errors import ExitCode
    from mirage_jax.train.checkpoint import CheckpointSaveError

    run_cli(functools.partial(main, hooks=hooks), "train",
            also={FileNotFoundError: (ExitCode.REFUSED, "DATA ERROR")},  # e.g. a data.source with no (committed) shards
            hard_exit=(CheckpointSaveError,))


if __name__ == "__main__":
    run()
