"""Joint self-attention with interchangeable backends.

One function, `attention(q, k, v, mask, backend)`, over q/k/v of shape (B, S, heads, head_dim) and a
boolean token mask (B, S) that removes padding and dropped modalities from the keys. Outputs at
masked query positions are zero (as diffusers' Mochi processor leaves padded text outputs), so a
masked token can never influence an unmasked one.

Backends (all compute the same numbers within tolerance; tests compare them with `xla` and `xla` with
`jax.nn.dot_product_attention`):
- `xla`: einsum + fp32 softmax with a custom VJP (`softmax_attention`): the backward recomputes the
  probabilities from the saved per-row logsumexp instead of keeping the (B, H, S, S) softmax as a residual
  (FlashAttention's backward, Dao 2023, Algorithm 2, without tiling). Runs everywhere; on CPU it is the
  fastest backend (bench/train_step.py, `--ablation`).
- `dot_product`: `jax.nn.dot_product_attention` with XLA's implementation choice.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on GPU.
- `splash`: Pallas splash attention on TPU (segment ids carry the mask); `interpret=True` runs the
  same kernel on CPU for tests.

Splash under remat: the kernel is a custom VJP (jax's `splash_attention_kernel`) whose forward returns the
residuals its backward kernels need: q, k, v, the output and the per-row logsumexp. The kernel is built with
`residual_checkpoint_name=SPLASH_RESIDUALS`, so the output and the logsumexp carry that checkpoint name
inside the VJP's forward: a remat policy that saves the name (`model.remat_policy='save_splash'` or
`'save_splash_qkv'`, model/dit.py) keeps them, and the backward no longer reruns the forward kernel (its
recomputation is dead code; tests/test_splash_remat.py counts the live forward kernels). Without the name,
every policy reruns the forward, the largest part of the 10B model's FLOPs (docs/scaling.md).

Splash backward: by default two kernels, dq (QK^T, dO V^T, dS K) and dk/dv (QK^T, dO V^T, P^T dO, dS^T Q),
7 matmuls = 3.5 forwards. `model.splash_fused_bwd=True` runs jax's fused backward kernel
(`BlockSizes(use_fused_bwd_kernel=True)`): one kernel, 5 matmuls = 2.5 forwards, at the cost of a bf16 dq
partial per kv block, (S / block, heads, S, head_dim) per sample, summed after the kernel (16 GiB per
device for the 10B model's 76k tokens with 6 local heads and 512-token blocks; docs/scaling.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

try:  # Pallas TPU kernels: importable on CPU hosts too, runnable only on TPU (or interpreted).
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _splash_mask
except ImportError:  # pragma: no cover - depends on the jax build
    _splash = None
    _splash_mask = None

_NEG = -0.7 * float(np.finfo(np.float32).max)
SPLASH_RESIDUALS = "splash_residuals"  # checkpoint name of the splash kernel's output and logsumexp


def _logits(q_scaled: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    """(B, H, Sq, Sk) float32 logits of pre-scaled queries, plus the (B, Sk) additive key bias."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q_scaled, k, preferred_element_type=jnp.float32)
    return s + bias[:, None, None, :]


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D) + bias) v for q, k, v of shape (B, S, H, D) and a float32 key bias (B, S)
    (0 for a valid key, a large negative number for a masked one); returns (B, S, H, D) in v's dtype.

    Forward: logits and softmax in float32, the 1/sqrt(D) scale folded into q (an (S, D) pass, not an
    (S, S) one) and the row normalisation applied to the (S, D) output. Backward: FlashAttention's
    (Dao 2023, "FlashAttention-2", Algorithm 2) without tiling: P = exp(logits - logsumexp) is recomputed
    from the saved per-row logsumexp; dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(D),
    dK = dS^T Q / sqrt(D). Residuals are q, k, v, the output and the (B, H, S) logsumexp, not the
    (B, H, S, S) probabilities. The bias gets a zero cotangent (it comes from a boolean mask)."""
    return _softmax_attention_fwd(q, k, v, bias)[0]


def _softmax_attention_fwd(q, k, v, bias):
    q_scaled = q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
    logits = _logits(q_scaled, k, bias)
    row_max = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - row_max[..., None])
    row_sum = jnp.sum(p, axis=-1)  # (B, H, S)
    unnormalised = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (unnormalised / jnp.swapaxes(row_sum, 1, 2)[..., None]).astype(v.dtype)
    logsumexp = row_max + jnp.log(row_sum)
    return out, (q_scaled, k, v, bias, out, logsumexp)


def _softmax_attention_bwd(residuals, d_out):
    q_scaled, k, v, bias, out, logsumexp = residuals
    scale = jnp.asarray(1.0 / np.sqrt(k.shape[-1]), k.dtype)
    p = jnp.exp(_logits(q_scaled, k, bias) - logsumexp[..., None])
    d_v = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out)
    d_p = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_s = (p * (d_p - delta[..., None])).astype(k.dtype)
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_s, k) * scale
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_s, q_scaled)
    return d_q, d_k, d_v, jnp.zeros_like(bias)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    bias = jnp.where(mask, 0.0, _NEG).astype(jnp.float32)
    return softmax_attention(q, k, v, bias)


def _dot_product_attention(q, k, v, mask, implementation):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation=implementation)


def splash_block(seq_len: int) -> int:
    """The splash kernel's token block for a sequence of `seq_len` tokens (it pads to a multiple of it).

    Long sequences: 512-token blocks (MaxText's default); with 128 the kernel's per-block mask table
    (blocks^2 entries, prefetched into SMEM) exceeds v5p's 1 MiB SMEM beyond ~60k tokens."""
    return 512 if seq_len >= 4096 else 128


def _splash_attention(q, k, v, mask, interpret: bool, block: int = 128, fused_bwd: bool = False):
    if _splash is None:
        raise RuntimeError("attention_backend='splash' needs jax.experimental.pallas splash attention "
                           "(a TPU build of jax); set model.attention_backend='xla' or 'dot_product'")
    b, s, h, d = q.shape
    pad = (-s) % block
    ids = mask.astype(jnp.int32)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        ids = jnp.pad(ids, ((0, 0), (0, pad)))  # padding is segment 0: it never meets a valid token
    sp = s + pad
    bs = min(block, sp)
    # fused_bwd: one backward kernel computes dq with dk, dv (5 matmuls instead of the dq + dkv kernels' 7);
    # it writes a bf16 dq partial per kv block, (S / bs, H, S, D) per sample, summed after the kernel.
    dq_blocks = {} if fused_bwd else dict(block_q_dq=bs, block_kv_dq=bs)
    sizes = _splash.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                               block_kv_dkv_compute=bs, use_fused_bwd_kernel=fused_bwd, **dq_blocks)
    kernel = _splash.make_splash_mha(
        _splash_mask.MultiHeadMask([_splash_mask.FullMask((sp, sp))] * h),
        head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret,
        residual_checkpoint_name=SPLASH_RESIDUALS,
    )
    qs = (q * (1.0 / np.sqrt(d))).astype(q.dtype)

    def one(qi, ki, vi, si):  # (S, H, D) -> kernel wants (H, S, D)
        t = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
        out = kernel(t(qi), t(ki), t(vi), segment_ids=_splash.SegmentIds(q=si, kv=si))
        return t(out)

    out = jax.vmap(one)(qs, k, v, ids)
    return out[:, :s]


def _splash_sharded(q, k, v, mask, interpret: bool, fused_bwd: bool):
    """Splash per device: a Mosaic kernel cannot be partitioned by XLA, so under an active mesh and
    logical rules it runs inside `jax.shard_map` with q/k/v laid out as (batch, full sequence, heads
    shard, head_dim) -- the layout the block's Ulysses constraint already produces."""
    from jax.sharding import PartitionSpec

    from mirage_jax.parallel.sharding import logical_to_spec

    spec = logical_to_spec(("batch", None, "act_heads", None))
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_attention, interpret=interpret, block=splash_block(q.shape[1]),
                              fused_bwd=fused_bwd)
    if spec is None or mesh is None or mesh.empty:
        return local(q, k, v, mask)
    mask_spec = PartitionSpec(spec[0], None)
    fn = jax.shard_map(local, in_specs=(spec, spec, spec, mask_spec),
                       out_specs=spec, check_vma=False)
    return fn(q, k, v, mask)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, backend: str = "xla",
              *, interpret: bool = False, splash_fused_bwd: bool = False) -> jax.Array:
    """Softmax attention of (B, S, H, D) inputs with a (B, S) key mask; masked queries give zeros.

    `splash_fused_bwd` (splash only, `model.splash_fused_bwd`): the kernel's fused backward (dq, dk, dv in
    one kernel) instead of separate dq and dkv kernels; same numbers, fewer matmuls, a dq buffer per kv block."""
    if backend == "xla":
        out = _xla_attention(q, k, v, mask)
    elif backend == "dot_product":
        out = _dot_product_attention(q, k, v, mask, None)
    elif backend == "cudnn":
        out = _dot_product_attention(q, k, v, mask, "cudnn")
    elif backend == "splash":
        out = _splash_sharded(q, k, v, mask, interpret, splash_fused_bwd)
    else:
        raise ValueError(f"model.attention_backend: unknown backend {backend!r}; "
                         "use one of 'xla', 'dot_product', 'cudnn', 'splash'")
    return out * mask[:, :, None, None].astype(out.dtype)
