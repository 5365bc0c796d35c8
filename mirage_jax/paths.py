"""Filesystem paths for the runtime: local folders and gs:// URLs alike (etils.epath over gcsfs; Orbax over
tensorstore). Which paths are remote, and the gs:// preflight with its one-line errors, are
`mirage_base.storage` (below both packages; importing it also sets gcsfs's listing cache to re-read).
"""

from __future__ import annotations

import os
import uuid
from typing import IO

import fsspec
from etils import epath

from mirage_base.storage import is_remote


def orbax_path(path: str | os.PathLike[str]) -> epath.Path:
    """`path` as an epath: local paths made absolute (Orbax refuses relative ones, and `--workdir=run` /
    `--checkpoint=run` is what people type); URLs such as gs://bucket/run are kept as they are."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


class AppendLog:
    """A text file that grows by appended lines, locally or on GCS (whose objects cannot be appended to).

    Locally: an ordinary file opened in append mode. On GCS: each `flush` uploads the buffered lines as a
    new object and composes it onto the end of the file server-side (GCS compose), so earlier lines (from
    a run that is resumed) are kept and no flush rewrites the whole file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = epath.Path(path)
        self.remote = is_remote(path)
        self._buf: list[str] = []
        self._local: IO[str] | None = None if self.remote else self.path.open("a")

    def write(self, text: str) -> None:
        if self._local is not None:
            self._local.write(text)
        else:
            self._buf.append(text)

    def flush(self) -> None:
        if self._local is not None:
            self._local.flush()
            return
        if not self._buf:
            return
        fs = fsspec.filesystem("gcs")
        target = os.fspath(self.path)
        data = "".join(self._buf).encode()
        if not fs.exists(target):
            fs.pipe(target, data)
        else:
            part = f"{target}.part-{uuid.uuid4().hex}"
            fs.pipe(part, data)
            try:
                fs.merge(target, [target, part])
            finally:
                fs.rm(part)
        self._buf.clear()

    def close(self) -> None:
        self.flush()
        if self._local is not None:
            self._local.close()


def upload_dir(local_dir: str, url: str, *, last: str | None = None) -> None:
    """Copy the files of `local_dir` to the folder `url` (gs://...), the file named `last` after all
    others (a reader that finds it finds the rest complete); files already in `url` that `local_dir`
    lacks are removed afterwards."""
    fs = fsspec.filesystem("gcs")
    dst = epath.Path(url)
    names = sorted(os.listdir(local_dir), key=lambda n: (n == last, n))
    for name in names:  # streamed (resumable upload), never whole in memory
        fs.put_file(os.path.join(local_dir, name), os.fspath(dst / name))
    for stale in (q for q in (dst.iterdir() if dst.exists() else []) if q.name not in names):
        stale.unlink()
