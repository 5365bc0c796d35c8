"""`aot.collectives.collective_summary` against collectives of known size: a program compiled on the 8 CPU
devices (shard_map psum / all_gather, sizes in closed form) and lines of a real TPU compile (Findings 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mirage_jax.aot.collectives import collective_summary

# Two lines of the v6e-256 10B compile before the fix of docs/scaling.md Findings 5 (metadata shortened), and a
# tuple-shaped all-reduce as XLA writes combined ones.
TPU_LINES = """
  %all-reduce.724 = bf16[1,75600,3072]{2,1,0:T(8,128)(2,1)} all-reduce(%convolution_bitcast_fusion.13), channel_id=190
  %all-to-all.3 = bf16[1,9450,24,128]{3,2,1,0:T(8,128)(2,1)} all-to-all(%fusion.12), dimensions={2}
  %all-reduce.9 = (f32[]{:T(128)}, bf16[1536,3072]{1,0:T(8,128)(2,1)}) all-reduce(%a, %b), channel_id=9, to_apply=%add
  %fusion.1 = bf16[1,75600,3072]{2,1,0} fusion(%p), kind=kLoop, calls=%all-reduce.fake
"""


def test_tpu_lines():
    s = collective_summary(TPU_LINES)
    assert s["all-reduce"] == {"ops": 2, "largest_bytes": 75600 * 3072 * 2, "largest": "bf16[1,75600,3072]"}
    assert s["all-to-all"] == {"ops": 1, "largest_bytes": 9450 * 24 * 128 * 2, "largest": "bf16[1,9450,24,128]"}
    assert set(s) == {"all-reduce", "all-to-all"}  # the fusion that merely names an all-reduce is not one


def test_compiled_cpu_program():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def f(a, b):
        return jax.lax.psum(a, "x"), jax.lax.all_gather(b, "x", tiled=True)

    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P(), P()),
                                check_vma=False))  # all_gather(tiled) output is replicated
    a, b = jnp.ones((8, 1000), jnp.float32), jnp.ones((16, 250), jnp.int32)
    out = fn(a, b)
    np.testing.assert_array_equal(np.asarray(out[0]), np.full((1, 1000), 8.0))
    s = collective_summary(fn.lower(a, b).compile().as_text())
    assert s["all-reduce"]["largest_bytes"] == 1 * 1000 * 4 and s["all-reduce"]["largest"] == "f32[1,1000]"
    assert s["all-gather"]["largest_bytes"] == 16 * 250 * 4 and s["all-gather"]["largest"] == "s32[16,250]"
