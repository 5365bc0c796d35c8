"""A diffusers-layout transformer folder opened for slice-by-slice reads.

`--source` is a pipeline folder holding `transformer/`, or that `transformer/` folder itself: a
`config.json` plus safetensors, either one file or shards listed by
`diffusion_pytorch_model.safetensors.index.json`. Every file is validated when opened (safetensors'
own header check catches truncation; the index must name existing files that hold the tensors it
claims); tensors are then read through `numpy.memmap`, so a slice touches only its own bytes and no
process ever holds the whole model (a gs:// source is read through gcsfs, one tensor at a time).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open

from data_pipeline.errors import MirageError
from mirage_jax.paths import is_remote

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# genmo's original single-file checkpoint: fused qkv and swapped scale/shift, not only other names
GENMO_MARKERS = ("blocks.0.attn.qkv_x.weight", "x_embedder.proj.weight", "t5_y_embedder.to_kv.weight")


class SourceError(MirageError, ValueError):
    """The source folder or one of its files is unusable; the message names the file and tensor."""

    exit_code = 2


class TensorSource:
    """Name -> (file, dtype, shape, offset) for every tensor of the source, with slice reads."""

    def __init__(self, root: str | epath.PathLike):
        self.root = resolve_transformer_dir(root)
        cfg_path = self.root / "config.json"
        if not cfg_path.exists():
            raise SourceError(f"{cfg_path}: missing; a diffusers transformer folder has config.json next to "
                              "its safetensors (pass the pipeline folder or its transformer/ folder)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{cfg_path}: not valid JSON ({e})") from e
        self.entries: dict[str, tuple[epath.Path, np.dtype, tuple[int, ...], int]] = {}
        for file, expected in self._files():
            self._index_file(file, expected)
        self._maps: dict[str, np.ndarray] = {}
        if any(m in self.entries for m in GENMO_MARKERS):
            raise SourceError(f"{self.root}: this is genmo's original Mochi layout (fused qkv, swapped "
                              "scale/shift), not only other names; convert it with diffusers' "
                              "scripts/convert_mochi_to_diffusers.py first")

    def _files(self) -> list[tuple[epath.Path, set[str] | None]]:
        index = self.root / INDEX_NAME
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SourceError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
            by_file: dict[str, set[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(fname, set()).add(name)
            for fname in sorted(by_file):
                if not (self.root / fname).exists():
                    raise SourceError(f"{index}: names shard {fname!r} (holding e.g. "
                                      f"{sorted(by_file[fname])[0]!r}), which does not exist in {self.root}")
            return [(self.root / f, names) for f, names in sorted(by_file.items())]
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.root}: no *.safetensors files and no {INDEX_NAME}")
        return [(f, None) for f in files]

    def _index_file(self, path: epath.Path, expected: set[str] | None) -> None:
        if is_remote(path):
            names = self._check_remote(path)
        else:
            try:
                with safe_open(str(path), framework="numpy") as f:  # validates header and coverage
                    names = set(f.keys())
            except (SafetensorError, OSError) as e:
                raise SourceError(f"{path}: unreadable safetensors file ({e}); re-download or re-export it") from e
        if expected is not None and not expected <= names:
            missing = sorted(expected - names)
            raise SourceError(f"{path}: the index says it holds {missing[0]!r} (and {len(missing) - 1} more) "
                              "but it does not")
        n, header = _read_header(path)
        for name, info in header.items():
            if name in self.entries:
                raise SourceError(f"{path}: tensor {name!r} also appears in {self.entries[name][0]}")
            if info["dtype"] not in DTYPES:
                raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start = 8 + n + int(info["data_offsets"][0])
            self.entries[name] = (path, np.dtype(DTYPES[info["dtype"]]), tuple(info["shape"]), start)

    @staticmethod
    def _check_remote(path: epath.Path) -> set[str]:
        """What safe_open checks (it opens local files only): the header parses and the data it describes
        ends exactly at the end of the file (a truncated upload fails here, naming the file)."""
        try:
            n, header = _read_header(path)
        except (ValueError, struct.error) as e:
            raise SourceError(f"{path}: unreadable safetensors file ({e}); re-download or re-export it") from e
        end = 8 + n + max((int(info["data_offsets"][1]) for info in header.values()), default=0)
        size = path.stat().length
        if end != size:
            raise SourceError(f"{path}: unreadable safetensors file (its header describes {end} bytes, the file "
                              f"has {size}); re-download or re-export it")
        return set(header)

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str, index: Iterable[slice] | None = None) -> np.ndarray:
        """tensor[index] as float32 (or its own dtype if not floating), reading only the bytes it needs."""
        if name not in self.entries:
            raise SourceError(f"{self.root}: no tensor named {name!r}")
        path, dtype, shape, start = self.entries[name]
        key = f"{path}:{name}"
        if key not in self._maps and is_remote(path):  # one whole tensor through gcsfs; only the latest is kept
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            self._maps = {key: np.frombuffer(data, dtype=dtype).reshape(shape)}
        if key not in self._maps:
            self._maps[key] = np.memmap(str(path), dtype=dtype, mode="r", offset=start, shape=shape)
        arr = self._maps[key] if index is None else self._maps[key][tuple(index)]
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16:
            return np.asarray(arr, dtype=np.float32)
        return np.asarray(arr)


def _read_header(path: epath.Path) -> tuple[int, dict[str, Any]]:
    """(header length, safetensors header without __metadata__) of a local or gs:// file."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return n, header


def resolve_transformer_dir(root: str | epath.PathLike) -> epath.Path:
    path = epath.Path(root)
    if not path.exists():
        raise SourceError(f"--source {path}: does not exist")
    if (path / "transformer" / "config.json").exists():
        return path / "transformer"
    return path
