"""Filesystem paths as Orbax needs them."""

from __future__ import annotations

import os

from etils import epath


def orbax_path(path: str | os.PathLike[str]) -> epath.Path:
    """`path` as an epath: local paths made absolute (Orbax refuses relative ones, and `--workdir=run` /
    `--checkpoint=run` is what people type); URLs such as gs://bucket/run are kept as they are."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))
