"""CPU efficiency of the train step: its achieved FLOP/s over the FLOP/s of a large XLA matmul, in one run.

    python -m bench.efficiency [--json] [--rounds=5] [--matmul=2048]

The step is the runtime's real jitted train step (`train.setup.RunSetup`, as `train.loop.Trainer`) of
configs/tiny.py on one CPU device. Its FLOPs are counted two ways: analytic (`describe.count_flops`, the
MFU numerator: forward + backward matmuls only) and XLA's `cost_analysis()` of the compiled step, corrected
for the scanned layers (`aot.flops.correct_compiled_flops`; it also counts norms, softmax, RoPE, the optimizer).
The matmul (n x n fp32, 2 n^3 FLOPs) is the practical peak of this host for XLA; the two are timed alternately.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags

from bench import common


def matmul_runner(n: int) -> Any:
    """A jitted n x n fp32 matmul; returns (run, flops per call)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)

    def run() -> None:
        f(a, b).block_until_ready()

    run()
    return run, 2.0 * n**3


def measure(rounds: int = 5, matmul: int = 2048, overrides: dict[str, Any] | None = None, reps: int = 2) -> dict:
    """{"step_flops_per_s", "matmul_flops_per_s", "efficiency" (= ratio), ...} for the tiny config's step."""
    step = common.RealStep(common.tiny_config(overrides))
    step.compile()
    step.run()
    mm, mm_flops = matmul_runner(matmul)
    times = common.alternate({"step": step.run, "matmul": mm}, rounds, reps)
    t_step, t_mm = common.median(times["step"]), common.median(times["matmul"])
    analytic = step.analytic_flops()
    compiled = step.compiled_flops()
    step_fps = analytic / t_step
    mm_fps = mm_flops / t_mm
    return {
        "step_flops_per_s": step_fps,
        "matmul_flops_per_s": mm_fps,
        "efficiency": step_fps / mm_fps,
        "efficiency_compiled_flops": compiled["corrected"] / t_step / mm_fps,
        "step_s": t_step,
        "matmul_s": t_mm,
        "step_flops_analytic": analytic,
        "step_flops_compiled_raw": compiled["raw"],
        "step_flops_compiled_corrected": compiled["corrected"],
        "samples_per_s": step.global_batch / t_step,
        "setup": {"config": "configs/tiny.py", "overrides": overrides or {}, "global_batch": step.global_batch,
                  "matmul_n": matmul, "rounds": rounds, "reps": reps},
        "times": times,
    }


def main(argv: list[str]) -> None:
    del argv
    F = flags.FLAGS
    res = measure(F.rounds, F.matmul)
    if F.json:
        print(json.dumps(res))
        return
    print(f"train step {res['step_flops_per_s'] / 1e9:.2f} GFLOP/s (analytic), matmul "
          f"{res['matmul_flops_per_s'] / 1e9:.2f} GFLOP/s -> efficiency {res['efficiency']:.1%} "
          f"({res['efficiency_compiled_flops']:.1%} with XLA's corrected FLOP count)")


if __name__ == "__main__":
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
    flags.DEFINE_integer("matmul", 2048, "Matmul size n (n x n fp32).")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)  # --help exits 0, --a-b is --a_b
