"""The one base of every error a user's input can cause, and the one table of the exit statuses CLIs give.

Every package raises a subclass (`ConfigError`, `RecordError`, `CheckpointError`, ...); the CLIs run their
`main` through `mirage_base.cli.run`, which prints such an error as one line (`prog: message`, or the
class's `label`) and exits with its `exit_code` instead of a traceback. Every class takes its code from
`ExitCode`, whose meanings `EXIT_MEANINGS` spells out (README.md's exit-status table is checked against both
by tests/test_cli_errors.py). Anything that is not a MirageError is a bug: Python prints its traceback and
exits 1. It lives in mirage_base, the package below both data_pipeline and mirage_jax.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Iterable


class ExitCode(enum.IntEnum):
    """The exit status of every `python -m ...` CLI of the project (`mirage_jax.aot` adds its own 2 = "does not
    fit" and reports every MirageError as 1; see its docstring)."""

    OK = 0
    FAILURE = 1
    REFUSED = 2
    NONFINITE = 3
    SAVE_FAILED = 4
    WORKDIR_IN_USE = 5
    INTERRUPTED = 130  # 128 + SIGINT's number, as a shell reports a process Ctrl-C stopped
    TERMINATED = 143  # 128 + SIGTERM's number: a scheduler's stop, in a tool without a save-and-exit (prepare)


EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done, or preempted (SIGTERM): the newest completed step is saved",
    ExitCode.FAILURE: "a bug or an unexpected failure: Python's traceback is printed",
    ExitCode.REFUSED: "refused input: a flag, config field, data, storage URL or checkpoint that cannot be used "
                      "(one line names it and what to do)",
    ExitCode.NONFINITE: "training stopped after too many consecutive non-finite steps",
    ExitCode.SAVE_FAILED: "an output could not be written (a checkpoint, shards): what was committed before stays "
                          "usable",
    ExitCode.WORKDIR_IN_USE: "another live trainer owns the workdir (or took it over): nothing is wrong with the "
                             "input; retry once that owner has stopped or its lease expired, or use --takeover",
    ExitCode.INTERRUPTED: "stopped by Ctrl-C (SIGINT) before it finished: nothing half-written is left (no "
                          "manifest names a partial output); rerun the same command",
    ExitCode.TERMINATED: "prepare stopped by SIGTERM (a scheduler's or `kill`'s stop) before it finished: as for "
                         "Ctrl-C, its Dask cluster is stopped and nothing half-written is left; rerun the same "
                         "command (train saves and exits 0 instead)",
}


class MirageError(Exception):
    """A problem the user can fix (the message names the file, record, flag or config field and what to do).

    `exit_code`: the CLI's exit status for it, from `ExitCode` (REFUSED unless the class says otherwise).
    `label`: the line's prefix; empty means the program's name.
    """

    exit_code: int = ExitCode.REFUSED
    label: str = ""


class ConfigArgError(MirageError):
    """A `--config.a.b=v` override names no field, or a config file's `:argument` is wrong (exit 2). Not a
    ValueError: ml_collections re-raises those from a config file with the traceback inside the message."""

    exit_code = ExitCode.REFUSED
    label = "CONFIG ERROR"


class CheckpointError(MirageError, ValueError):
    """A checkpoint that cannot be used: missing, not committed, damaged (a file or chunk unreadable) or saved
    with a config this version cannot read. The message names the step folder and what to do (move it away,
    or name another step). The same class and code for train's resume, export, generate, eval and warm start."""

    exit_code = ExitCode.REFUSED
    label = "CHECKPOINT ERROR"


class InputError(MirageError, ValueError):
    """A user's input (a path, a source file, a flag's value) that a tool cannot use; the message names it."""

    exit_code = ExitCode.REFUSED


class Interrupted(MirageError):
    """Ctrl-C (SIGINT) stopped a tool that has no save-and-exit of its own (prepare; train treats SIGINT as a
    preemption instead): what it started is stopped and its temporary files removed; the message says what is
    left (exit 130)."""

    exit_code = ExitCode.INTERRUPTED


class Terminated(Interrupted):
    """SIGTERM stopped prepare (a batch scheduler's stop, `kill`, `timeout`): handled as Ctrl-C (exit 143)."""

    exit_code = ExitCode.TERMINATED


class WorkdirInUseError(MirageError):
    """Another live trainer owns the workdir (mirage_jax/train/ownership.py), or took it over from this one
    (exit 5: nothing is wrong with the input; retry once the owner has stopped or its lease expired)."""

    exit_code = ExitCode.WORKDIR_IN_USE
    label = "WORKDIR IN USE"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`; did you mean `x`?` for the closest of `choices` to `name` (difflib), or '' when none is close."""
    hit = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean `{hit[0]}`?" if hit else ""


def in_chain(e: BaseException | None, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception of `e`'s chain (`e`, then `__cause__`, else `__context__`) that `match`es, or None:
    the error a library re-raised under its own (Beam's RuntimeError "... [while running 'Ingest']" around a
    DoFn's OSError or KeyboardInterrupt, Orbax's around tensorstore's)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if match(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def root_cause(e: BaseException) -> str:
    """`Type: first line` of the innermost exception of `e`'s chain (`__cause__`, else `__context__`): the reason
    a library wrapped, e.g. tensorstore's 'OUT_OF_RANGE: Error reading ...' inside Orbax's page of spec JSON,
    or the FileNotFoundError inside ml_collections' 'Failed loading config file'."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
