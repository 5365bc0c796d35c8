"""MirageDiT: Mochi's asymmetric DiT with an audio stream, all streams in ONE joint self-attention.

Per block, each stream (video — which also carries reference-image tokens —, audio, text) has its own
adaLN modulation (scale-only RMSNorm + tanh gates, Mochi's "sandwich" norms), QKV/output projections,
Q/K RMSNorm and SwiGLU MLP; attention runs once over the concatenation of all tokens with a key mask.
With no audio and no reference tokens the equations are exactly diffusers' `MochiTransformer3DModel`
(tests/test_warm_start compares numerically); the last block is "context pre-only" for text and audio.

Layout: video latents are channels-last (B, T, H, W, C). The network is conditioned on `timestep` as
diffusers' Mochi is (1000 * (1 - noise level)) and predicts x0 - noise (see mirage_jax/diffusion).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_base.batch_keys import STREAMS
from mirage_jax.config import ModelConfig
from mirage_jax.model import rope as rope_lib
from mirage_jax.model.attention import SPLASH_RESIDUALS, attention
from mirage_jax.model.embeddings import AttentionPool, TimestepEmbedder
from mirage_jax.model.layers import (
    DENSE_NAME,
    DTYPE,
    MLP_DOWN,
    MLP_GATE,
    MLP_UP,
    SwiGLU,
    dense,
    layer_norm,
    modulated_rms_norm,
    partitioned,
)
from mirage_jax.parallel.sharding import constrain

NORM_EPS = 1e-6  # block and final norms (diffusers MochiTransformerBlock eps)
QK_EPS = 1e-5  # query/key RMSNorm (diffusers MochiAttention eps)

QKV_NAME = "attention_qkv"  # checkpoint name of the joint q, k, v (after RoPE), as attention receives them
QKV_PROJ = "qkv_proj"  # each stream's q, k, v projection outputs (B, S, attn_dim), before the Q/K norms and RoPE
OUT_PROJ = "out_proj"  # each stream's attention output projection's output (B, S, dim), before its gated norm


def _and_dense(policy: Any) -> Any:
    """`policy` plus the dense layers' matmul outputs: those are custom VJPs (layers.linear), invisible to JAX's
    dot policies, so they carry DENSE_NAME."""
    return jax.checkpoint_policies.save_from_both_policies(
        policy, jax.checkpoint_policies.save_only_these_names(DENSE_NAME))


_save = jax.checkpoint_policies.save_only_these_names


def _offload(device: tuple[str, ...], host: tuple[str, ...]) -> Any:
    """Keep the `device` names in HBM and move the `host` names' values to pinned host memory between the
    forward and the backward pass (jax's save_and_offload_only_these_names); everything else is recomputed."""
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=list(device), names_which_can_be_offloaded=list(host), offload_src="device",
        offload_dst="pinned_host")


# One line per policy. The save_splash* / offload_* ones keep splash's residuals (its forward is not rerun);
# their other names say which projection outputs are kept, so the backward reruns only the rest of the block
# (docs/scaling.md, "Saving more of each block"). With a backend other than splash, SPLASH_RESIDUALS names nothing.
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _and_dense(jax.checkpoint_policies.checkpoint_dots),
    "dots_no_batch": _and_dense(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "save_attention": _save("attention_out"),
    # The splash kernel's own residuals (output + logsumexp, named in model/attention.py): its forward is not
    # rerun in the backward. Other backends have no such name: there this is full remat.
    "save_splash": _save(SPLASH_RESIDUALS),
    # ... and the q, k, v it consumed: the backward reruns neither the kernel nor the QKV projections/RoPE.
    "save_splash_qkv": _save(SPLASH_RESIDUALS, QKV_NAME),
    "save_splash_down": _save(SPLASH_RESIDUALS, MLP_DOWN),  # + the MLP's down projection output
    "save_splash_mlp": _save(SPLASH_RESIDUALS, MLP_UP, MLP_GATE, MLP_DOWN),  # + all three MLP matmul outputs
    "save_splash_mlp_o": _save(SPLASH_RESIDUALS, MLP_UP, MLP_GATE, MLP_DOWN, OUT_PROJ),  # + the output projection
    "save_splash_dense": _save(SPLASH_RESIDUALS, DENSE_NAME),  # every dense output: no matmul of a block is rerun
    # as save_splash_dense, the MLP's up/gate outputs (the widest) in host memory instead of HBM
    "offload_mlp": _offload((SPLASH_RESIDUALS, QKV_PROJ, OUT_PROJ, MLP_DOWN), (MLP_UP, MLP_GATE)),
    # as save_splash_dense, every projection output in host memory; splash's residuals stay in HBM
    "offload_dense": _offload((SPLASH_RESIDUALS,), (DENSE_NAME,)),
}
# the policies under which splash's forward kernel is not rerun (its named residuals are kept)
SAVES_SPLASH = frozenset(p for p in REMAT if p.startswith(("save_splash", "offload_")))


def recomputes_attention(policy: str) -> bool:
    """Whether the backward pass reruns the splash forward kernel under `model.remat_policy=policy` (the
    FLOP correction of `aot.flops.correct_compiled_flops` adds one more forward of the kernel when it does)."""
    return policy != "none" and policy not in SAVES_SPLASH


class StreamLayer(nnx.Module):
    """One stream's parameters inside one block."""

    def __init__(self, cfg: ModelConfig, dim: int, mlp_ratio: float, *, pre_only: bool, out_bias: bool,
                 rngs: nnx.Rngs):
        dt, pdt = DTYPE[cfg.compute_dtype], DTYPE[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt)
        self.pre_only = pre_only
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        # adaLN: 4 chunks (scale_msa, gate_msa, scale_mlp, gate_mlp); pre-only streams get a scale only.
        self.mod = dense(cfg.video_dim, (1 if pre_only else 4) * dim, ("embed", "mod"), bias=True, zero=True, **kw)
        self.q = dense(dim, cfg.attn_dim, ("embed", "heads"), bias=False, **kw)
        self.k = dense(dim, cfg.attn_dim, ("embed", "heads"), bias=False, **kw)
        self.v = dense(dim, cfg.attn_dim, ("embed", "heads"), bias=False, **kw)
        ones = partitioned(nnx.initializers.ones_init(), ("norm",))
        self.q_norm = nnx.Param(ones(rngs.params(), (cfg.head_dim,), pdt))
        self.k_norm = nnx.Param(ones(rngs.params(), (cfg.head_dim,), pdt))
        if not pre_only:
            self.o = dense(cfg.attn_dim, dim, ("heads", "embed"), bias=out_bias, **kw)
            self.mlp = SwiGLU(dim, ModelConfig.mlp_hidden(dim, mlp_ratio), **kw)

    def qkv(self, x: jax.Array, c: jax.Array) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """Modulated pre-norm, projections and Q/K RMSNorm: (q, k, v) of shape (B, S, H, hd), mods."""
        mods = jnp.split(self.mod(jax.nn.silu(c)), 1 if self.pre_only else 4, axis=-1)
        h = modulated_rms_norm(x, 1.0 + mods[0][:, None, :], NORM_EPS)
        b, s, _ = h.shape
        split = lambda y: y.reshape(b, s, self.heads, self.head_dim)  # noqa: E731
        proj = lambda layer: split(jax.ad_checkpoint.checkpoint_name(layer(h), QKV_PROJ))  # noqa: E731
        q = modulated_rms_norm(proj(self.q), self.q_norm[...], QK_EPS)
        k = modulated_rms_norm(proj(self.k), self.k_norm[...], QK_EPS)
        v = proj(self.v)
        return (q, k, v), tuple(mods)

    def finish(self, x: jax.Array, attn_out: jax.Array, mods: tuple[jax.Array, ...]) -> jax.Array:
        """Gated sandwich-norm residuals around the output projection and the MLP."""
        if self.pre_only:
            return x
        _, gate_msa, scale_mlp, gate_mlp = mods
        b, s = attn_out.shape[:2]
        y = jax.ad_checkpoint.checkpoint_name(self.o(attn_out.reshape(b, s, -1)), OUT_PROJ)
        x = x + modulated_rms_norm(y, jnp.tanh(gate_msa)[:, None, :], NORM_EPS)
        h = modulated_rms_norm(x, 1.0 + scale_mlp[:, None, :], NORM_EPS)
        return x + modulated_rms_norm(self.mlp(h), jnp.tanh(gate_mlp)[:, None, :], NORM_EPS)


class MirageBlock(nnx.Module):
    """One joint-attention block over the video (+reference), audio and text streams."""

    def __init__(self, cfg: ModelConfig, *, last: bool, rngs: nnx.Rngs):
        self.backend = cfg.attention_backend
        self.splash_fused_bwd = cfg.splash_fused_bwd
        self.video = StreamLayer(cfg, cfg.video_dim, cfg.mlp_ratio_video, pre_only=False, out_bias=True, rngs=rngs)
        self.text = StreamLayer(cfg, cfg.text_dim, cfg.mlp_ratio_text, pre_only=last, out_bias=True, rngs=rngs)
        self.audio = (StreamLayer(cfg, cfg.audio_dim, cfg.mlp_ratio_audio, pre_only=last, out_bias=True, rngs=rngs)
                      if cfg.use_audio else None)

    def __call__(self, xs: dict[str, jax.Array | None], c: jax.Array, ropes: dict[str, Any],
                 mask: jax.Array) -> dict[str, jax.Array | None]:
        names = [n for n in STREAMS if xs.get(n) is not None]
        qkvs, mods = {}, {}
        for n in names:
            (q, k, v), mods[n] = getattr(self, n).qkv(xs[n], c)
            if ropes.get(n) is not None:
                cos, sin = ropes[n]
                q, k = rope_lib.apply_rope(q, cos, sin), rope_lib.apply_rope(k, cos, sin)
            # Token-sharded as the projections made them. A sharding constraint's transpose gives the cotangent
            # the same sharding, so without this the Ulysses constraint below would hand the projections'
            # backward head-sharded, full-length d_q/d_k/d_v: d_x then is a partial sum at full length,
            # all-reduced over the sequence group (docs/scaling.md, Findings 5) instead of an all-to-all back.
            qkvs[n] = tuple(constrain(t, ("batch", "seq", "act_heads", None)) for t in (q, k, v))
        lengths = [xs[n].shape[1] for n in names]
        q, k, v = (jnp.concatenate([qkvs[n][i] for n in names], axis=1) for i in range(3))
        # Ulysses: tokens arrive sharded over `seq`; attention runs with heads sharded instead.
        q, k, v = (constrain(t, ("batch", None, "act_heads", None)) for t in (q, k, v))
        q, k, v = (jax.ad_checkpoint.checkpoint_name(t, QKV_NAME) for t in (q, k, v))
        out = attention(q, k, v, mask, self.backend, splash_fused_bwd=self.splash_fused_bwd)
        out = jax.ad_checkpoint.checkpoint_name(out, "attention_out")
        out = constrain(out, ("batch", "seq", "act_heads", None))
        outs = jnp.split(out, _split_points(lengths), axis=1)
        new = dict(xs)
        for n, o in zip(names, outs, strict=True):
            new[n] = constrain(getattr(self, n).finish(xs[n], o, mods[n]), ("batch", "seq", "embed"))
        return new


def _split_points(lengths: list[int]) -> list[int]:
    points, acc = [], 0
    for n in lengths[:-1]:
        acc += n
        points.append(acc)
    return points


class MirageDiT(nnx.Module):
    """The Mirage diffusion transformer (see module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = DTYPE[cfg.compute_dtype], DTYPE[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt)
        half = cfg.head_dim // 2
        self.patch_embed = dense(cfg.patch_dim, cfg.video_dim, ("vocab", "embed"), bias=True, **kw)
        self.time_embed = TimestepEmbedder(cfg.time_embed_dim, cfg.video_dim, rngs=rngs)
        self.text_pool = AttentionPool(cfg.text_embed_dim, cfg.video_dim, cfg.pool_heads, rngs=rngs)
        self.caption_proj = dense(cfg.text_embed_dim, cfg.text_dim, ("vocab", "embed"), bias=True, **kw)
        freq_axes = (None, None, None)  # tiny: replicated

        def init_frequencies(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
            if cfg.rope_init == "axial":
                return rope_lib.axial_rope_init(*shape, theta=cfg.rope_theta)
            return rope_lib.mixed_rope_init(key, *shape, theta=cfg.rope_theta)

        self.pos_frequencies = nnx.Param(
            partitioned(init_frequencies, freq_axes)(
                rngs.params(), (3, cfg.num_heads, half), jnp.float32))
        if cfg.use_audio:
            self.audio_proj = dense(cfg.audio_feature_dim, cfg.audio_dim, ("vocab", "embed"), bias=True, **kw)
            # Audio shares the video's time axis: its learned time frequencies start EQUAL to the video's time
            # frequencies, so from step 0 a video query and an audio key interact through their time
            # difference (RoPE's relative property), not through two unrelated rotations that training would
            # first have to align. (Warm start does the same with Mochi's learned frequencies.)
            self.audio_pos_frequencies = nnx.Param(
                partitioned(lambda key, shape, dtype: jnp.copy(self.pos_frequencies[...][0:1]), freq_axes)(
                    rngs.params(), (1, cfg.num_heads, half), jnp.float32))
        n_scan = cfg.num_layers - 1
        self.num_scanned = n_scan
        if n_scan > 0:
            @nnx.split_rngs(splits=n_scan)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r: nnx.Rngs) -> MirageBlock:
                return MirageBlock(cfg, last=False, rngs=r)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = None
        self.last_block = MirageBlock(cfg, last=True, rngs=rngs)
        self.norm_out = dense(cfg.video_dim, 2 * cfg.video_dim, ("embed", "mod"), bias=True, zero=True, **kw)
        self.proj_out = dense(cfg.video_dim, cfg.patch_dim, ("embed", "vocab"), bias=True, **kw)

    # -- token layout -------------------------------------------------------------------------------
    def patchify(self, x: jax.Array) -> jax.Array:
        """(B, T, H, W, C) -> (B, T*h*w, p*p*C), patch vectors ordered (ph, pw, c)."""
        b, t, h, w, c = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent height/width {h}x{w} must be divisible by model.patch_size={p}")
        x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t * (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: jax.Array, t: int, h: int, w: int) -> jax.Array:
        """Inverse of `patchify` for the output channels."""
        p, c = self.cfg.patch_size, self.cfg.latent_channels
        b = x.shape[0]
        x = x.reshape(b, t, h // p, w // p, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, h, w, c)

    def __call__(
        self,
        video: jax.Array,
        timestep: jax.Array,
        text: jax.Array,
        text_mask: jax.Array,
        *,
        audio: jax.Array | None = None,
        audio_mask: jax.Array | None = None,
        ref: jax.Array | None = None,
        ref_time: jax.Array | None = None,
        ref_mask: jax.Array | None = None,
        video_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Velocity (x0 - noise) for noisy latents `video` (B, T, H, W, C), returned in float32."""
        cfg = self.cfg
        dt = DTYPE[cfg.compute_dtype]
        b, t, hh, ww, _ = video.shape
        p = cfg.patch_size
        gh, gw = hh // p, ww // p
        per_frame = gh * gw

        temb = self.time_embed(jnp.broadcast_to(timestep, (b,))) + self.text_pool(text.astype(dt), text_mask)
        xs: dict[str, jax.Array | None] = {"video": None, "audio": None, "text": None}
        ropes: dict[str, Any] = {}
        masks = []

        xv = self.patch_embed(self.patchify(video.astype(dt)))
        pos_v = rope_lib.video_positions(jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32), (b, t)), gh, gw,
                                         cfg.rope_base_height, cfg.rope_base_width)
        vmask = jnp.ones((b, t), bool) if video_mask is None else video_mask.astype(bool)
        masks.append(jnp.repeat(vmask, per_frame, axis=1))
        if ref is not None:
            r = ref.shape[1]
            xr = self.patch_embed(self.patchify(ref.astype(dt)))
            rt = jnp.zeros((b,), jnp.float32) if ref_time is None else ref_time.reshape(b).astype(jnp.float32)
            rtimes = cfg.frame_map.latent_time(rt, jnp)[:, None] + jnp.arange(r, dtype=jnp.float32)[None, :]
            pos_v = jnp.concatenate([pos_v, rope_lib.video_positions(
                rtimes, gh, gw, cfg.rope_base_height, cfg.rope_base_width)], axis=1)
            xv = jnp.concatenate([xv, xr], axis=1)
            rmask = jnp.ones((b,), bool) if ref_mask is None else ref_mask.reshape(b).astype(bool)
            masks.append(jnp.repeat(rmask[:, None], r * per_frame, axis=1))
        xs["video"] = constrain(xv, ("batch", "seq", "embed"))
        ropes["video"] = rope_lib.rope_angles(self.pos_frequencies[...], pos_v)

        if audio is not None:
            if not cfg.use_audio:
                raise ValueError("audio was given but model.use_audio is False (a Mochi-only network)")
            a = audio.shape[1]
            xs["audio"] = constrain(self.audio_proj(audio.astype(dt)), ("batch", "seq", "embed"))
            ropes["audio"] = rope_lib.rope_angles(self.audio_pos_frequencies[...],
                                                  rope_lib.audio_positions(a, cfg.frame_map, b))
            masks.append(jnp.ones((b, a), bool) if audio_mask is None else audio_mask.astype(bool))

        xs["text"] = self.caption_proj(text.astype(dt))
        masks.append(text_mask.astype(bool))
        # joint token order: video(+ref), audio, text — the order StreamLayer outputs are split in
        mask = jnp.concatenate(masks, axis=1)

        xs = self._run_blocks(xs, temb, ropes, mask)

        xv = xs["video"][:, : t * per_frame]
        scale, shift = jnp.split(self.norm_out(jax.nn.silu(temb)), 2, axis=-1)
        h = layer_norm(xv, NORM_EPS) * (1.0 + scale[:, None, :].astype(jnp.float32)) + shift[:, None, :]
        out = self.proj_out(h.astype(dt))
        return self.unpatchify(out, t, hh, ww).astype(jnp.float32)

    def _run_blocks(self, xs, temb, ropes, mask):
        cfg = self.cfg

        def apply(block: MirageBlock, carry):
            return block(carry, temb, ropes, mask)

        if cfg.remat_policy != "none":
            apply = nnx.remat(apply, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)

        if self.blocks is not None:
            if cfg.scan_layers:
                @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                          transform_metadata={nnx.PARTITION_NAME: "layers"})
                def scan_fn(block: MirageBlock, carry):
                    return apply(block, carry)

                xs = scan_fn(self.blocks, xs)
            else:
                graphdef, state = nnx.split(self.blocks)
                for i in range(self.num_scanned):
                    layer = nnx.merge(graphdef, jax.tree.map(lambda v, i=i: v[i], state))
                    xs = apply(layer, xs)
        return apply(self.last_block, xs)
