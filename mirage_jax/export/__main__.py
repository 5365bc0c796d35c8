"""python -m mirage_jax.export --checkpoint=WORKDIR[/STEP] --out=DIR [--ema] [--dtype=bf16|fp32] [--lora=merged|adapter]

Writes safetensors shards + diffusion_pytorch_model.safetensors.index.json + config.json that
`mirage_jax.export.MirageTransformer.from_pretrained(DIR)` loads (see docs/export.md). For a LoRA run
(docs/lora.md) the default writes the merged weights (base + alpha / rank * B A) the same way; `--lora=adapter`
writes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for the base's export instead.
"""

from __future__ import annotations

import json

from absl import flags

flags.DEFINE_string("checkpoint", None, "A training workdir (latest committed step) or one step folder.")
flags.DEFINE_string("out", None, "Output folder (must not exist or be empty, unless --overwrite).")
flags.DEFINE_bool("ema", False, "Export the EMA parameters instead of the raw ones (a LoRA run: the adapters' EMA).")
flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "Tensor dtype of the export.")
flags.DEFINE_string("max_shard_size", "2GB", "Largest shard (also --max-shard-size).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
flags.DEFINE_enum("lora", "merged", ["merged", "adapter"], "A LoRA run: merged weights, or a PEFT adapter folder.")
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv: list[str]) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every leaf it reads at INFO (~850 lines for the tiny model)
    from mirage_base.storage import check_storage
    from mirage_jax.checkpoint_format import ParamReader, read_config, read_item, resolve_step_dir
    from mirage_jax.export.writer import DTYPES, ExportError, export_params

    F = flags.FLAGS
    check_storage(F.checkpoint, F.out)
    step_dir = resolve_step_dir(F.checkpoint)  # CheckpointError / ExportError: one line, exit 2 (cli.run)
    run = read_config(step_dir)
    cfg, lcfg = run.model, run.lora
    if not lcfg.enabled:
        if F.lora == "adapter":
            raise ExportError(f"--lora=adapter: {step_dir} is not a LoRA run (its lora.rank is 0); drop the flag")
        index = export_params(ParamReader(step_dir, ema=F.ema), cfg, F.out, dtype=F.dtype,
                              max_shard_size=F.max_shard_size, overwrite=F.overwrite)
    else:
        from mirage_jax.export import lora as lora_export
        from mirage_jax.lora.base import trained_base_dir

        adapters = ParamReader(step_dir, ema=F.ema).read_all()
        meta = read_item(step_dir, "meta")
        if F.lora == "adapter":
            base = lora_export.adapter_base(lcfg, meta, str(step_dir))  # the step trained on, not lora.base's newest
            config = lora_export.export_adapter(adapters, cfg, lcfg, F.out, dtype=DTYPES[F.dtype],
                                                overwrite=F.overwrite, base=base)
            print(json.dumps({"checkpoint": str(step_dir), "out": F.out, "lora": "adapter", "r": config["r"],
                              "modules": len(config["target_modules"]), "base": base}))
            return
        base_dir = trained_base_dir(lcfg.base, meta)  # the step trained on, if the base workdir has moved on
        reader = lora_export.MergedReader(ParamReader(base_dir), lora_export.adapters_by_kernel(adapters), lcfg.scale)

        def check_base() -> None:
            reader.check(meta, str(base_dir), str(step_dir))

        index = export_params(reader, cfg, F.out, dtype=F.dtype, max_shard_size=F.max_shard_size,
                              overwrite=F.overwrite, before_commit=check_base)
    print(json.dumps({"checkpoint": str(step_dir), "out": F.out, "tensors": len(index["weight_map"]),
                      "shards": len(set(index["weight_map"].values())), "bytes": index["metadata"]["total_size"]}))


if __name__ == "__main__":
    from mirage_base.cli import run

    run(main, "export")
