"""python -m mirage_jax.warm_start --source=DIR [--config=configs/X.py] --out=WORKDIR [--allow-partial]

Reads Mochi weights in the diffusers layout (a pipeline folder holding transformer/, or that folder) and
writes the step-0 checkpoint of a Mirage run into WORKDIR; `python -m mirage_jax.train --workdir=WORKDIR`
with the same model config continues from it. Multi-host: run it on every host (launch/local.py locally).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Mirage config file; derived from the source's config.json "
                                "with the default audio-stream settings when omitted.", lock_config=False)
flags.DEFINE_string("source", None, "Pipeline folder holding transformer/, or the transformer folder.")
flags.DEFINE_string("out", None, "Workdir of the new run (must hold no checkpoints).")
flags.DEFINE_bool("allow_partial", False, "Initialize unmappable parameters and ignore unused source tensors "
                  "instead of failing (also --allow-partial).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: coordinator host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["source", "out"])


def main(argv: list[str]) -> None:
    del argv
    from mirage_base.storage import check_storage
    from mirage_jax.train import distributed
    from mirage_jax.warm_start import warm_start

    F = flags.FLAGS
    check_storage(F.source, F.out)
    distributed.initialize(F.coordinator_address, F.num_processes, F.process_id)
    report = warm_start(F.source, F.config, F.out, allow_partial=F.allow_partial)  # errors: one line, exit 2
    summary = {k: (len(v) if isinstance(v, list) else v) for k, v in report.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    from mirage_base.cli import run

    run(main, "warm_start")
