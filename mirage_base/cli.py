"""Shared command-line plumbing for every `python -m ...` entry point of the project.

`run(main, prog)` is the one wrapper: absl's `app.run` with `--a-b` accepted as `--a_b`, and a user's
mistake (any `MirageError`, a typo in a `--config.` override, or an exception type the CLI names) printed
as ONE line to stderr with the error's exit status, never a traceback. `--help` (`-?`, `--helpshort`) prints the
command's docstring and the flags the project's modules define (wherever the CLI defines them), `--helpfull`
every flag, and both exit 0 (absl's own help flags exit 1 and list only the `__main__` module's flags).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from absl import flags

from mirage_base.errors import ConfigArgError, ExitCode, MirageError, root_cause


def _unknown_override(argv: Sequence[str], exc: BaseException) -> ConfigArgError | None:
    """The one-line error for ml_collections' "unknown key" failure while parsing `--config.` overrides."""
    text = str(exc)  # e.g. AttributeError('\'stepz\'\nDid you mean "steps" instead of "stepz"?')
    m = re.search(r"'([\w-]+)\\?'", text)
    if m is None:
        return None
    key = m.group(1)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    for a in argv:
        name, _, _ = a.partition("=")
        parts = name.split(".")
        if name.startswith("--") and len(parts) > 1 and key in parts[1:]:
            section = ".".join(parts[1:parts.index(key, 1)])
            where = f"in `{section}`" if section else "at the top level"
            close = hint.group(1) if hint else None
            return ConfigArgError(
                f"{a}: the config has no field `{key}` {where}"
                + (f"; did you mean `{'.'.join([section, close]).lstrip('.')}`?" if close else ""))
    return None


HELP_ARGS = {"--help": False, "-help": False, "-?": False, "--helpshort": False, "-helpshort": False,
             "--helpfull": True, "-helpfull": True}
PROJECT_PACKAGES = ("mirage_base", "mirage_jax", "data_pipeline", "bench", "tools", "launch", "configs")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def help_text(full: bool = False) -> str:
    """The `__main__` module's docstring, then its flags: with `full` every defined flag (absl's --helpfull),
    else those the project's own modules define (`PROJECT_PACKAGES`, or a file of this repository run as
    `__main__`), grouped by module, so a CLI whose flags live in a library module (aot) lists them too."""
    main = sys.modules.get("__main__")
    doc = ((getattr(main, "__doc__", None) or "").strip()
           or f"USAGE: {os.path.basename(sys.argv[0] if sys.argv else 'prog')} [flags]")
    if full:
        body = flags.FLAGS.get_help()
    else:
        def ours(module: str) -> bool:
            if os.path.isabs(module):
                return os.path.abspath(module).startswith(_ROOT + os.sep)
            return module.split(".")[0] in PROJECT_PACKAGES

        mods = [m for m in flags.FLAGS.flags_by_module_dict() if ours(m)]
        def section(module: str) -> str:  # a file run as __main__ is named by its path in the repository
            text = flags.FLAGS.module_help(module)
            return text.replace(module, os.path.relpath(module, _ROOT), 1) if os.path.isabs(module) else text

        body = "\n".join(section(m) for m in mods) or "(no flags)"
        body += "\n\nTry --helpfull to get a list of all flags (the libraries' too)."
    return f"{doc}\n\nflags:\n{body}\n" if not body.startswith("flags:") else f"{doc}\n\n{body}\n"


def dashed_flags_parser(argv: Sequence[str]) -> list[str]:
    """absl flag parser that maps `--a-b[=v]` to `--a_b[=v]` before `--`; what follows `--` is left alone.
    A `--config.` override naming an unknown field raises ConfigArgError (one line) instead of
    ml_collections' chained AttributeError. `--help` / `--helpfull` before `--` print `help_text` and exit 0."""
    out, passthrough = [argv[0]], False
    for a in argv[1:]:
        if a == "--":
            passthrough = True
        elif not passthrough and a in HELP_ARGS:
            sys.stdout.write(help_text(full=HELP_ARGS[a]))
            sys.stdout.flush()
            sys.exit(0)
        elif not passthrough and a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    sys.argv = list(out)  # ml_collections reads its `--config.` overrides from sys.argv at parse time
    try:
        rest = flags.FLAGS(out)
    except (AttributeError, KeyError) as e:
        err = _unknown_override(out, e)
        if err is None:
            raise
        raise err from None
    except (flags.Error, ValueError, OSError) as e:  # an unknown flag, a bad value, a missing required flag
        raise FlagError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
        try:  # ml_collections defers a config file that failed to load to its first use
            flags.FLAGS.config.keys()
        except OSError as e:
            given = next((a for a in out if a.startswith("--config=")), "--config=")
            path = given.partition("=")[2].partition(":")[0]
            why = root_cause(e) if os.path.isfile(path) else f"no such file {path!r} (relative to {os.getcwd()})"
            raise FlagError(f"{given}: {why}") from None
    return rest


class FlagError(MirageError):
    """A command-line flag that absl or ml_collections cannot parse (unknown, bad value, missing, unreadable
    config file): the parser's own one-line message, exit 2."""

    exit_code = ExitCode.REFUSED


def exit_one_line(prog: str, e: BaseException, code: int, *, label: str = "", hard: bool = False) -> NoReturn:
    """Print `label or prog: message` to stderr and exit with `code`; `hard` skips interpreter shutdown
    (os._exit), so library threads still unwinding a failed write cannot print tracebacks after the line."""
    print(f"{label or prog}: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if hard:
        os._exit(code)
    sys.exit(code)


def run(main: Callable[[list[str]], Any], prog: str, *,
        also: Mapping[type[BaseException], tuple[int, str]] | None = None,
        hard_exit: tuple[type[BaseException], ...] = ()) -> None:
    """`absl.app.run(main)` for the CLI `prog` with dashed flags and one-line errors.

    A `MirageError` exits with its `exit_code` after `label or prog: message`. `also` maps exception types to
    (exit code, label) and wins over the error's own: further types such as FileNotFoundError for a user's path,
    or a CLI's documented status for a whole family (aot: every MirageError is 1, since 2 means "does not fit").
    Errors whose type is in `hard_exit` leave through os._exit (see `exit_one_line`).
    """
    from absl import app

    extra = dict(also or {})
    try:
        app.run(main, flags_parser=dashed_flags_parser)
    except (MirageError, *extra) as e:
        code, label = next((v for k, v in extra.items() if isinstance(e, k)),
                           (getattr(e, "exit_code", 1), getattr(e, "label", "")))
        exit_one_line(prog, e, code, label=label, hard=isinstance(e, hard_exit))
