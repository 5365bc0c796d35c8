"""`MetricsWindow`: averages over the steps since the last log line (step time, data wait, throughput, MFU,
loss per noise bucket) and writes them every `train.log_every` steps and at the last step."""

from __future__ import annotations

from typing import Any

import numpy as np

from mirage_jax.train.hooks import Hook, StepInfo


class MetricsWindow(Hook):
    """`writer`: a `train.metrics.MetricsWriter` (anything with `write(step, scalars)`).

    `flops_per_sample`/`tokens_per_sample`: the analytic model (`metrics.throughput_model`; 0 = TFLOP/s and MFU
    not reported); `peak`: peak FLOP/s per device (0 = MFU not reported); `n_devices`: devices of the mesh.
    The first step of a run (compilation warm-up) is logged once ("first step took") and kept out of the
    averages; the window's data wait is the time spent drawing the batches its steps consumed.
    """

    def __init__(self, writer: Any, *, log_every: int, global_batch: int, n_devices: int,
                 flops_per_sample: float = 0.0, tokens_per_sample: float = 0.0, peak: float = 0.0):
        self.writer = writer
        self.log_every, self.gb, self.n_dev = log_every, global_batch, n_devices
        self.flops_per_sample, self.tokens_per_sample, self.peak = flops_per_sample, tokens_per_sample, peak
        self._reset()

    def _reset(self) -> None:
        self.bucket_sum: Any = 0.0
        self.bucket_n: Any = 0.0
        self.time = self.wait = 0.0
        self.steps = 0

    def on_step(self, info: StepInfo) -> None:
        from absl import logging

        m = info.metrics
        if info.first:  # warm-up: reported once, kept out of the averages
            logging.info("first step took %.1f s", info.step_time_s)
        else:
            self.time += info.step_time_s
            self.wait += info.data_wait_s
            self.steps += 1
        self.bucket_sum = self.bucket_sum + np.asarray(m["loss_per_bucket"])
        self.bucket_n = self.bucket_n + np.asarray(m["bucket_counts"])
        if info.new_step % self.log_every == 0 or info.last:
            self.writer.write(info.new_step, {**self.scalars(m, info.step_time_s), **info.scalars})
            self._reset()

    def scalars(self, m: dict[str, Any], step_time_s: float) -> dict[str, Any]:
        """The log line's scalars from the window (`step_time_s`: used when the window holds no timed step)."""
        gb, n_dev = self.gb, self.n_dev
        avg = self.time / self.steps if self.steps else step_time_s
        out = {
            "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
            "step_time_s": avg, "data_wait_s": self.wait / max(self.steps, 1),
            "nonfinite_total": m["nonfinite_total"],
            "samples_per_s": gb / avg,
            "tokens_per_s_per_device": gb * self.tokens_per_sample / avg / n_dev,
            "loss_per_bucket": np.where(self.bucket_n > 0, self.bucket_sum / np.maximum(self.bucket_n, 1), np.nan),
        }
        if self.flops_per_sample:
            tflops = gb * self.flops_per_sample / avg / n_dev
            out["tflops_per_device"] = tflops / 1e12
            if self.peak:
                out["mfu"] = tflops / self.peak
        return out
