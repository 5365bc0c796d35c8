"""What every frozen encoder shares: a name, a version, its parameters, and a spec for the manifest.

An encoder is frozen: its output is a pure function of its input and of `params` (no learned weights,
no randomness at call time), so a manifest's encoder spec is enough to rebuild it exactly (`from_spec`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Manifest entry of one encoder: rebuild it with `data_pipeline.encoders.from_spec(kind, spec)`."""

    name: str
    version: str
    params: dict[str, Any]
    dtype: str
    feature_shape: tuple[int | None, ...]  # output shape per sample; None = depends on the input length

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "params": dict(sorted(self.params.items())),
            "dtype": self.dtype,
            "feature_shape": list(self.feature_shape),
        }


def check_params(kind: str, name: str, given: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Merge `given` over `allowed` defaults; an unknown parameter is an error that lists the known ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(
            f"{kind} encoder {name!r}: unknown parameter(s) {unknown}; it takes {sorted(allowed)}"
        )
    return {**allowed, **given}
