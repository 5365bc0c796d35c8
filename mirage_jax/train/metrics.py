"""Training metrics to the console, TensorBoard event files and a JSONL file (process 0 writes).

Throughput numbers: tokens/s/device counts every token the DiT attends over (video, reference, audio,
text); model TFLOP/s/device uses the analytic train FLOPs of `mirage_jax.describe.count_flops` (remat
recomputation not counted), and MFU divides that by `metrics.peak_flops_per_device` (or the device
kind's bf16 peak from `mirage_jax.aot.chips.PEAK_FLOPS` when that is 0).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from mirage_jax.aot.chips import peak_flops
from mirage_jax.paths import AppendLog
from mirage_jax.run_config import MetricsConfig, RunConfig


def peak_flops_per_device(configured: float) -> float:
    """The configured peak, else `chips.peak_flops` of this device kind, else 0 (MFU not reported)."""
    if configured and configured > 0:
        return float(configured)
    return peak_flops(jax.devices()[0].device_kind)


def throughput_model(run: RunConfig) -> tuple[int, int]:
    """(train FLOPs per sample, tokens per sample) for the configured model and shapes."""
    from mirage_jax.describe import count_flops, count_tokens

    shapes = dataclasses.asdict(run.shapes)
    return int(count_flops(run.model, shapes)), int(count_tokens(run.model, shapes)["total"])


class MetricsWriter:
    """Console + TensorBoard + JSONL sink; silent on processes other than 0."""

    def __init__(self, workdir: str, metrics_cfg: MetricsConfig):
        self.enabled = jax.process_index() == 0
        self.tb = None
        self.jsonl = None
        if not self.enabled:
            return
        out = epath.Path(workdir)
        out.mkdir(parents=True, exist_ok=True)
        if metrics_cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if metrics_cfg.jsonl:
            self.jsonl = AppendLog(out / "metrics.jsonl")  # GCS objects cannot be opened for append

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        flat = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0 and not isinstance(v, str)}
        labels = {k: v for k, v in scalars.items() if isinstance(v, str)}  # e.g. the shape bucket's name
        for k, v in scalars.items():
            if np.ndim(v) == 1:  # per-bucket vectors -> name/i
                for i, x in enumerate(np.asarray(v)):
                    flat[f"{k}/{i}"] = float(x)
        if self.tb is not None:
            for k, v in flat.items():
                if np.isfinite(v):  # empty timestep buckets are NaN
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **labels, **flat}) + "\n")
            self.jsonl.flush()
        shown = " ".join(f"{k}={flat[k]:.4g}" for k in ("loss", "grad_norm", "lr", "step_time_s", "data_wait_s",
                                                        "tokens_per_s_per_device", "tflops_per_device", "mfu")
                         if k in flat)
        logging.info("step %d: %s", step, shown)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
