"""JAX parameters -> safetensors shards + index + config.json, tensor by tensor.

The tensor names and layouts are the INVERSE of the naming table in `mirage_jax.interop.mochi` (one table
for warm start and export). Stacked layers are sliced one layer at a time and each output tensor is
written as soon as its shard fills, so memory stays bounded by one shard plus one source leaf. The whole
export is written into `OUT.tmp-*` and renamed into place at the end: a failure leaves no half export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import ml_dtypes
import numpy as np
from etils import epath
from safetensors.numpy import save_file

from mirage_base.errors import ExitCode, MirageError
from mirage_base.safetensors_reader import INDEX_NAME
from mirage_base.storage import is_remote
from mirage_jax.config import ModelConfig
from mirage_jax.interop.mochi import mochi_rows
from mirage_jax.paths import upload_dir

T = TypeVar("T")

Path = tuple[str, ...]
DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16}


class ExportError(MirageError, ValueError):
    """The export cannot be written as asked; the message names the path or tensor."""

    exit_code = ExitCode.REFUSED


def torch_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json: diffusers-Mochi keys plus Mirage's own."""
    return {
        "_class_name": "MirageTransformer", "_mirage_jax_version": "0.1.0",
        "patch_size": cfg.patch_size, "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.num_layers, "pooled_projection_dim": cfg.text_dim, "in_channels": cfg.latent_channels,
        "out_channels": None, "qk_norm": "rms_norm", "text_embed_dim": cfg.text_embed_dim,
        "time_embed_dim": cfg.time_embed_dim, "activation_fn": "swiglu", "max_sequence_length": cfg.max_text_len,
        "video_dim": cfg.video_dim, "audio_dim": cfg.audio_dim, "audio_feature_dim": cfg.audio_feature_dim,
        "time_map": cfg.time_map, "mlp_ratio_video": cfg.mlp_ratio_video,
        "mlp_ratio_text": cfg.mlp_ratio_text, "mlp_ratio_audio": cfg.mlp_ratio_audio, "use_audio": cfg.use_audio,
        "rope_base_height": cfg.rope_base_height, "rope_base_width": cfg.rope_base_width,
        "pool_heads": cfg.pool_heads,
    }


def iter_tensors(get_leaf: Callable[[Path], Any], cfg: ModelConfig):
    """Yield (name, numpy array in torch layout) in table order, reading each leaf (or layer) only as needed."""
    fused: dict[str, dict[int, np.ndarray]] = {}  # a source tensor holding several targets: its parts so far
    cache: dict[Path, Any] = {}

    def layer_of(dst: Path, layer: int | None) -> np.ndarray:
        if dst not in cache:  # at most two leaves in memory: a SwiGLU's up and gate, read layer by layer
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[dst] = get_leaf(dst)
        leaf = cache[dst]
        return np.asarray(leaf if layer is None else leaf[layer], dtype=np.float32)

    rows = mochi_rows(cfg.num_layers, audio=cfg.use_audio)

    def group(dst: Path) -> Path:  # up and gate kernels of one MLP are read together
        return tuple("*" if k in ("up", "gate") else k for k in dst)

    # every leaf's layers consecutively, so a stacked leaf is read once
    order = sorted(range(len(rows)), key=lambda i: (group(rows[i][1]), rows[i][3] or 0, i))
    for i in order:
        name, dst, fn, layer = rows[i]
        value = fn.inverse(layer_of(dst, layer), cfg)
        if fn.parts > 1:  # stacked on the source's rows in part order
            parts = fused.setdefault(name, {})
            parts[fn.part] = value
            if len(parts) == fn.parts:
                del fused[name]
                yield name, np.ascontiguousarray(np.concatenate([parts[k] for k in range(fn.parts)], axis=0))
            continue
        yield name, np.ascontiguousarray(value)


def parse_size(text: str | int) -> int:
    """Bytes of `text` ('2GB', '500MB', '10KB', '123B' or a plain integer; decimal units, as diffusers'
    `max_shard_size`). Raises ExportError naming --max_shard_size for anything else or a size < 1."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    try:
        for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if t.endswith(unit):
                size = int(float(t[: -len(unit)]) * mult)
                break
        else:
            size = int(t)
    except ValueError:
        size = 0
    if size < 1:
        raise ExportError(f"--max_shard_size={text}: expected a positive size such as 2GB, 500MB or 10000000")
    return size


def export_params(get_leaf: Callable[[Path], Any] | Mapping[Path, Any], cfg: ModelConfig, out_dir: str, *,
                  dtype: str = "fp32", max_shard_size: str | int = "2GB", overwrite: bool = False,
                  before_commit: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write the export of parameters given as {path: array} or a path -> array function; returns the index.
    `before_commit` (optional) runs once every tensor is written, before anything is moved into place: an exception
    from it leaves no export (a LoRA export's base check)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype}: use one of {sorted(DTYPES)}")
    getter = get_leaf.__getitem__ if isinstance(get_leaf, Mapping) else get_leaf
    limit = parse_size(max_shard_size)

    def fill(tmp: str) -> dict[str, Any]:
        shards: list[dict[str, np.ndarray]] = [{}]
        sizes = [0]
        written: list[str] = []
        weight_map: dict[str, int] = {}
        total = 0

        def flush() -> None:
            name = f"part-{len(written):05d}.safetensors"
            save_file(shards[-1], os.path.join(tmp, name), metadata={"format": "pt"})
            written.append(name)
            shards[-1] = {}
            sizes[-1] = 0

        for name, value in iter_tensors(getter, cfg):
            arr = np.ascontiguousarray(value.astype(DTYPES[dtype]))  # safetensors writes raw buffers
            if shards[-1] and sizes[-1] + arr.nbytes > limit:
                flush()
            shards[-1][name] = arr
            sizes[-1] += arr.nbytes
            weight_map[name] = len(written)
            total += arr.nbytes
        if shards[-1]:
            flush()
        n = len(written)
        final = {i: f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)}
        for i, name in enumerate(written):
            os.rename(os.path.join(tmp, name), os.path.join(tmp, final[i]))
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**torch_config(cfg), "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}, f,
                      indent=1)
        with open(os.path.join(tmp, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1)
        if before_commit is not None:
            before_commit()
        return index

    return write_folder(out_dir, fill, last=INDEX_NAME, overwrite=overwrite)


def write_folder(out_dir: str, fill: Callable[[str], T], *, last: str, overwrite: bool = False) -> T:
    """Write an export folder whole or not at all; returns what `fill` returns. `fill(tmp)` writes every file
    into an empty temporary folder: locally beside `out_dir`, then renamed into place (an exception from `fill`
    leaves no folder and any earlier export untouched); for gs:// on local disk, then uploaded with the file
    `last` (the index or config a reader opens first) uploaded last. ExportError: `out_dir` exists, is not
    empty, and `overwrite` is off."""
    if is_remote(out_dir):
        dst = epath.Path(out_dir)
        if dst.exists() and any(dst.iterdir()) and not overwrite:
            raise ExportError(f"--out {out_dir}: exists and is not empty; choose a new folder or pass --overwrite")
        with tempfile.TemporaryDirectory(prefix="mirage-export-") as local:
            result = write_folder(os.path.join(local, "out"), fill, last=last)
            upload_dir(os.path.join(local, "out"), out_dir, last=last)
        return result
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--out {out_dir}: exists and is not empty; choose a new folder or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        result = fill(tmp)
        _umask_modes(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask_modes(root: str) -> None:
    """Give `root` (made 0700 by mkdtemp) and its files the modes a plain mkdir / open would (0777 / 0666 less
    the umask), so a serving process running as another user can read the export."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for name in os.listdir(root):
        os.chmod(os.path.join(root, name), 0o666 & ~mask)
