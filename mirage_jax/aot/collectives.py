"""The collectives of a compiled (partitioned, per-device) HLO program, read from its text.

`python -m mirage_jax.aot` prints, per kind, how many collective ops the program has and its largest one:
a full-sequence tensor in an all-reduce is the signature of a layout the backward did not leave
(docs/scaling.md, Findings 5). Counts are of ops in the program text: a loop body's ops count once, not once
per trip.
"""

from __future__ import annotations

import re
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes per element of HLO's primitive types (xla/xla_data.proto PrimitiveType).
ITEMSIZE = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
            "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = <type> <op>(` where <type> is one array type or a tuple of them; `-start` ops are the async halves.
_OP = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")


def collective_summary(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Kind -> {"ops": count, "largest_bytes": bytes, "largest": "bf16[1,75600,3072]"} for every collective kind
    present in `hlo_text` (`compiled.as_text()`). A tuple-shaped op counts its largest element."""
    out: dict[str, dict[str, Any]] = {}
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        kind = m.group(2)
        entry = out.setdefault(kind, {"ops": 0, "largest_bytes": 0, "largest": ""})
        entry["ops"] += 1
        for dtype, dims in _ARRAY.findall(m.group(1)):
            if dtype not in ITEMSIZE:
                continue
            n = ITEMSIZE[dtype]
            for d in filter(None, dims.split(",")):
                n *= int(d)
            if n > entry["largest_bytes"]:
                entry["largest_bytes"], entry["largest"] = n, f"{dtype}[{dims}]"
    return out
