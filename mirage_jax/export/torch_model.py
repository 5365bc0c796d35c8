"""MirageTransformer: the exported MirageDiT as a pure-PyTorch module for serving.

Parameter names are the naming table's (`mirage_jax/interop/mochi.py`): diffusers' Mochi names plus
Mirage's audio-stream names, so an export loads with `load_state_dict(strict=True)` and its Mochi part
loads into diffusers' `MochiTransformer3DModel`. `forward` takes diffusers' Mochi arguments
(channels-first latents, T5 features + mask, timestep = 1000 * (1 - noise level)) plus optional audio
features / mask and reference latents, and returns the same velocity (x0 - noise) as the JAX model.
Importing this module does not import JAX.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mirage_base.batch_keys import STREAMS
from mirage_base.safetensors_reader import INDEX_NAME, SINGLE_NAME, SafetensorsReader, weight_files
from mirage_base.time_map import TimeMap
from mirage_jax.config import ModelConfig, upgrade_model_fields  # jax-free: SwiGLU width, old config fields

NORM_EPS, QK_EPS = 1e-6, 1e-5


@dataclass
class MirageTransformerOutput:
    sample: torch.Tensor


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def _mod_rms(x: torch.Tensor, scale: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    return (_rms(x, eps) * scale.float()).to(x.dtype)


class _Weight(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class _SwiGLUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden, bias=False)


class _FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn="swiglu", bias=False): names net.0.proj and net.2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([_SwiGLUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](h * F.silu(gate))


class _Linear1(nn.Module):  # MochiLayerNormContinuous: only `linear_1` has parameters
    def __init__(self, din: int, dout: int):
        super().__init__()
        self.linear_1 = nn.Linear(din, dout)


class _Linear(nn.Module):
    def __init__(self, din: int, dout: int):
        super().__init__()
        self.linear = nn.Linear(din, dout)


class _Attention(nn.Module):
    def __init__(self, c: dict[str, Any], last: bool):
        super().__init__()
        a, hd = c["num_attention_heads"] * c["attention_head_dim"], c["attention_head_dim"]
        vd, td, ad = c["video_dim"], c["pooled_projection_dim"], c["audio_dim"]
        self.to_q, self.to_k, self.to_v = (nn.Linear(vd, a, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = _Weight(hd), _Weight(hd)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(td, a, bias=False) for _ in range(3))
        self.norm_added_q, self.norm_added_k = _Weight(hd), _Weight(hd)
        self.to_out = nn.ModuleList([nn.Linear(a, vd)])
        if not last:
            self.to_add_out = nn.Linear(a, td)
        if c["use_audio"]:
            self.add_audio_q_proj, self.add_audio_k_proj, self.add_audio_v_proj = (
                nn.Linear(ad, a, bias=False) for _ in range(3))
            self.norm_audio_q, self.norm_audio_k = _Weight(hd), _Weight(hd)
            if not last:
                self.to_audio_out = nn.Linear(a, ad)


class _Block(nn.Module):
    def __init__(self, c: dict[str, Any], last: bool):
        super().__init__()
        self.last, self.heads, self.hd = last, c["num_attention_heads"], c["attention_head_dim"]
        vd, td, ad = c["video_dim"], c["pooled_projection_dim"], c["audio_dim"]
        self.norm1 = _Linear(vd, 4 * vd)
        self.norm1_context = _Linear1(vd, td) if last else _Linear(vd, 4 * td)
        self.attn1 = _Attention(c, last)
        self.ff = _FeedForward(vd, ModelConfig.mlp_hidden(vd, c["mlp_ratio_video"]))
        if not last:
            self.ff_context = _FeedForward(td, ModelConfig.mlp_hidden(td, c["mlp_ratio_text"]))
        if c["use_audio"]:
            self.norm1_audio = _Linear1(vd, ad) if last else _Linear(vd, 4 * ad)
            if not last:
                self.ff_audio = _FeedForward(ad, ModelConfig.mlp_hidden(ad, c["mlp_ratio_audio"]))

    def _qkv(self, x, c, mod, q, k, v, qn, kn, pre_only):
        mods = mod(F.silu(c)).chunk(1 if pre_only else 4, dim=-1)
        h = _mod_rms(x, 1.0 + mods[0][:, None, :])
        b, s, _ = h.shape

        def split(y):
            return y.view(b, s, self.heads, self.hd)

        qq = (_rms(split(q(h)), QK_EPS) * qn.weight).to(h.dtype)
        kk = (_rms(split(k(h)), QK_EPS) * kn.weight).to(h.dtype)
        return (qq, kk, split(v(h))), mods

    @staticmethod
    def _finish(x, out, mods, o, ff):
        _, gate_msa, scale_mlp, gate_mlp = mods
        x = x + _mod_rms(o(out.flatten(2)), torch.tanh(gate_msa)[:, None, :])
        h = _mod_rms(x, 1.0 + scale_mlp[:, None, :])
        return x + _mod_rms(ff(h), torch.tanh(gate_mlp)[:, None, :])

    def forward(self, xs: dict[str, torch.Tensor | None], c, ropes, mask):
        a = self.attn1
        spec = {
            "video": (self.norm1.linear, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k, False),
            "audio": (getattr(self, "norm1_audio", None) and (self.norm1_audio.linear_1 if self.last
                                                               else self.norm1_audio.linear),
                      getattr(a, "add_audio_q_proj", None), getattr(a, "add_audio_k_proj", None),
                      getattr(a, "add_audio_v_proj", None), getattr(a, "norm_audio_q", None),
                      getattr(a, "norm_audio_k", None), self.last),
            "text": (self.norm1_context.linear_1 if self.last else self.norm1_context.linear, a.add_q_proj,
                     a.add_k_proj, a.add_v_proj, a.norm_added_q, a.norm_added_k, self.last),
        }
        names = [n for n in STREAMS if xs.get(n) is not None]
        qkvs, mods = {}, {}
        for n in names:
            (q, k, v), mods[n] = self._qkv(xs[n], c, *spec[n])
            if n in ropes:
                q, k = _apply_rope(q, *ropes[n]), _apply_rope(k, *ropes[n])
            qkvs[n] = (q, k, v)
        q, k, v = (torch.cat([qkvs[n][i] for n in names], dim=1).transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None, None, :])
        out = (out.transpose(1, 2) * mask[:, :, None, None]).to(v.dtype)
        outs = out.split([xs[n].shape[1] for n in names], dim=1)
        new = dict(xs)
        for n, o in zip(names, outs, strict=True):
            if n == "video":
                new[n] = self._finish(xs[n], o, mods[n], a.to_out[0], self.ff)
            elif not self.last:
                proj, ff = ((a.to_add_out, self.ff_context) if n == "text" else (a.to_audio_out, self.ff_audio))
                new[n] = self._finish(xs[n], o, mods[n], proj, ff)
        return new


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float().unflatten(-1, (-1, 2))
    xe, xo = xf[..., 0], xf[..., 1]
    return torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], dim=-1).flatten(-2).to(x.dtype)


def _rope(freqs: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.einsum("bnd,dhf->bnhf", pos.float(), freqs.float())
    return torch.cos(ang), torch.sin(ang)


def _video_positions(times: torch.Tensor, gh: int, gw: int, bh: int, bw: int) -> torch.Tensor:
    scale = (bh * bw / (gh * gw)) ** 0.5

    def centers(n):
        e = np.linspace(-n * scale / 2, n * scale / 2, n + 1, dtype=np.float32)
        return (e[:-1] + e[1:]) / 2

    hh, ww = np.meshgrid(centers(gh), centers(gw), indexing="ij")
    hw = torch.from_numpy(np.stack([hh, ww], -1).reshape(1, 1, gh * gw, 2)).to(times.device)
    b, t = times.shape
    tt = times.float()[:, :, None, None].expand(b, t, gh * gw, 1)
    return torch.cat([tt, hw.expand(b, t, gh * gw, 2)], dim=-1).reshape(b, t * gh * gw, 3)


class _Module(nn.Module):
    pass


class MirageTransformer(nn.Module):
    """See the module docstring. Build with `from_pretrained(DIR)` on an export of mirage_jax."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        c = upgrade_model_fields(dict(config))  # exports written before time_map: frames_per_latent=K
        c.setdefault("time_map", "uniform:1")
        self.config = c
        self.frame_map = TimeMap.parse(c["time_map"], "config.json time_map")
        p, ch, vd = c["patch_size"], c["in_channels"], c["video_dim"]
        heads, hd, te = c["num_attention_heads"], c["attention_head_dim"], c["text_embed_dim"]
        self.patch_embed = _Module()
        self.patch_embed.proj = nn.Conv2d(ch, vd, kernel_size=p, stride=p)
        self.time_embed = _Module()
        self.time_embed.timestep_embedder = _Module()
        self.time_embed.timestep_embedder.linear_1 = nn.Linear(c["time_embed_dim"], vd)
        self.time_embed.timestep_embedder.linear_2 = nn.Linear(vd, vd)
        self.time_embed.pooler = _Module()
        self.time_embed.pooler.to_kv = nn.Linear(te, 2 * te)
        self.time_embed.pooler.to_q = nn.Linear(te, te)
        self.time_embed.pooler.to_out = nn.Linear(te, vd)
        self.time_embed.caption_proj = nn.Linear(te, c["pooled_projection_dim"])
        self.pos_frequencies = nn.Parameter(torch.zeros(3, heads, hd // 2))
        if c["use_audio"]:
            self.audio_proj = nn.Linear(c["audio_feature_dim"], c["audio_dim"])
            self.audio_pos_frequencies = nn.Parameter(torch.zeros(1, heads, hd // 2))
        n = c["num_layers"]
        self.transformer_blocks = nn.ModuleList([_Block(c, i == n - 1) for i in range(n)])
        self.norm_out = _Linear(vd, 2 * vd)
        self.proj_out = nn.Linear(vd, p * p * ch)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> MirageTransformer:
        """Load config.json + safetensors (one file or shards with the index) written by mirage_jax.export.

        Raises FileNotFoundError if config.json or the weights are missing, SafetensorsError (a ValueError)
        naming the file if the index names a missing shard or a file is unreadable."""
        path = os.fspath(path)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: missing; point from_pretrained at a mirage_jax export folder")
        with open(cfg_path) as f:
            config = json.load(f)
        with torch.device("meta"):
            model = cls(config)
        files = weight_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}; point from_pretrained at a "
                                    "mirage_jax export folder")
        reader = SafetensorsReader(files, framework="pt", device=str(device))
        state = {name: reader.read(name).to(dtype) for name in reader.names()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    # -- forward ----------------------------------------------------------------------------------
    def _temb(self, timestep: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        half = self.config["time_embed_dim"] // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=text.device) / half)
        ang = timestep.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1).to(text.dtype)
        te = self.time_embed.timestep_embedder
        t = te.linear_2(F.silu(te.linear_1(emb)))
        pool = self.time_embed.pooler
        b, n, d = text.shape
        heads = self.config["pool_heads"]
        m = mask.float()[:, :, None]
        pooled = (text.float() * (m / m.sum(1, keepdim=True).clamp(min=1))).sum(1).to(text.dtype)
        seq = torch.cat([pooled[:, None], text], dim=1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=text.device), mask.bool()], dim=1)
        kv = pool.to_kv(seq).view(b, n + 1, 2, heads, d // heads)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        q = pool.to_q(seq[:, 0]).view(b, heads, 1, d // heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]).reshape(b, d)
        return t + pool.to_out(out)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_attention_mask: torch.Tensor, audio_features: torch.Tensor | None = None,
                audio_attention_mask: torch.Tensor | None = None, reference_latents: torch.Tensor | None = None,
                reference_time: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> MirageTransformerOutput | tuple[torch.Tensor]:
        c = self.config
        b, ch, t, h, w = hidden_states.shape
        p = c["patch_size"]
        gh, gw = h // p, w // p
        per_frame = gh * gw
        dev = hidden_states.device
        mask_text = encoder_attention_mask.bool()
        timestep = timestep.expand(b) if timestep.dim() == 1 else timestep.reshape(1).expand(b)
        temb = self._temb(timestep, encoder_hidden_states, mask_text)

        def embed(lat):  # (B, C, T, H, W) -> (B, T*gh*gw, D)
            bt = lat.permute(0, 2, 1, 3, 4).flatten(0, 1)
            return self.patch_embed.proj(bt).flatten(2).transpose(1, 2).unflatten(0, (b, -1)).flatten(1, 2)

        xv = embed(hidden_states)
        times = torch.arange(t, dtype=torch.float32, device=dev)[None].expand(b, t)
        pos = _video_positions(times, gh, gw, c["rope_base_height"], c["rope_base_width"])
        masks = [torch.ones(b, t * per_frame, dtype=torch.bool, device=dev)]
        if reference_latents is not None:
            r = reference_latents.shape[2]
            rt = torch.zeros(b, device=dev) if reference_time is None else reference_time.reshape(b).float()
            rtimes = (self.frame_map.latent_time(rt, torch)[:, None]
                      + torch.arange(r, dtype=torch.float32, device=dev)[None])
            pos = torch.cat([pos, _video_positions(rtimes, gh, gw, c["rope_base_height"], c["rope_base_width"])], 1)
            xv = torch.cat([xv, embed(reference_latents)], dim=1)
            rmask = torch.ones(b, dtype=torch.bool, device=dev) if reference_mask is None else reference_mask.bool()
            masks.append(rmask.reshape(b, 1).expand(b, r * per_frame))
        xs: dict[str, torch.Tensor | None] = {"video": xv, "audio": None, "text": None}
        ropes = {"video": _rope(self.pos_frequencies, pos)}
        if audio_features is not None:
            if not c["use_audio"]:
                raise ValueError("audio_features given, but this export has no audio stream (use_audio=false)")
            a = audio_features.shape[1]
            xs["audio"] = self.audio_proj(audio_features)
            apos = torch.from_numpy(self.frame_map.frame_latent(a)).to(device=dev, dtype=torch.float32)
            ropes["audio"] = _rope(self.audio_pos_frequencies, apos[None, :, None].expand(b, a, 1))
            masks.append(torch.ones(b, a, dtype=torch.bool, device=dev) if audio_attention_mask is None
                         else audio_attention_mask.bool())
        xs["text"] = self.time_embed.caption_proj(encoder_hidden_states)
        masks.append(mask_text)
        mask = torch.cat(masks, dim=1)
        for block in self.transformer_blocks:
            xs = block(xs, temb, ropes, mask)
        xv = xs["video"][:, : t * per_frame]
        scale, shift = self.norm_out.linear(F.silu(temb)).chunk(2, dim=-1)
        hn = F.layer_norm(xv.float(), (xv.shape[-1],), eps=NORM_EPS) * (1 + scale[:, None].float()) + shift[:, None]
        out = self.proj_out(hn.to(xv.dtype))
        out = out.reshape(b, t, gh, gw, p, p, ch).permute(0, 6, 1, 2, 4, 3, 5).reshape(b, ch, t, h, w).float()
        return MirageTransformerOutput(sample=out) if return_dict else (out,)
