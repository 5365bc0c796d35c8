"""The one safetensors reader: local or gs:// files, one file or shards + index, a tensor or a slice at a time.

Local files are opened with safetensors' own `safe_open` (memory-mapped; opening validates the header and
that the data it describes covers the file exactly, so a truncated download fails there) and read through
`get_slice`, so a slice touches only its own bytes. `safe_open` opens local files only: a remote file
(gs://, any etils.epath URL, read through gcsfs) is checked the same way here (the header parses and its data
ends exactly at the end of the file) and read one whole tensor at a time, the latest one kept. Nothing is
ever unpickled.

Used by the frozen encoders' weight loader (`data_pipeline.encoders.weights`), warm start's Mochi source
(`mirage_jax.warm_start.source`) and the PyTorch export loader (`MirageTransformer.from_pretrained`,
`framework="pt"`). It lives in mirage_base, below both packages; it imports neither JAX nor torch (safetensors
imports torch itself only for `framework="pt"`), and etils/fsspec only when a path is a URL (`_as_path`), so
the PyTorch serving module loads without the storage stack. Local paths are `pathlib.Path`s, URLs
`etils.epath.Path`s.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from mirage_base.errors import ExitCode, MirageError

if TYPE_CHECKING:
    from etils import epath

# diffusers' names for a model's weights: one file, or shards listed by the index
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
# safetensors dtype -> numpy dtype (bf16 through ml_dtypes), for the numpy framework
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

PathLike = str | os.PathLike[str]


class SafetensorsError(MirageError, ValueError):
    """A weights file or index is unusable; the message is one line naming the file (and tensor) (exit 2)."""

    exit_code = ExitCode.REFUSED


def _is_url(path: PathLike) -> bool:
    """True for URLs (gs://bucket/...), as `mirage_base.storage.is_remote` says, without importing fsspec."""
    return "://" in os.fspath(path)


def _as_path(path: PathLike) -> Path | epath.Path:
    """A local path as `pathlib.Path`; a URL as `etils.epath.Path` (imported here, with `mirage_base.storage`,
    which sets gcsfs's listing cache to re-read, only when a URL is read)."""
    if not _is_url(path):
        return Path(os.fspath(path))
    from etils import epath

    import mirage_base.storage  # noqa: F401  (gcsfs listing-cache setting before the first listing)

    return epath.Path(path)


def weight_files(folder: PathLike,
                 preferred: Iterable[str] = (SINGLE_NAME,)) -> dict[Path | epath.Path, set[str] | None]:
    """The safetensors files of a weights folder, each with the tensor names its index says it holds (None
    without an index). For each name in `preferred` (e.g. `model.safetensors`): that file, else the shards
    listed by `NAME.index.json` (`weight_map`: tensor -> file); failing all, every `*.safetensors` in the
    folder; {} if there is none.

    Raises SafetensorsError naming the index if it is not JSON with a `weight_map`, or names a shard that
    does not exist.
    """
    root = _as_path(folder)
    for name in preferred:
        if (root / name).exists():
            return {root / name: None}
        index = root / (name + ".index.json")
        if index.exists():
            return index_files(index)
    return dict.fromkeys(sorted(root.glob("*.safetensors")))


def index_files(index: PathLike) -> dict[Path | epath.Path, set[str]]:
    """{shard path: tensor names} from a safetensors index json (`{"weight_map": {tensor: file}}`), shards
    resolved next to the index and checked to exist (SafetensorsError naming the index and the shard if not)."""
    index = _as_path(index)
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
    by_file: dict[str, set[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, set()).add(name)
    for fname in sorted(by_file):
        if not (index.parent / fname).exists():
            raise SafetensorsError(f"{index}: names shard {fname!r} (holding e.g. {sorted(by_file[fname])[0]!r}), "
                                   f"which does not exist in {index.parent}")
    return {index.parent / f: names for f, names in sorted(by_file.items())}


class SafetensorsReader:
    """Name -> (file, dtype, shape) over one or more safetensors files, with whole-tensor and slice reads.

    `files`: paths, or {path: tensor names it must hold} as `weight_files` / `index_files` return.
    `framework`: "numpy" (arrays in their stored dtype, bf16 as ml_dtypes.bfloat16) or "pt" (torch tensors on
    `device`; local files only). Raises SafetensorsError naming the file when a file is unreadable or
    truncated, lacks a tensor its index promises, repeats a tensor of another file, or (numpy) holds a dtype
    numpy cannot represent.
    """

    def __init__(self, files: Mapping[PathLike, set[str] | None] | Iterable[PathLike], *,
                 framework: str = "numpy", device: str = "cpu"):
        expected = dict(files) if isinstance(files, Mapping) else dict.fromkeys(files)
        self.framework, self.device = framework, device
        self.entries: dict[str, tuple[Any, str, tuple[int, ...], int]] = {}  # file, dtype, shape, offset
        self._handles: dict[Any, Any] = {}
        self._latest: tuple[str, np.ndarray] | None = None  # remote files: the last whole tensor read
        for path, names in expected.items():
            path = _as_path(path)
            if _is_url(path) and framework != "numpy":
                raise SafetensorsError(f"{path}: remote files are read with framework='numpy' only; copy it locally")
            header = self._open_remote(path) if _is_url(path) else self._open_local(path)
            if names is not None and not names <= header.keys():
                missing = sorted(names - header.keys())
                raise SafetensorsError(f"{path}: the index says it holds {missing[0]!r} (and {len(missing) - 1} "
                                       "more) but it does not")
            for name, (dtype, shape, start) in header.items():
                if name in self.entries:
                    raise SafetensorsError(f"{path}: tensor {name!r} also appears in {self.entries[name][0]}")
                if framework == "numpy" and dtype not in DTYPES:
                    raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
                self.entries[name] = (path, dtype, shape, start)

    def _open_local(self, path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
        try:
            f = safe_open(os.fspath(path), framework=self.framework, device=self.device)
            slices = {name: f.get_slice(name) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors file ({e}); re-download or re-export it") from e
        self._handles[path] = f
        return {name: (s.get_dtype(), tuple(s.get_shape()), -1) for name, s in slices.items()}

    @staticmethod
    def _open_remote(path: epath.Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
        """What safe_open checks: the header parses and the data it describes ends exactly at the end of the
        file (a truncated upload fails here, naming the file)."""
        try:
            with path.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header: dict[str, Any] = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            end = 8 + n + max((int(info["data_offsets"][1]) for info in header.values()), default=0)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors file ({e}); re-download or re-export it") from e
        size = path.stat().length
        if end != size:
            raise SafetensorsError(f"{path}: unreadable safetensors file (its header describes {end} bytes, the "
                                   f"file has {size}); re-download or re-export it")
        return {name: (info["dtype"], tuple(info["shape"]), 8 + n + int(info["data_offsets"][0]))
                for name, info in header.items()}

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def file(self, name: str) -> Path | epath.Path:
        """The file holding tensor `name`."""
        return self._entry(name)[0]

    def _entry(self, name: str) -> tuple[Any, str, tuple[int, ...], int]:
        if name not in self.entries:
            files = sorted({str(e[0]) for e in self.entries.values()}) or ["no files"]
            raise SafetensorsError(f"{', '.join(files)}: no tensor named {name!r}")
        return self.entries[name]

    def read(self, name: str, index: Sequence[slice] | None = None) -> Any:
        """tensor[index] (the whole tensor if None) in its stored dtype, as numpy or torch per `framework`.
        Local files read only the bytes the slice covers; a remote file's tensor is fetched whole once."""
        path, dtype, shape, start = self._entry(name)
        if path in self._handles:
            f = self._handles[path]
            return f.get_tensor(name) if not index else f.get_slice(name)[tuple(index)]
        key = f"{path}:{name}"
        if self._latest is None or self._latest[0] != key:
            dt = np.dtype(DTYPES[dtype])
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read(int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
            self._latest = (key, np.frombuffer(data, dtype=dt).reshape(shape))
        arr = self._latest[1]
        return arr if not index else arr[tuple(index)]
