"""The one base of every error a user's input can cause, and the exit status a CLI gives it.

Every package raises a subclass (`ConfigError`, `RecordError`, `CheckpointError`, ...); the CLIs run their
`main` through `data_pipeline.cli.run`, which prints such an error as one line (`prog: message`, or the
class's `label`) and exits with its `exit_code` instead of a traceback. It lives in data_pipeline because
data_pipeline must not import mirage_jax, and mirage_jax imports data_pipeline.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MirageError(Exception):
    """A problem the user can fix (the message names the file, record, flag or config field and what to do).

    `exit_code`: the CLI's exit status for it (2: refused input/config, 1: any other failure; see the CLIs'
    docstrings). `label`: the line's prefix; empty means the program's name.
    """

    exit_code: int = 1
    label: str = ""


class ConfigArgError(MirageError):
    """A `--config.a.b=v` override names no field, or a config file's `:argument` is wrong (exit 2). Not a
    ValueError: ml_collections re-raises those from a config file with the traceback inside the message."""

    exit_code = 2
    label = "CONFIG ERROR"


class WorkdirInUseError(MirageError):
    """Another live trainer owns the workdir (mirage_jax/train/ownership.py), or took it over from this one
    (exit 5: nothing is wrong with the input; retry once the owner has stopped or its lease expired)."""

    exit_code = 5
    label = "WORKDIR IN USE"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`; did you mean `x`?` for the closest of `choices` to `name` (difflib), or '' when none is close."""
    hit = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean `{hit[0]}`?" if hit else ""


def root_cause(e: BaseException) -> str:
    """`Type: first line` of the innermost exception of `e`'s chain (`__cause__`, else `__context__`): the reason
    a library wrapped, e.g. tensorstore's 'OUT_OF_RANGE: Error reading ...' inside Orbax's page of spec JSON,
    or the FileNotFoundError inside ml_collections' 'Failed loading config file'."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
