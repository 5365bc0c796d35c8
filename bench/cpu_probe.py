"""What bounds the CPU train step against PyTorch's (issue 34; docs/cpu_step.md "On other hosts of this kind"):

    python -m bench.cpu_probe [--json] [--rounds=7] [--lengths=544,1056,2048]

1. Matmul threads: fp32 matmuls of the train step's shapes in XLA and in PyTorch, each timed in a fresh
   process given 1 compute thread and 1 CPU, and in one given 2 threads and 2 CPUs (NPROC, OMP_NUM_THREADS
   and the CPU affinity are set before either library starts; the XLA threads each child really ran with are
   reported), the two alternated round by round. `speedup` = 1-thread time / 2-thread time: 2.0 when a
   matmul uses both cores fully.
2. (S, S) logits: q k^T of (2, 8, S, 32) fp32 queries and keys at each length S, XLA (`jnp.einsum`, the
   contraction `model/attention.py` runs, here in (B, H, S, D) layout) and PyTorch (`q @ k^T`) alternated in
   this process, in GFLOP/s (2 x 2 x 8 x S^2 x 32 FLOPs). Where the (S, S) output no longer fits the caches
   both slow down; PyTorch's flash-attention kernel never writes that output, the JAX step does.

Both parts record the load average before and after them (`common.host_state`: not a claim above the core
count). Rerun it next to `python -m bench.train_step --profile` on the host whose ratio is in question.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from bench import common

# (name, lhs shape, rhs shape): the 2x bench's MLP up projection (batch 2, 1056 tokens, width 256 -> 682) and
# one large square matmul for reference
MATMULS = (("mlp_up (2,1056,256)x(256,682)", (2, 1056, 256), (256, 682)),
           ("square (4096,1024)x(1024,1024)", (4096, 1024), (1024, 1024)))


def _matmul_child(threads: int, cpus: list[int], matmuls: Sequence[tuple[str, tuple, tuple]], reps: int,
                  out: Any) -> None:
    """In a spawned process: `threads` threads on `cpus` for XLA and PyTorch; median seconds of each matmul over
    `reps` calls, {"jax": [...], "torch": [...]} in the order of `matmuls`."""
    os.sched_setaffinity(0, cpus)
    os.environ.update(common.thread_env(threads))
    # one CPU device, as the train step's bench runs: a forced host device count (the test suite's 8) would
    # give XLA's client a pool of that many threads whatever NPROC says
    os.environ["XLA_FLAGS"] = common.without_device_count(os.environ.get("XLA_FLAGS", ""))
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    jit_matmul = jax.jit(jnp.matmul)
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for _, a_shape, b_shape in matmuls:
        a, b = (np.random.default_rng(0).standard_normal(s, np.float32) for s in (a_shape, b_shape))
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        calls = {"jax": lambda ja=ja, jb=jb: jit_matmul(ja, jb).block_until_ready(),
                 "torch": lambda ta=ta, tb=tb: ta @ tb}
        for side, call in calls.items():  # one side after the other: the children, not the sides, alternate
            call()  # compile / warm up
            times[side].append(common.median(common.alternate({side: call}, reps)[side]))
    out.put((times, common.xla_threads()))


def _result(p: Any, q: Any) -> Any:
    """The child's one result; RuntimeError naming its exit code if it ended without sending it."""
    import queue

    alive = True
    while alive:
        alive = p.is_alive()  # read before the get: a result sent just before exiting is still taken
        try:
            out = q.get(timeout=1.0)
        except queue.Empty:
            continue
        p.join()
        return out
    raise RuntimeError(f"bench.cpu_probe: a timing child exited with code {p.exitcode} before reporting "
                       "(its traceback is above)")


def matmul_threads(rounds: int = 5, reps: int = 10, matmuls: Sequence[tuple[str, tuple, tuple]] = MATMULS
                   ) -> list[dict[str, Any]]:
    """Per matmul and side ("jax", "torch"): median seconds with 1 thread on 1 CPU and with 2 threads on 2 CPUs
    (fresh processes, alternated `rounds` times), their ratio `speedup`; the XLA rows also carry the XLA
    threads each child counted.

    Raises RuntimeError where this process may use fewer than 2 CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise RuntimeError(f"bench.cpu_probe: needs 2 CPUs, this process may use {len(allowed)}")
    ctx = mp.get_context("spawn")
    runs: dict[int, list[dict[str, list[float]]]] = {1: [], 2: []}
    seen: dict[int, set] = {1: set(), 2: set()}
    for _ in range(rounds):
        for threads in (1, 2):
            q = ctx.Queue()
            p = ctx.Process(target=_matmul_child, args=(threads, allowed[:threads], list(matmuls), reps, q))
            p.start()
            times, xla = _result(p, q)
            runs[threads].append(times)
            seen[threads].add(xla)
    rows = []
    for i, (name, _, _) in enumerate(matmuls):
        for side in ("jax", "torch"):
            one = common.median([r[side][i] for r in runs[1]])
            two = common.median([r[side][i] for r in runs[2]])
            row = {"matmul": name, "side": side, "one_thread_s": one, "two_threads_s": two, "speedup": one / two}
            if side == "jax":
                row["xla_threads"] = {"1": sorted(seen[1], key=str), "2": sorted(seen[2], key=str)}
            rows.append(row)
    return rows


def logits_gflops(lengths: Sequence[int] = (544, 1056, 2048), rounds: int = 5, reps: int = 5
                  ) -> list[dict[str, Any]]:
    """Per length S: GFLOP/s of q k^T for (2, 8, S, 32) fp32 in XLA and in PyTorch, alternated in this process
    with every core this process may use (XLA's only if jax has not started here yet: `xla_threads` says how
    many it ran with), and the (S, S) output's size in MiB."""
    common.set_threads(common.cores())
    import jax
    import jax.numpy as jnp
    import torch

    logits = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))
    rows = []
    for s in lengths:
        qn = np.random.default_rng(0).standard_normal((2, 8, s, 32), np.float32)
        qj, qt = jnp.asarray(qn), torch.from_numpy(qn)
        runners = {"jax": lambda qj=qj: logits(qj, qj), "torch": lambda qt=qt: qt @ qt.transpose(-1, -2)}
        for r in runners.values():
            getattr(r(), "block_until_ready", lambda: None)()
        times = common.alternate(runners, rounds, reps)
        flops = 2 * 2 * 8 * s * s * 32
        rows.append({"length": s, "output_mib": 2 * 8 * s * s * 4 / 2**20,
                     "jax_gflops_per_s": flops / common.median(times["jax"]) / 1e9,
                     "torch_gflops_per_s": flops / common.median(times["torch"]) / 1e9,
                     "xla_threads": common.xla_threads()})
    return rows


def probe(rounds: int = 5, lengths: Sequence[int] = (544, 1056, 2048)) -> dict[str, Any]:
    """Both parts, each with the load average around it."""
    before = common.load_average()
    threads = matmul_threads(rounds)
    mid = common.load_average()
    logits = logits_gflops(lengths, rounds)
    return {"matmul_threads": threads, "matmul_threads_host": common.host_state(before, mid),
            "logits": logits, "logits_host": common.host_state(mid, common.load_average()),
            "machine": common.machine_info()}


def main(argv: list[str]) -> None:
    del argv
    F = flags.FLAGS
    r = probe(F.rounds, [int(x) for x in F.lengths.split(",")])
    if F.json:
        print(json.dumps(r))
        return
    for part, key in (("matmul threads", "matmul_threads_host"), ("(S, S) logits", "logits_host")):
        h = r[key]
        print(f"{part}: " + ("a claim for this host: " if h["claim"] else "NOT A CLAIM: ") + h["why"])
    for m in r["matmul_threads"]:
        seen = f" (XLA threads seen {m['xla_threads']})" if "xla_threads" in m else ""
        print(f"{m['side']:5s} {m['matmul']}: 1 thread {m['one_thread_s'] * 1e3:.2f} ms, 2 threads "
              f"{m['two_threads_s'] * 1e3:.2f} ms: {m['speedup']:.2f}x{seen}")
    for g in r["logits"]:
        print(f"S={g['length']} ((S, S) output {g['output_mib']:.0f} MiB): XLA {g['jax_gflops_per_s']:.0f} GFLOP/s, "
              f"PyTorch {g['torch_gflops_per_s']:.0f} GFLOP/s")


if __name__ == "__main__":
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_integer("rounds", 5, "Alternating rounds.", lower_bound=1)
    flags.DEFINE_string("lengths", "544,1056,2048", "Sequence lengths S of the logits part, comma-separated.")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)
