"""SyncNet (Chung & Zisserman 2016, the `syncnet_v2` network of joonson/syncnet_python) in flax.nnx, and its
weight loading.

The network is `SyncNetModel.S` of the reference: two towers that embed a 0.2 s window of audio and of mouth
video in one 1024-d space, where in-sync pairs are close (L2).

- audio tower (`netcnnaud` + `netfcaud`): MFCC window [N, 13, 20, 1] (13 coefficients x 20 MFCC frames of
  10 ms; the reference's [N, 1, 13, 20]) -> [N, 1024];
- lip tower (`netcnnlip` + `netfclip`): 5 frames [N, 5, 224, 224, 3], BGR, uint8 values 0..255 as float, no
  normalisation (the reference's [N, 3, 5, 224, 224] with Conv3d's depth = time) -> [N, 1024].

Layers keep the reference's `nn.Sequential` indices in their names (`netcnnaud.conv0`, `netcnnaud.bn1`, ...)
so a PyTorch state dict maps onto them one to one. BatchNorm runs in inference mode (running mean/var,
eps 1e-5, PyTorch's default). Layout: channels last (XLA's CPU/TPU convolutions); kernels transposed on load.

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


class ConvTower(nnx.Module):
    """`netcnnaud` / `netcnnlip`: conv -> BatchNorm (inference) -> ReLU blocks with max pools, to [N, 512]."""

    def __init__(self, spec: tuple, *, rngs: nnx.Rngs):
        self.spec = spec
        for idx, kind, args in spec:
            if kind == "conv":
                cin, cout, k, s, p = args
                setattr(self, f"conv{idx}", nnx.Conv(cin, cout, k, strides=s, padding=[(x, x) for x in p],
                                                     use_bias=True, rngs=rngs))
                setattr(self, f"bn{idx + 1}", nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-5,
                                                            momentum=0.9, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for idx, kind, args in self.spec:
            if kind == "conv":
                x = jax.nn.relu(getattr(self, f"bn{idx + 1}")(getattr(self, f"conv{idx}")(x)))
            else:
                k, s, p = args
                x = nnx.max_pool(x, k, strides=s, padding=[(a, a) for a in p])
        return x.reshape(x.shape[0], -1)  # spatial size is 1 here: the same as PyTorch's channels-first view


class FcHead(nnx.Module):
    """`netfcaud` / `netfclip`: Linear 512->512, BatchNorm1d (inference), ReLU, Linear 512->1024."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc0 = nnx.Linear(512, 512, rngs=rngs)
        self.bn1 = nnx.BatchNorm(512, use_running_average=True, epsilon=1e-5, momentum=0.9, rngs=rngs)
        self.fc3 = nnx.Linear(512, EMBED_DIM, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(jax.nn.relu(self.bn1(self.fc0(x))))


class SyncNet(nnx.Module):
    """The reference's `S` network. `audio(mfcc [N, 13, 20, 1])` and `lip(frames [N, 5, 224, 224, 3] BGR
    0..255)` each give [N, 1024] float32 embeddings."""

    def __init__(self, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.netcnnaud = ConvTower(_AUD, rngs=rngs)
        self.netfcaud = FcHead(rngs=rngs)
        self.netcnnlip = ConvTower(_LIP, rngs=rngs)
        self.netfclip = FcHead(rngs=rngs)

    def audio(self, mfcc: jax.Array) -> jax.Array:
        return self.netfcaud(self.netcnnaud(mfcc.astype(jnp.float32)))

    def lip(self, frames: jax.Array) -> jax.Array:
        return self.netfclip(self.netcnnlip(frames.astype(jnp.float32)))


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


def assign(model: SyncNet, state: Mapping[str, np.ndarray]) -> SyncNet:
    """Copy a checked PyTorch state dict into `model` (Conv kernels [O, I, *k] -> [*k, I, O], Linear [O, I] ->
    [I, O], BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var). Returns `model`."""
    for tower, spec in (("netcnnaud", _AUD), ("netcnnlip", _LIP)):
        mod = getattr(model, tower)
        for idx, kind, _ in spec:
            if kind != "conv":
                continue
            conv, bn = getattr(mod, f"conv{idx}"), getattr(mod, f"bn{idx + 1}")
            w = state[f"{tower}.{idx}.weight"]
            _set(conv.kernel, np.transpose(w, (*range(2, w.ndim), 1, 0)))
            _set(conv.bias, state[f"{tower}.{idx}.bias"])
            _assign_bn(bn, state, f"{tower}.{idx + 1}")
    for head in ("netfcaud", "netfclip"):
        mod = getattr(model, head)
        for i, lin in ((0, mod.fc0), (3, mod.fc3)):
            _set(lin.kernel, state[f"{head}.{i}.weight"].T)
            _set(lin.bias, state[f"{head}.{i}.bias"])
        _assign_bn(mod.bn1, state, f"{head}.1")
    return model


def _assign_bn(bn: nnx.BatchNorm, state: Mapping[str, np.ndarray], prefix: str) -> None:
    _set(bn.scale, state[f"{prefix}.weight"])
    _set(bn.bias, state[f"{prefix}.bias"])
    _set(bn.mean, state[f"{prefix}.running_mean"])
    _set(bn.var, state[f"{prefix}.running_var"])


def load_weights(path: str, flag: str = "--weights") -> SyncNet:
    """SyncNet with the weights at `path` (see read_state_dict / check_state_dict for the one-line errors)."""
    state = read_state_dict(path, flag)
    check_state_dict(state, path, flag)
    return assign(nnx.eval_shape(SyncNet), state)  # abstract init: every value comes from the file
