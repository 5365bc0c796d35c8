"""The runtime's tests' helpers: the fast tiny config, a train-CLI runner, and readers of a run's output.

`configs/tiny.py:fast` shrinks the tiny config further (2 blocks, 4 latent frames) so that a compile takes
seconds on a 2-core CPU; `run_cli` runs `python -m mirage_jax.train` (optionally through launch/local.py)
with a shared persistent compilation cache so repeated runs skip compilation. `load_params` reads a step's
parameters through `mirage_jax.checkpoint_format` (plain Orbax, no mesh), not through the trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAST_CONFIG = "configs/tiny.py:fast"


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in overrides.items()}


def fast_config(**overrides: Any) -> Any:
    """configs/tiny.py:fast with `overrides` ('a__b' keys for nested 'a.b') applied."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    cfg = ConfigFileFlagParser("config", lock_config=False).parse(str(ROOT / FAST_CONFIG))
    for key, v in _dotted(overrides).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def cli_args(workdir: str | os.PathLike, kill_at_step: int | None = None, **overrides: Any) -> list[str]:
    """`python` arguments of the train CLI on configs/tiny.py:fast with `overrides` as --config.a.b=v flags;
    with `kill_at_step`, through tests/kill_at_step.py (SIGKILL after that step)."""
    cli = ["-m", "mirage_jax.train"] if kill_at_step is None else [
        str(ROOT / "tests" / "kill_at_step.py"), str(kill_at_step)]
    args = [*cli, f"--config={FAST_CONFIG}", f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in _dotted(overrides).items()]


def run_cli(workdir: str | os.PathLike, *, processes: int = 1, devices: int = 8, cache_dir: str | None = None,
            extra: Sequence[str] = (), timeout: float = 600, kill_at_step: int | None = None,
            **overrides: Any) -> subprocess.CompletedProcess:
    """Run the train CLI to completion (or until `kill_at_step`: SIGKILL right after that step, its checkpoint
    started); returns the CompletedProcess (stdout+stderr in .stdout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    cmd = [sys.executable, *cli_args(workdir, kill_at_step, **overrides), *extra]
    if processes > 1:
        cmd = [sys.executable, str(ROOT / "launch" / "local.py"), f"--processes={processes}",
               f"--devices-per-process={devices}", "--", *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_at(workdir: str | os.PathLike, step: int) -> float:
    """The last logged loss of `step` (a resumed run may log a step again)."""
    rows = [r for r in read_metrics(workdir) if r["step"] == step]
    if not rows:
        raise KeyError(f"no metrics for step {step} in {workdir}/metrics.jsonl")
    return rows[-1]["loss"]


def load_params(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
    """The saved parameters of a step as numpy (flat 'a/b/c' keys), read on one device without a mesh."""
    from mirage_jax.checkpoint_format import ParamReader, step_dir

    return ParamReader(step_dir(os.fspath(workdir), step)).read_all()
