"""Small building blocks shared by the streams: dense layers with logical axes, norms, SwiGLU."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

DTYPE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def partitioned(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
    """Attach logical axis names to an initializer. Sharding is applied by the runtime (jit
    out_shardings under `logical_axis_rules`), never eagerly at construction."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def dense(
    din: int,
    dout: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    bias: bool,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    zero: bool = False,
) -> nnx.Linear:
    """nnx.Linear whose kernel (and bias) carry logical axis names for the sharding rules."""
    kinit = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kinit, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """Parameter-free RMSNorm computed in float32 (diffusers `RMSNorm(0, eps, False)`)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Parameter-free LayerNorm in float32 (Mochi's final norm)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def modulated_rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm(x) * scale, returned in x's dtype (diffusers `MochiModulatedRMSNorm`)."""
    return (rms_norm(x, eps) * scale.astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """SwiGLU MLP without biases: down(up(x) * silu(gate(x))). Mochi fuses up|gate into one matrix."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        kw = dict(rngs=rngs, bias=False, dtype=dtype, param_dtype=param_dtype)
        self.up = dense(dim, hidden, ("embed", "mlp"), **kw)
        self.gate = dense(dim, hidden, ("embed", "mlp"), **kw)
        self.down = dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        from mirage_jax.parallel.sharding import constrain

        h = self.up(x) * jax.nn.silu(self.gate(x))
        h = constrain(h, ("batch", "seq", "mlp"))
        return self.down(h)
