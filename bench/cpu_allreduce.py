"""All-reduce of the tiny demo model's gradient size across local processes, on its own.

    python launch/local.py --processes=2 --devices-per-process=4 -- python -m bench.cpu_allreduce

Times `psum` of a [devices, N] float32 array (N = 474,368, the `configs/tiny.py:demo` parameter count) over
all devices, over the devices of one process, and hierarchically (process-local first, then across
processes), 10 calls each after a warm-up, alternating, twice. Process 0 prints milliseconds per call.
docs/runtime.md uses it to tell collective volume apart from the rest of a multi-process step.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mirage_jax.train import distributed

N = 474_368


def main() -> None:
    distributed.initialize()  # the variables launch/local.py sets
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    procs = jax.process_count()
    mesh = Mesh(np.array(devs).reshape(procs, len(devs) // procs), ("proc", "local"))
    spec = P(("proc", "local"))
    x = jax.make_array_from_callback((len(devs), N), NamedSharding(mesh, spec), lambda idx: np.ones((1, N), np.float32))

    def reduced(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))

    fns = {
        "all devices": reduced(lambda a: jax.lax.psum(a, ("proc", "local"))),
        "one process's devices": reduced(lambda a: jax.lax.psum(a, "local")),
        "local, then across processes": reduced(lambda a: jax.lax.psum(jax.lax.psum(a, "local"), "proc")),
    }
    for _ in range(2):
        for name, f in fns.items():
            f(x).block_until_ready()
            t = time.perf_counter()
            for _ in range(10):
                y = f(x)
            y.block_until_ready()
            if jax.process_index() == 0:
                print(f"psum over {name} ({procs} x {len(devs) // procs} devices, {N:,} floats): "
                      f"{(time.perf_counter() - t) / 10 * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(prog="python -m bench.cpu_allreduce", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
