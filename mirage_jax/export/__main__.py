"""python -m mirage_jax.export --checkpoint=WORKDIR[/STEP] --out=DIR [--ema] [--dtype=bf16|fp32]

Writes safetensors shards + diffusion_pytorch_model.safetensors.index.json + config.json that
`mirage_jax.export.MirageTransformer.from_pretrained(DIR)` loads (see docs/export.md).
"""

from __future__ import annotations

import json

from absl import flags

flags.DEFINE_string("checkpoint", None, "A training workdir (latest committed step) or one step folder.")
flags.DEFINE_string("out", None, "Output folder (must not exist or be empty, unless --overwrite).")
flags.DEFINE_bool("ema", False, "Export the EMA parameters instead of the raw ones.")
flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "Tensor dtype of the export.")
flags.DEFINE_string("max_shard_size", "2GB", "Largest shard (also --max-shard-size).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv: list[str]) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every leaf it reads at INFO (~850 lines for the tiny model)
    from mirage_base.storage import check_storage
    from mirage_jax.checkpoint_format import ParamReader, read_model_config, resolve_step_dir
    from mirage_jax.export.writer import export_params

    F = flags.FLAGS
    check_storage(F.checkpoint, F.out)
    step_dir = resolve_step_dir(F.checkpoint)  # CheckpointError / ExportError: one line, exit 2 (cli.run)
    cfg = read_model_config(step_dir)
    index = export_params(ParamReader(step_dir, ema=F.ema), cfg, F.out, dtype=F.dtype,
                          max_shard_size=F.max_shard_size, overwrite=F.overwrite)
    print(json.dumps({"checkpoint": str(step_dir), "out": F.out, "tensors": len(index["weight_map"]),
                      "shards": len(set(index["weight_map"].values())), "bytes": index["metadata"]["total_size"]}))


if __name__ == "__main__":
    from mirage_base.cli import run

    run(main, "export")
