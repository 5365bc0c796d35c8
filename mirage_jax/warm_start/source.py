"""A diffusers-layout transformer folder opened for slice-by-slice reads.

`--source` is a pipeline folder holding `transformer/`, or that `transformer/` folder itself: a
`config.json` plus safetensors, either one file or shards listed by
`diffusion_pytorch_model.safetensors.index.json`. The files are opened with the one safetensors reader
(`mirage_base.safetensors_reader`): every file is validated when opened (truncation; the index must name
existing files that hold the tensors it claims), and a slice read touches only its own bytes, so no process
ever holds the whole model (a gs:// source is read through gcsfs, one tensor at a time).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from mirage_base.errors import ExitCode, MirageError
from mirage_base.safetensors_reader import INDEX_NAME, SafetensorsError, SafetensorsReader, weight_files

# genmo's original single-file checkpoint: fused qkv and swapped scale/shift, not only other names
GENMO_MARKERS = ("blocks.0.attn.qkv_x.weight", "x_embedder.proj.weight", "t5_y_embedder.to_kv.weight")


class SourceError(MirageError, ValueError):
    """The source folder or one of its files is unusable; the message names the file and tensor."""

    exit_code = ExitCode.REFUSED


class TensorSource(SafetensorsReader):
    """The transformer folder's config.json and tensors; `read` gives float32 (other dtypes as stored)."""

    def __init__(self, root: str | epath.PathLike):
        self.root = resolve_transformer_dir(root)
        cfg_path = self.root / "config.json"
        if not cfg_path.exists():
            check_not_genmo(self.root)  # genmo's dit.safetensors comes without a config.json
            raise SourceError(f"{cfg_path}: missing; a diffusers transformer folder has config.json next to "
                              "its safetensors (pass the pipeline folder or its transformer/ folder)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{cfg_path}: not valid JSON ({e})") from e
        try:
            files = weight_files(self.root)
            if not files:
                raise SourceError(f"{self.root}: no *.safetensors files and no {INDEX_NAME}")
            super().__init__(files)
        except SafetensorsError as e:
            raise SourceError(str(e)) from e
        if any(m in self.entries for m in GENMO_MARKERS):
            raise SourceError(genmo_message(self.root))

    def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
        """tensor[index] as float32 (or its own dtype if not floating), reading only the bytes it needs."""
        arr = np.asarray(super().read(name, index))
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16:
            return np.asarray(arr, dtype=np.float32)
        return arr


def genmo_message(where: epath.Path) -> str:
    return (f"{where}: this is genmo's original Mochi layout (fused qkv, swapped scale/shift), not only other "
            "names; convert it with diffusers' scripts/convert_mochi_to_diffusers.py first")


def check_not_genmo(root: epath.Path) -> None:
    """SourceError when `root` (a folder or one .safetensors file) holds genmo's original single-file layout,
    recognised from its tensor names alone (reads the headers only); otherwise returns."""
    files = [root] if root.is_file() else list(weight_files(root, ("dit.safetensors",)))
    for f in files:
        if not f.name.endswith(".safetensors"):
            continue
        try:
            names = SafetensorsReader([f]).entries
        except SafetensorsError:
            continue  # unreadable: the generic message below names what is missing
        if any(m in names for m in GENMO_MARKERS):
            raise SourceError(genmo_message(f))


def resolve_transformer_dir(root: str | epath.PathLike) -> epath.Path:
    path = epath.Path(root)
    if not path.exists():
        raise SourceError(f"--source {path}: does not exist")
    if (path / "transformer" / "config.json").exists():
        return path / "transformer"
    return path
