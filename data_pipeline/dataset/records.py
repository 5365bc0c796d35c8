"""The record format: one clip = the bytes of a safetensors file (tensors + str metadata).

Keys (the model side depends on them):
    video float32 [T, h, w, c]   audio float32 [A, D_audio]   text float32 [L, D_text]   text_mask uint8 [L]
    ref float32 [1, h, w, c]     ref_time float32 [1]         mouth float32 [A]          mouth_valid uint8 [1]
metadata: clip_id, source, caption, start_frame.

`ref_time` is the reference frame's position in 25 fps video frames relative to the clip start (negative:
before the clip); NaN when the source had no frame outside the clip (then `ref` is zeros).

`encode_record` writes the safetensors layout itself, with keys and metadata in sorted order, because
`safetensors.numpy.save` orders metadata by a per-process hash seed and so is not byte-reproducible;
`safetensors.numpy.load` reads the result (tests/test_data_encoders.py checks this).

A shard (format `mirage_jax.aroll.v2`) stores each record as one zstd frame of those bytes (`compress`), in an
ArrayRecord file written without compression of its own: prepare compresses each clip where it was made, so
the clips cross a cluster's shuffles compressed and the shard writer (one task per shard) only copies bytes.
Shards of format v1 stored the safetensors bytes in ArrayRecord's own zstd chunks; `decode_record` reads both
(a zstd frame starts with its magic number, 28 B5 2F FD, which as a safetensors header length would be
a header of over 4 GB).
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
import zstandard

from mirage_base.errors import MirageError

TENSOR_DTYPES: dict[str, np.dtype] = {
    "video": np.dtype(np.float32),
    "audio": np.dtype(np.float32),
    "text": np.dtype(np.float32),
    "text_mask": np.dtype(np.uint8),
    "ref": np.dtype(np.float32),
    "ref_time": np.dtype(np.float32),
    "mouth": np.dtype(np.float32),
    "mouth_valid": np.dtype(np.uint8),
}
TENSOR_NDIM = {
    "video": 4,
    "audio": 2,
    "text": 2,
    "text_mask": 1,
    "ref": 4,
    "ref_time": 1,
    "mouth": 1,
    "mouth_valid": 1,
}
METADATA_KEYS = ("clip_id", "source", "caption", "start_frame")

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.uint8): "U8",
    np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.float64): "F64",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
ZSTD_LEVEL = 3  # ArrayRecord's default (`zstd:3`), which shards of format v1 used
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878, 3.1.1: a zstd frame's first 4 bytes


class RecordError(MirageError, ValueError):
    """A record is unreadable or breaks the format; the message names the key at fault."""


def validate(tensors: dict[str, np.ndarray], metadata: dict[str, str], where: str = "record") -> None:
    """Raise RecordError naming the key if `tensors`/`metadata` break the record format."""
    missing = sorted(set(TENSOR_DTYPES) - set(tensors))
    if missing:
        raise RecordError(f"{where}: missing tensor key(s) {missing}")
    for k, dt in TENSOR_DTYPES.items():
        a = tensors[k]
        if a.dtype != dt or a.ndim != TENSOR_NDIM[k]:
            raise RecordError(
                f"{where}: tensor {k!r} is {a.dtype} with shape {a.shape}; "
                f"expected {dt} with {TENSOR_NDIM[k]} dims"
            )
    t, a = tensors["video"].shape[0], tensors["audio"].shape[0]
    if tensors["mouth"].shape != (a,):
        raise RecordError(
            f"{where}: 'mouth' has shape {tensors['mouth'].shape}, expected ({a},) like 'audio'"
        )
    if tensors["ref"].shape[1:] != tensors["video"].shape[1:] or tensors["ref"].shape[0] != 1:
        raise RecordError(
            f"{where}: 'ref' shape {tensors['ref'].shape} does not match 'video' "
            f"{tensors['video'].shape} (expected [1, h, w, c])"
        )
    if tensors["text_mask"].shape[0] != tensors["text"].shape[0]:
        raise RecordError(
            f"{where}: 'text_mask' length {tensors['text_mask'].shape[0]} != text length "
            f"{tensors['text'].shape[0]}"
        )
    if t == 0 or a < t:  # the frame-to-latent map itself is the manifest's (mirage_base/time_map.py)
        raise RecordError(f"{where}: {a} audio frames for {t} latent video frames; expected at least one per latent")
    missing_meta = sorted(set(METADATA_KEYS) - set(metadata))
    if missing_meta:
        raise RecordError(f"{where}: missing metadata key(s) {missing_meta}")


def encode_record(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Validated, byte-reproducible safetensors bytes for one clip."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    validate(tensors, metadata, where=f"record {metadata.get('clip_id', '?')}")
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    offset, blobs = 0, []
    for k in sorted(tensors):
        a = tensors[k]
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[k] = {
            "dtype": _ST_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def compress(data: bytes) -> bytes:
    """`data` (a record's safetensors bytes) as one zstd frame at ZSTD_LEVEL, with its content size and a checksum
    of the content (xxh64, RFC 8878 3.1.1) in the frame: a changed byte fails `decode_record`. The same bytes for
    the same input with one zstandard version."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True).compress(data)


def plain_bytes(data: bytes) -> bytes:
    """The safetensors bytes of a stored record: decompressed if it is a zstd frame (`compress`), else as is (format
    v1). RecordError if the frame does not decompress or fails its checksum."""
    if data[:4] != _ZSTD_MAGIC:
        return data
    try:  # streamed: a damaged frame header's content size is never trusted for one allocation
        d = zstandard.ZstdDecompressor().decompressobj()
        out = d.decompress(data)
        if not d.eof:
            raise zstandard.ZstdError("the frame ends early")
        return out
    except zstandard.ZstdError as e:
        raise RecordError(f"a zstd-compressed record that does not decompress ({e})") from e


def tensor_specs(data: bytes) -> dict[str, dict[str, Any]]:
    """{tensor name: {"shape": [...], "dtype": numpy name}} of a stored record, from its safetensors header alone:
    a zstd frame is decompressed only as far as the header. RecordError if the header does not parse."""
    try:
        if data[:4] == _ZSTD_MAGIC:
            with zstandard.ZstdDecompressor().stream_reader(data) as r:
                _, header = _read_header(r)
        else:
            _, header = _read_header(io.BytesIO(data))
        header.pop("__metadata__", None)
        return {k: {"shape": list(v["shape"]), "dtype": str(_NP_DTYPES[v["dtype"]])} for k, v in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, zstandard.ZstdError) as e:
        raise RecordError(f"not a safetensors record header ({type(e).__name__}: {e})") from e


def _read_header(reader: Any) -> tuple[int, dict[str, Any]]:
    """(its byte length, the parsed JSON) of the safetensors header at the start of `reader` (a binary file-like
    object): 8 bytes little-endian u64 N, then N bytes of JSON (the safetensors format). ValueError when the bytes end
    first or are not a JSON object."""
    (n,) = struct.unpack("<Q", _read_exact(reader, 8))
    header = json.loads(_read_exact(reader, n))
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    return n, header


def _read_exact(reader: Any, n: int) -> bytes:
    """`n` bytes from `reader`, in reads of at most 1 MiB: a damaged length field (up to 2**64 - 1) is never one
    read or allocation. ValueError when the bytes end first."""
    out = bytearray()
    while len(out) < n:
        chunk = reader.read(min(n - len(out), 1 << 20))
        if not chunk:
            raise ValueError(f"the record ends after {len(out)} of {n} header bytes")
        out += chunk
    return bytes(out)


def decode_record(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a stored record (safetensors bytes, or one zstd frame of them: `compress`) into (tensors, metadata);
    raises RecordError on any malformation."""
    data = plain_bytes(data)
    try:
        n, header = _read_header(io.BytesIO(data))
        metadata = header.pop("__metadata__", {}) or {}
        body = memoryview(data)[8 + n :]
        tensors = {}
        for k, info in header.items():
            dt = _NP_DTYPES[info["dtype"]]
            start, stop = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            if stop > len(body) or stop - start != count * dt.itemsize:
                raise RecordError(
                    f"tensor {k!r}: data offsets {start}:{stop} do not fit shape {info['shape']} "
                    f"{dt} in a {len(body)}-byte body"
                )
            tensors[k] = (
                np.frombuffer(body[start:stop], dtype=dt.newbyteorder("<")).astype(dt).reshape(info["shape"])
            )
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as e:
        raise RecordError(f"not a safetensors record ({type(e).__name__}: {e})") from e
    validate(tensors, metadata)
    return tensors, metadata
