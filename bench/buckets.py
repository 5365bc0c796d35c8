"""Shape buckets' cost: tokens/s of a run alternating two compiled bucket shapes vs a fixed-shape run.

    python -m bench.buckets [--rounds=5] [--steps=4] [--layers=2] [--json]

Two buckets of configs/tiny.py (1 s clips at batch 8, 2 s clips at batch 4: about the same tokens per batch),
each compiled ahead of time as `train.shape_buckets.compile_steps` does (compile time per bucket reported). A
round runs `steps` steps of the fixed shape (1 s clips only), then `steps` steps alternating the two buckets, on
one device, one state donated through every step, and the same steps grouped by shape (all 1 s, then all 2 s);
tokens/s is counted with `describe.count_tokens` per sample. Two ratios of medians taken side by side
(bench/common.py: shared hosts; the load is recorded): alternating / grouped is what switching compiled shapes
every step costs (target >= 0.95: no padding, no recompiles); alternating / fixed adds what the longer clips'
attention costs per token (quadratic in the clip's tokens: a property of the shapes, not of bucketing).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from absl import app, flags

from bench import common

TARGET = 0.95  # issue 31: alternating / grouped tokens/s

FLAGS = flags.FLAGS


def measure(rounds: int = 5, steps: int = 4, layers: int = 2) -> dict[str, Any]:
    import jax

    from mirage_jax.describe import count_tokens
    from mirage_jax.train import data as data_lib
    from mirage_jax.train.setup import RunSetup

    load0 = common.load_average()
    cfg = common.tiny_config({"model.num_layers": layers, "train.global_batch_size": 8})
    setup = RunSetup(cfg, jax.devices()[:1])
    run = setup.run_cfg
    buckets = {"1s": (25, 8), "2s": (50, 4)}  # latent frames (= audio frames, uniform:1) and global batch
    batches, compiled, compile_s, tokens = {}, {}, {}, {}
    with jax.set_mesh(setup.mesh):
        state = setup.layout.create()
        for name, (frames, batch) in buckets.items():
            shapes = dataclasses.replace(run.shapes, latent_frames=frames, audio_frames=frames)
            bshapes = data_lib.batch_shapes(dataclasses.replace(run, shapes=shapes))
            rows = data_lib.RowRange(0, batch, batch)
            local = next(data_lib.SyntheticSource(bshapes, rows, 1))
            batches[name] = data_lib.to_global(local, setup.batch_shardings, batch)
            t = time.perf_counter()
            compiled[name] = setup.step_fn.lower(state, batches[name]).compile()
            compile_s[name] = time.perf_counter() - t
            tokens[name] = batch * count_tokens(run.model, dataclasses.asdict(shapes))["total"]
        box = {"state": state}

        def runner(names: list[str]) -> Any:
            def go() -> Any:
                out = None
                for n in names:
                    box["state"], m = compiled[n](box["state"], batches[n])
                    out = m["loss"]
                return out
            return go

        fixed = ["1s"] * steps
        mixed = [("1s", "2s")[i % 2] for i in range(steps)]
        grouped = sorted(mixed)
        runner(fixed + mixed)().block_until_ready()  # warm-up
        times = common.alternate({"fixed": runner(fixed), "buckets": runner(mixed), "grouped": runner(grouped)},
                                 rounds)
    tok = {"fixed": sum(tokens[n] for n in fixed), "buckets": sum(tokens[n] for n in mixed),
           "grouped": sum(tokens[n] for n in grouped)}
    rate = {k: tok[k] / common.median(v) for k, v in times.items()}
    return {
        "bench": "buckets", "rounds": rounds, "steps": steps, "layers": layers,
        "buckets": {n: {"latent_frames": f, "batch": b, "tokens_per_batch": tokens[n], "compile_s": compile_s[n]}
                    for n, (f, b) in buckets.items()},
        "tokens_per_s": rate, "seconds": {k: common.spread(v) for k, v in times.items()},
        "ratio_buckets_over_fixed": rate["buckets"] / rate["fixed"],
        "ratio_buckets_over_grouped": rate["buckets"] / rate["grouped"],
        "host": common.host_state(load0, common.load_average()), "machine": common.machine_info(),
    }


def report(r: dict[str, Any]) -> list[str]:
    """The results.md section of a `measure` result (`python -m bench --only=buckets`)."""
    t = r["tokens_per_s"]
    out = ["## 9. Shape buckets: two compiled shapes alternating vs a fixed shape (issue 31)", "",
           f"`python -m bench.buckets --rounds={r['rounds']} --steps={r['steps']} --layers={r['layers']}`: "
           "configs/tiny.py on one device, each bucket's step compiled ahead of time; a round times the fixed shape, "
           "the two buckets alternating every step and the same steps grouped by shape (median of the rounds).", "",
           common.host_line(r), "",
           "| bucket | latent frames | batch | tokens per batch | compile s |", "|---|---|---|---|---|"]
    out += [f"| {n} | {b['latent_frames']} | {b['batch']} | {b['tokens_per_batch']} | {b['compile_s']:.1f} |"
            for n, b in r["buckets"].items()]
    g, met = common.against_target(r["ratio_buckets_over_grouped"], TARGET, digits=3)
    out += ["", f"tokens/s: fixed shape {t['fixed']:.0f}, grouped {t['grouped']:.0f}, alternating {t['buckets']:.0f}; "
            f"alternating / grouped {g} (the cost of switching compiled shapes; target >= {TARGET}: "
            f"{met}), alternating / fixed {r['ratio_buckets_over_fixed']:.3f}.", ""]
    return out


def main(argv: list[str]) -> None:
    del argv
    r = measure(FLAGS.rounds, FLAGS.steps, FLAGS.layers)
    if FLAGS.json:
        print(json.dumps(r))
        return
    for n, b in r["buckets"].items():
        print(f"bucket {n}: batch {b['batch']}, {b['tokens_per_batch']} tokens per batch, compiled in "
              f"{b['compile_s']:.1f} s")
    t = r["tokens_per_s"]
    print(f"tokens/s: fixed shape (1 s) {t['fixed']:.0f}, two buckets grouped {t['grouped']:.0f}, alternating every "
          f"step {t['buckets']:.0f}")
    print("\n".join(report(r)[-2:]).strip())
    print(common.host_line(r))


if __name__ == "__main__":
    flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
    flags.DEFINE_integer("steps", 4, "Train steps per runner per round.")
    flags.DEFINE_integer("layers", 2, "model.num_layers of configs/tiny.py.")
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)
