"""LoRA fine-tuning (docs/lora.md): adapters on MirageDiT's dense layers (`adapter`) over a frozen base (`base`)."""
