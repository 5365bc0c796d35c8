"""SyncNet scoring throughput: windows/s of the JAX scorer (mirage_jax.eval.sync.Scorer) vs the PyTorch reference.

    python -m bench.syncnet [--quick] [--windows=100] [--rounds=5] [--threads=N]
    python -m bench --only=syncnet

Both sides embed the same windows (5 BGR 224 x 224 frames + 13 x 20 MFCC each) of one random video with the
same random SyncNet weights, in float32, in batches of `batch`: the JAX side through `Scorer.embed` as the CLI
and eval run it (weights loaded from the same state dict: BatchNorm folded into the convs, the lip tower as 2D
convolutions; windows gathered from uint8 frames, one jitted call per batch and tower, compiled before timing
with the scorer's XLA options, recorded in `setup`), the PyTorch side as SyncNetInstance.evaluate does it
(float tensor slices concatenated per batch, `forward_lip` + `forward_aud` under no_grad, eval-mode BatchNorm),
on the reference network `SyncNetModel.S` written out below. Rounds alternate the two (bench/common.alternate); the
same compute threads on both sides (common.set_threads); the load average before and after decides whether
the ratio is a claim (common.host_state). Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


def torch_syncnet() -> Any:
    """SyncNetModel.S of joonson/syncnet_python (random init, eval mode)."""
    import torch
    from torch import nn

    def block(conv: nn.Module, c: int, bn: type) -> list[nn.Module]:
        return [conv, bn(c), nn.ReLU()]

    class S(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            b2, b3 = nn.BatchNorm2d, nn.BatchNorm3d
            self.netcnnaud = nn.Sequential(
                *block(nn.Conv2d(1, 64, 3, 1, 1), 64, b2), nn.MaxPool2d(1, 1),
                *block(nn.Conv2d(64, 192, 3, 1, 1), 192, b2), nn.MaxPool2d(3, (1, 2)),
                *block(nn.Conv2d(192, 384, 3, padding=1), 384, b2), *block(nn.Conv2d(384, 256, 3, padding=1), 256, b2),
                *block(nn.Conv2d(256, 256, 3, padding=1), 256, b2), nn.MaxPool2d(3, 2),
                *block(nn.Conv2d(256, 512, (5, 4)), 512, b2))
            self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))
            self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))
            self.netcnnlip = nn.Sequential(
                *block(nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2)), 96, b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *block(nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), 256, b3),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
                *block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
                *block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
                *block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *block(nn.Conv3d(256, 512, (1, 6, 6)), 512, b3))

        def forward_aud(self, x: Any) -> Any:
            mid = self.netcnnaud(x)
            return self.netfcaud(mid.view((mid.size()[0], -1)))

        def forward_lip(self, x: Any) -> Any:
            mid = self.netcnnlip(x)
            return self.netfclip(mid.view((mid.size()[0], -1)))

    torch.manual_seed(0)
    return S().eval()


def measure(windows: int = 100, rounds: int = 5, batch: int = 20, threads: int | None = None) -> dict[str, Any]:
    """Alternating rounds of embedding `windows` windows on each side. Returns setup, per-round seconds
    (`jax_s`, `torch_s`), windows/s of the medians, `ratio` (JAX / PyTorch windows/s), `round_ratio`
    (min/median/max of torch_s / jax_s per round), `threads` and `host` (load and claim)."""
    from bench import common

    th = common.set_threads(threads or common.cores())
    load_before = common.load_average()
    import jax
    import torch

    from mirage_jax.eval.mfcc import mfcc
    from mirage_jax.eval.sync import Scorer
    from mirage_jax.eval.syncnet import load_weights

    net = torch_syncnet()
    with tempfile.TemporaryDirectory() as d:  # the JAX side loads the same weights the way the CLI does
        path = os.path.join(d, "w.model")
        torch.save(net.state_dict(), path)
        model = load_weights(path)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (windows + 5, 224, 224, 3), dtype=np.uint8)
    feats = mfcc(rng.standard_normal((windows + 5) * 640) * 3000)
    scorer = Scorer(model, batch=batch)
    imtv = torch.from_numpy(frames[None].transpose(0, 4, 1, 2, 3).astype(float)).float()  # [1, 3, T, 224, 224]
    cct = torch.from_numpy(feats.T[None, None].astype(float)).float()  # [1, 1, 13, M]

    def run_jax() -> Any:
        return scorer.embed(frames, feats, windows)

    def run_torch() -> Any:
        out = []
        with torch.no_grad():
            for i in range(0, windows, batch):
                r = range(i, min(windows, i + batch))
                out.append(net.forward_lip(torch.cat([imtv[:, :, v:v + 5] for v in r], 0)))
                out.append(net.forward_aud(torch.cat([cct[:, :, :, v * 4:v * 4 + 20] for v in r], 0)))
        return out

    run_jax()  # compile
    run_torch()
    times = common.alternate({"jax": run_jax, "torch": run_torch}, rounds)
    load_after = common.load_average()
    jm, tm = common.median(times["jax"]), common.median(times["torch"])
    return {
        "setup": {"windows": windows, "rounds": rounds, "batch": batch, "device": jax.default_backend(),
                  "xla_options": scorer.compiler_options},
        "jax_s": times["jax"], "torch_s": times["torch"],
        "jax_windows_per_s": windows / jm, "torch_windows_per_s": windows / tm, "ratio": tm / jm,
        "round_ratio": common.spread([t / j for t, j in zip(times["torch"], times["jax"], strict=True)]),
        "threads": {**th, "xla": common.xla_threads()},
        "host": common.host_state(load_before, load_after),
    }


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.syncnet", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 windows, 2 rounds: checks that it runs (not a claim)")
    p.add_argument("--windows", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=20, help="windows per call (the reference's default batch_size)")
    p.add_argument("--threads", type=int, default=0, help="compute threads, both sides (0: the usable CPUs)")
    a = p.parse_args()
    r = measure(8 if a.quick else a.windows, 2 if a.quick else a.rounds, 4 if a.quick else a.batch, a.threads or None)
    print(f"JAX {r['jax_windows_per_s']:.2f} windows/s, PyTorch {r['torch_windows_per_s']:.2f} windows/s: "
          f"JAX / PyTorch = {r['ratio']:.2f} ({'claim' if r['host']['claim'] else 'not a claim'}: {r['host']['why']})")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
