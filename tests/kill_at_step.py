"""`python tests/kill_at_step.py STEP [train flags]`: the training CLI (`python -m mirage_jax.train`) with a step
hook that SIGKILLs the process right after step STEP (its checkpoint, if due, already started).

The kill -9 drills of tests/test_train_resume.py and tests/test_gcs.py run this (through
`tests/train_cli.run_cli(..., kill_at_step=STEP)`), so the trainer itself carries no fault knob.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].isdigit():
        sys.exit("usage: kill_at_step.py STEP --config=... --workdir=... [train flags]")
    at = int(sys.argv.pop(1))
    from mirage_jax.train import __main__ as train_cli  # installs the SIGTERM handler, defines the flags

    def kill(step: int) -> None:
        if step == at:
            print(f"kill_at_step: SIGKILL after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    train_cli.run(hooks=[kill])


if __name__ == "__main__":
    main()
