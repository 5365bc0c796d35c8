"""Sequence (context) parallelism: step time and per-device peak memory vs the `sequence` mesh axis size.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.seq_parallel [--json] [--sizes=1,2,4,8]

The runtime's real sharded train step (`train.setup.RunSetup`, as `train.loop.Trainer`) of configs/tiny.py with
8 heads of 8 (so 8 divides the heads for the Ulysses all-to-all), on 8 CPU devices: mesh fsdp = 8 / s,
sequence = s, the same global batch for every s, the state sharded over fsdp x sequence (as
configs/mirage_10b.py does). Memory is the compiled step's `memory_analysis()` per
device (arguments + outputs - aliased + temporaries + code), not process RSS (one process holds all 8
virtual devices). Step times are alternated between the sizes. On one CPU host the 8 "devices" share the
same cores, so the step time shows the cost of the extra collectives, not a speed-up.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from bench import common
from mirage_jax import run_config
from mirage_jax.aot.layout import params_sharded_over

# 8 heads x 8 = the tiny model's attention width (64) with a head count every size up to 8 divides.
MODEL = {"model.num_heads": 8, "model.head_dim": 8}
# The state sharded over fsdp x sequence (as every laid-out config does: mirage_jax.aot.layout), so that every
# size keeps the state spread over all 8 devices and the memory column shows what sequence parallelism changes.
PARAM_RULES = params_sharded_over(run_config.PARAM_RULES)


def measure(sizes: Sequence[int] = (1, 2, 4, 8), rounds: int = 3, overrides: dict[str, Any] | None = None,
            devices: int = 8) -> dict:
    """{"rows": [{"sequence", "step_s", "memory_per_device_bytes", ...}], ...}; needs `devices` JAX devices."""
    import jax

    avail = jax.devices()
    if len(avail) < devices:
        raise RuntimeError(f"need {devices} devices, have {len(avail)}; set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    steps: dict[int, common.RealStep] = {}
    for s in sizes:
        ov = dict(MODEL)
        ov.update(overrides or {})
        ov.update({"mesh.ici.data": 1, "mesh.ici.fsdp": devices // s, "mesh.ici.sequence": s,
                   "mesh.ici.tensor": 1, "mesh.rules.params": PARAM_RULES})
        st = common.RealStep(common.tiny_config(ov), avail[:devices])
        st.compile()
        st.run()
        steps[s] = st
    times = common.alternate({str(s): st.run for s, st in steps.items()}, rounds)
    rows = []
    for s, st in steps.items():
        mem = st.memory()
        hlo = st.compile().as_text()
        rows.append({
            "sequence": s, "fsdp": devices // s, "step_s": common.median(times[str(s)]),
            "samples_per_s": st.global_batch / common.median(times[str(s)]),
            "memory_per_device_bytes": mem["total"], "temp_bytes": mem["temp"], "argument_bytes": mem["argument"],
            "all_to_all": sum(" all-to-all(" in line for line in hlo.splitlines()),
        })
    base = rows[0]
    for r in rows:
        r["step_time_vs_first"] = r["step_s"] / base["step_s"]
        r["memory_vs_first"] = r["memory_per_device_bytes"] / base["memory_per_device_bytes"]
    first = next(iter(steps.values()))
    from mirage_jax.describe import count_tokens

    return {
        "rows": rows,
        "setup": {"config": "configs/tiny.py", "overrides": {**MODEL, **(overrides or {})}, "devices": devices,
                  "global_batch": first.global_batch,
                  "tokens_per_sample": count_tokens(first.setup.mcfg,
                                                    dataclasses.asdict(first.setup.run_cfg.shapes))["total"],
                  "memory": "compiled memory_analysis() per device", "rounds": rounds},
        "times": times,
    }


def main(argv: list[str]) -> None:
    del argv
    F = flags.FLAGS
    res = measure([int(s) for s in F.sizes], F.rounds)
    if F.json:
        print(json.dumps(res))
        return
    print(f"{'sequence':>8}{'fsdp':>6}{'step s':>9}{'vs s=1':>8}{'mem/device':>13}{'vs s=1':>8}{'all-to-all':>11}")
    for r in res["rows"]:
        print(f"{r['sequence']:>8}{r['fsdp']:>6}{r['step_s']:>9.3f}{r['step_time_vs_first']:>8.2f}"
              f"{common.fmt_bytes(r['memory_per_device_bytes']):>13}{r['memory_vs_first']:>8.2f}{r['all_to_all']:>11}")


if __name__ == "__main__":
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_list("sizes", ["1", "2", "4", "8"], "Sequence axis sizes.")
    flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)  # --help exits 0, --a-b is --a_b
