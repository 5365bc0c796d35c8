"""Facts about the host this process runs on, shared by the pipeline and the benchmarks."""

from __future__ import annotations

import os


def cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else `os.cpu_count()`)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
