"""Small building blocks shared by the streams: dense layers with logical axes, norms, SwiGLU."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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
) -> Dense:
    """`Dense` (an nnx.Linear) whose kernel (and bias) carry logical axis names for the sharding rules."""
    kinit = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return Dense(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kinit, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        dot_general=linear_dot_general,
        rngs=rngs,
    )


class Dense(nnx.Linear):
    """nnx.Linear plus an optional low-rank adapter: `y = x @ kernel + bias + lora(x)`.

    `lora` is None (the class default: not part of the module's graph or state) unless `mirage_jax.lora.attach`
    sets it on a LoRA run; the kernel's parameter path is the same either way (`.../q/kernel`), as with
    `nnx.LoRALinear`, so a base checkpoint and the naming table apply unchanged."""

    lora: Any = None

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        return y if self.lora is None else y + self.lora(inputs).astype(y.dtype)


DENSE_NAME = "dense_out"  # checkpoint name of every `dense` layer's matmul output (remat policies "dots*")
# Checkpoint names of single projections' outputs (on top of DENSE_NAME), so a remat policy can keep some and
# recompute the rest (model/dit.py REMAT). Every stream uses the same names.
MLP_UP, MLP_GATE, MLP_DOWN = "mlp_up", "mlp_gate", "mlp_down"  # SwiGLU's (B, S, hidden) x2 and (B, S, dim)


def linear_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: tuple, precision: Any = None,
                       preferred_element_type: Any = None, out_sharding: Any = None) -> jax.Array:
    """`jax.lax.dot_general` for nnx.Linear: x (..., din) @ kernel (din, dout) -> (..., dout) goes through `linear`
    (its own backward) and is named `DENSE_NAME` (remat's dot policies cannot see a dot inside a custom VJP);
    any other contraction goes to `jax.lax.dot_general` unchanged."""
    if (out_sharding is None and rhs.ndim == 2
            and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,)) and not any(dimension_numbers[1])):
        return jax.ad_checkpoint.checkpoint_name(linear(lhs, rhs, precision, preferred_element_type), DENSE_NAME)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear(x: jax.Array, kernel: jax.Array, precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """x (..., din) @ kernel (din, dout) -> (..., dout).

    Custom VJP, same values as autodiff: d_kernel = dot_general(x, d_out) contracting every leading axis, written
    with x as the left operand. JAX's transpose rule writes it as dot_general(d_out, x) followed by a transpose,
    and XLA:CPU then copies d_out into (dout, tokens) layout and runs a generic dot instead of YNNPACK: 2.3x
    slower for the MLP's x (2, 1024, 256), d_out (2, 1024, 682) (docs/cpu_step.md). d_x = d_out @ kernel^T as
    autodiff computes it (tests/test_layers_vjp.py compares both with autodiff). Reverse mode only: like
    every jax.custom_vjp, `jax.jvp` / `jax.jacfwd` through it raise a TypeError."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _linear_fwd(x, kernel, precision, preferred_element_type):
    return linear(x, kernel, precision, preferred_element_type), (x, kernel)


def _linear_bwd(precision, preferred_element_type, residuals, d_out):
    x, kernel = residuals
    lead = tuple(range(x.ndim - 1))
    d_x = jax.lax.dot_general(d_out, kernel, (((d_out.ndim - 1,), (1,)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type)
    d_kernel = jax.lax.dot_general(x, d_out, ((lead, lead), ((), ())), precision=precision,
                                   preferred_element_type=preferred_element_type)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def modulated_rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm(x) * scale over the last axis, computed in float32, returned in x's dtype (diffusers
    `MochiModulatedRMSNorm`); `scale` broadcasts against x (e.g. (B, 1, D) per sample, (D,) learned).

    Custom VJP: only x and scale are kept for the backward pass, which recomputes r = rsqrt(mean(x^2) + eps)
    (one pass over x) instead of keeping the float32 copy of x, r and the normalised x that autodiff keeps
    (a third of the per-layer residuals of the scanned blocks). With y = x r:
    dx = r * (g - x r^2 mean(g x)) where g = dout * scale, d_scale = sum of dout * y over scale's broadcast axes
    (tests/test_layers_vjp.py compares both with autodiff of the plain formula)."""
    return (rms_norm(x, eps) * scale.astype(jnp.float32)).astype(x.dtype)


def _modulated_rms_norm_fwd(x, scale, eps):
    return modulated_rms_norm(x, scale, eps), (x, scale)


def _modulated_rms_norm_bwd(eps, residuals, d_out):
    x, scale = residuals
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    y = x32 * r
    d32 = d_out.astype(jnp.float32)
    g = d32 * scale.astype(jnp.float32)
    d_x = r * (g - y * jnp.mean(g * y, axis=-1, keepdims=True))
    d_scale = _sum_to_shape(d32 * y, scale.shape)
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x over the axes that broadcasting `shape` to x.shape expanded (the cotangent of a broadcast)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


modulated_rms_norm.defvjp(_modulated_rms_norm_fwd, _modulated_rms_norm_bwd)


@jax.custom_vjp
def swiglu(up: jax.Array, gate: jax.Array) -> jax.Array:
    """up * silu(gate) (Shazeer 2020, "GLU Variants Improve Transformer"), same shape and dtype as `up`.

    Custom VJP: keeps only up and gate for the backward pass (autodiff of silu keeps four arrays of the MLP's
    width): with s = sigmoid(gate), d_up = dout * gate * s, d_gate = dout * up * s * (1 + gate * (1 - s))."""
    return up * jax.nn.silu(gate)


def _swiglu_fwd(up, gate):
    return swiglu(up, gate), (up, gate)


def _swiglu_bwd(residuals, d_out):
    up, gate = residuals
    s = jax.nn.sigmoid(gate)
    return d_out * gate * s, d_out * up * s * (1 + gate * (1 - s))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nnx.Module):
    """SwiGLU MLP without biases: down(up(x) * silu(gate(x))). Mochi fuses up|gate into one matrix."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        kw = dict(rngs=rngs, bias=False, dtype=dtype, param_dtype=param_dtype)
        self.up = dense(dim, hidden, ("embed", "mlp"), **kw)
        self.gate = dense(dim, hidden, ("embed", "mlp"), **kw)
        self.down = dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        from mirage_jax.parallel.sharding import constrain

        name = jax.ad_checkpoint.checkpoint_name
        h = swiglu(name(self.up(x), MLP_UP), name(self.gate(x), MLP_GATE))
        h = constrain(h, ("batch", "seq", "mlp"))
        return name(self.down(h), MLP_DOWN)
