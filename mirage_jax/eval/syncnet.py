"""SyncNet (Chung & Zisserman 2016, the `syncnet_v2` network of joonson/syncnet_python) in flax.nnx, and its
weight loading.

The network is `SyncNetModel.S` of the reference: two towers that embed a 0.2 s window of audio and of mouth
video in one 1024-d space, where in-sync pairs are close (L2).

- audio tower (`netcnnaud` + `netfcaud`): MFCC window [N, 13, 20, 1] (13 coefficients x 20 MFCC frames of
  10 ms; the reference's [N, 1, 13, 20]) -> [N, 1024];
- lip tower (`netcnnlip` + `netfclip`): 5 frames [N, 5, 224, 224, 3], BGR, uint8 values 0..255 as float, no
  normalisation (the reference's [N, 3, 5, 224, 224] with Conv3d's depth = time) -> [N, 1024].

Layers keep the reference's `nn.Sequential` indices in their names (`netcnnaud.conv0`, `netcnnlip.conv18`,
`netfcaud.fc0`, ...) so a PyTorch state dict maps onto them one to one. Two exact rewrites of the reference's
arithmetic, made when the weights are loaded (`assign`), keep XLA:CPU fast:

- inference BatchNorm folded into the layer before it: BN(Wx + b) = (s W) x + (s (b - mean) + beta) with
  s = gamma / sqrt(var + 1e-5) (PyTorch's eps), per output channel; a model holds only the folded conv / linear
  weights (the BatchNorm layers are gone);
- the lip tower as 2D convolutions: its first Conv3d's kernel depth (5) equals the window's 5 frames and it
  has no temporal padding, so it is a 2D convolution over the frames stacked as 5 x 3 = 15 input channels
  (channel 3 t + c, kernel [O, I, 5, 7, 7] -> [7, 7, 5 I, O]); every later conv and pool has depth 1.

Layout: channels last (NHWC; XLA's CPU/TPU convolutions); kernels transposed on load. The embeddings equal the
reference's up to float32 rounding (tests/test_syncnet.py: within 1e-5 of the largest value).

Weights: the published `syncnet_v2.model` is a PyTorch state dict; `load_weights` reads it with
`torch.load(weights_only=True)` (no other unpickling) or a safetensors file with the same keys. None ship with
the project (PUBLISHED_URL says where they are).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_base.errors import ExitCode, MirageError, root_cause

PUBLISHED_URL = "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"
WHERE = (f"the published weights are {PUBLISHED_URL} (joonson/syncnet_python download_model.sh); "
         "see docs/eval.md")
EMBED_DIM = 1024

# (index in the reference's nn.Sequential, kind, args). conv: (in, out, kernel, stride, padding);
# pool: (kernel, stride, padding). A BatchNorm follows every conv at index + 1, then ReLU.
_AUD = (
    (0, "conv", (1, 64, (3, 3), (1, 1), (1, 1))),
    (3, "pool", ((1, 1), (1, 1), (0, 0))),
    (4, "conv", (64, 192, (3, 3), (1, 1), (1, 1))),
    (7, "pool", ((3, 3), (1, 2), (0, 0))),
    (8, "conv", (192, 384, (3, 3), (1, 1), (1, 1))),
    (11, "conv", (384, 256, (3, 3), (1, 1), (1, 1))),
    (14, "conv", (256, 256, (3, 3), (1, 1), (1, 1))),
    (17, "pool", ((3, 3), (2, 2), (0, 0))),
    (18, "conv", (256, 512, (5, 4), (1, 1), (0, 0))),
)
_LIP = (
    (0, "conv", (3, 96, (5, 7, 7), (1, 2, 2), (0, 0, 0))),
    (3, "pool", ((1, 3, 3), (1, 2, 2), (0, 0, 0))),
    (4, "conv", (96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1))),
    (7, "pool", ((1, 3, 3), (1, 2, 2), (0, 1, 1))),
    (8, "conv", (256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1))),
    (11, "conv", (256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1))),
    (14, "conv", (256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1))),
    (17, "pool", ((1, 3, 3), (1, 2, 2), (0, 0, 0))),
    (18, "conv", (256, 512, (1, 6, 6), (1, 1, 1), (0, 0, 0))),
)


class SyncNetWeightsError(MirageError):
    """The SyncNet weights file is missing, unreadable, or not the published network's state dict (exit 2)."""

    exit_code = ExitCode.REFUSED


def _as_2d(spec: tuple, depth: int) -> tuple:
    """A tower spec with 3D layers (kernel/stride/padding over depth, height, width) on inputs of `depth` frames
    as the equivalent 2D spec: a conv whose kernel depth is the whole input depth (no depth padding) takes the
    frames as depth x in input channels; after it (and for depth-1 layers) depth is 1. ValueError otherwise."""
    out = []
    for idx, kind, args in spec:
        if len(args[0 if kind == "pool" else 2]) == 2:
            out.append((idx, kind, args))
            continue
        if kind == "conv":
            cin, cout, k, s, p = args
            if k[0] != depth or p[0] != 0:
                raise ValueError(f"layer {idx}: kernel depth {k[0]} over {depth} frames is not a 2D convolution")
            out.append((idx, kind, (cin * depth, cout, k[1:], s[1:], p[1:])))
            depth = 1
        else:
            k, s, p = args
            if k[0] != 1 or p[0] != 0:
                raise ValueError(f"layer {idx}: pool over depth is not 2D")
            out.append((idx, kind, (k[1:], s[1:], p[1:])))
    return tuple(out)


class ConvTower(nnx.Module):
    """`netcnnaud` / `netcnnlip` with BatchNorm folded in: conv (+ folded BN) -> ReLU blocks with max pools, as 2D
    layers (`spec`: `_as_2d`), to [N, 512]."""

    def __init__(self, spec: tuple, *, rngs: nnx.Rngs):
        self.spec = spec
        for idx, kind, args in spec:
            if kind == "conv":
                cin, cout, k, s, p = args
                setattr(self, f"conv{idx}", nnx.Conv(cin, cout, k, strides=s, padding=[(x, x) for x in p],
                                                     use_bias=True, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for idx, kind, args in self.spec:
            if kind == "conv":
                x = jax.nn.relu(getattr(self, f"conv{idx}")(x))
            else:
                k, s, p = args
                x = nnx.max_pool(x, k, strides=s, padding=[(a, a) for a in p])
        return x.reshape(x.shape[0], -1)  # spatial size is 1 here: the same as PyTorch's channels-first view


class FcHead(nnx.Module):
    """`netfcaud` / `netfclip`: Linear 512->512 (+ folded BatchNorm1d), ReLU, Linear 512->1024."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc0 = nnx.Linear(512, 512, rngs=rngs)
        self.fc3 = nnx.Linear(512, EMBED_DIM, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(jax.nn.relu(self.fc0(x)))


LIP_FRAMES = 5  # frames per lip window (the first lip conv's kernel depth)


class SyncNet(nnx.Module):
    """The reference's `S` network. `audio(mfcc [N, 13, 20, 1])` and `lip(frames [N, 5, 224, 224, 3] BGR
    0..255)` each give [N, 1024] float32 embeddings."""

    def __init__(self, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.netcnnaud = ConvTower(_AUD, rngs=rngs)
        self.netfcaud = FcHead(rngs=rngs)
        self.netcnnlip = ConvTower(_as_2d(_LIP, LIP_FRAMES), rngs=rngs)
        self.netfclip = FcHead(rngs=rngs)

    def audio(self, mfcc: jax.Array) -> jax.Array:
        return self.netfcaud(self.netcnnaud(mfcc.astype(jnp.float32)))

    def lip(self, frames: jax.Array) -> jax.Array:
        n, t, h, w, c = frames.shape  # frames stacked into channels (3 t + c): the first conv's 2D form
        x = jnp.transpose(frames, (0, 2, 3, 1, 4)).reshape(n, h, w, t * c)
        return self.netfclip(self.netcnnlip(x.astype(jnp.float32)))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The reference state dict's keys (without `num_batches_tracked`) and their PyTorch shapes."""
    out: dict[str, tuple[int, ...]] = {}
    for tower, spec in (("netcnnaud", _AUD), ("netcnnlip", _LIP)):
        for idx, kind, args in spec:
            if kind != "conv":
                continue
            cin, cout, k, _, _ = args
            out[f"{tower}.{idx}.weight"] = (cout, cin, *k)
            out[f"{tower}.{idx}.bias"] = (cout,)
            for name in ("weight", "bias", "running_mean", "running_var"):
                out[f"{tower}.{idx + 1}.{name}"] = (cout,)
    for head in ("netfcaud", "netfclip"):
        out[f"{head}.0.weight"], out[f"{head}.0.bias"] = (512, 512), (512,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{head}.1.{name}"] = (512,)
        out[f"{head}.3.weight"], out[f"{head}.3.bias"] = (EMBED_DIM, 512), (EMBED_DIM,)
    return out


def _names(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def read_state_dict(path: str, flag: str = "--weights") -> dict[str, np.ndarray]:
    """The state dict at `path` as float32 numpy arrays: a `.safetensors` file, else a PyTorch file read with
    `torch.load(weights_only=True)`. `num_batches_tracked` entries are dropped. SyncNetWeightsError (one line
    naming `flag`, the file and where the published weights are) when it is missing or unreadable."""
    if not path:
        raise SyncNetWeightsError(f"{flag}: no SyncNet weights given; {WHERE}")
    if not os.path.isfile(path):
        raise SyncNetWeightsError(f"{flag}={path}: no such file; {WHERE}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            raw: Any = load_file(path)
        else:
            import torch

            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user mistake: not a weights file
        raise SyncNetWeightsError(f"{flag}={path}: not a PyTorch state dict or safetensors file "
                                  f"({root_cause(e)}); {WHERE}") from None
    if not isinstance(raw, Mapping):
        raise SyncNetWeightsError(f"{flag}={path}: holds a {type(raw).__name__}, not a state dict; {WHERE}")
    out = {}
    for k, v in raw.items():
        if str(k).endswith("num_batches_tracked"):
            continue
        try:
            out[str(k)] = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)
        except (TypeError, ValueError):
            raise SyncNetWeightsError(f"{flag}={path}: entry {k!r} is not an array; {WHERE}") from None
    return out


def check_state_dict(state: Mapping[str, np.ndarray], path: str, flag: str = "--weights") -> None:
    """SyncNetWeightsError naming the missing, extra and misshaped keys of `state` against the reference's."""
    want = expected_shapes()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    bad = sorted(f"{k} {tuple(state[k].shape)} (want {want[k]})" for k in set(want) & set(state)
                 if tuple(state[k].shape) != want[k])
    if missing or extra or bad:
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])
        parts += [f"misshaped {_names(bad)}"] if bad else []
        raise SyncNetWeightsError(f"{flag}={path}: not SyncNet's state dict: {'; '.join(parts)}; {WHERE}")


def _set(param: nnx.Variable, value: np.ndarray) -> None:
    param.set_value(jnp.asarray(value, jnp.float32))


def _bn_scale_shift(state: Mapping[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm `prefix` as y = s x + t: s = weight / sqrt(running_var + 1e-5), t = bias - s
    running_mean (float64, folded into the layer before it)."""
    f64 = {k: np.asarray(state[f"{prefix}.{k}"], np.float64) for k in ("weight", "bias", "running_mean",
                                                                         "running_var")}
    s = f64["weight"] / np.sqrt(f64["running_var"] + 1e-5)
    return s, f64["bias"] - s * f64["running_mean"]


def assign(model: SyncNet, state: Mapping[str, np.ndarray]) -> SyncNet:
    """Copy a checked PyTorch state dict into `model`, each BatchNorm folded into the conv / linear before it
    (`_bn_scale_shift`, in float64, then float32): Conv kernels [O, I, *k] -> [*k, I, O] (the lip tower's
    [O, I, kd, kh, kw] -> [kh, kw, kd I, O], see `_as_2d`), Linear [O, I] -> [I, O]. Returns `model`."""
    for tower, spec in (("netcnnaud", _AUD), ("netcnnlip", _LIP)):
        mod = getattr(model, tower)
        for idx, kind, _ in spec:
            if kind != "conv":
                continue
            w = np.asarray(state[f"{tower}.{idx}.weight"], np.float64)
            s, t = _bn_scale_shift(state, f"{tower}.{idx + 1}")
            k = np.transpose(w * s.reshape(-1, *[1] * (w.ndim - 1)), (*range(2, w.ndim), 1, 0))  # [*k, I, O]
            if k.ndim == 5:  # [kd, kh, kw, I, O] -> [kh, kw, kd * I, O]: the frames stacked into channels
                kd, kh, kw, cin, cout = k.shape
                k = np.transpose(k, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * cin, cout)
            conv = getattr(mod, f"conv{idx}")
            _set(conv.kernel, k)
            _set(conv.bias, s * state[f"{tower}.{idx}.bias"] + t)
    for head in ("netfcaud", "netfclip"):
        mod = getattr(model, head)
        s, t = _bn_scale_shift(state, f"{head}.1")
        _set(mod.fc0.kernel, (np.asarray(state[f"{head}.0.weight"], np.float64) * s[:, None]).T)
        _set(mod.fc0.bias, s * state[f"{head}.0.bias"] + t)
        _set(mod.fc3.kernel, state[f"{head}.3.weight"].T)
        _set(mod.fc3.bias, state[f"{head}.3.bias"])
    return model


def load_weights(path: str, flag: str = "--weights") -> SyncNet:
    """SyncNet with the weights at `path` (see read_state_dict / check_state_dict for the one-line errors)."""
    state = read_state_dict(path, flag)
    check_state_dict(state, path, flag)
    return assign(nnx.eval_shape(SyncNet), state)  # abstract init: every value comes from the file
