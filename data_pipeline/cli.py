"""Shared command-line plumbing: accept `--clip-seconds` as well as `--clip_seconds`."""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags


def dashed_flags_parser(argv: Sequence[str]) -> list[str]:
    """absl flag parser that maps `--a-b[=v]` to `--a_b[=v]` before `--`; what follows `--` is left alone."""
    out, passthrough = [argv[0]], False
    for a in argv[1:]:
        if a == "--":
            passthrough = True
        elif not passthrough and a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return flags.FLAGS(out)
