"""Helpers for the runtime's tests and local drills: a fast tiny config and a CLI runner.

`FAST_OVERRIDES` shrink configs/tiny.py further (2 blocks, 4 latent frames) so that a compile takes
seconds on a 2-core CPU; `run_cli` runs `python -m mirage_jax.train` (optionally through
launch/local.py) with a shared persistent compilation cache so repeated runs skip compilation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

FAST_OVERRIDES = {
    "model.num_layers": 2, "shapes.latent_frames": 4, "shapes.audio_frames": 4, "train.global_batch_size": 8,
    "train.log_every": 1, "optim.warmup_steps": 2, "optim.lr": 1e-3, "checkpoint.save_every": 10,
}


def fast_config(**overrides: Any) -> Any:
    """configs/tiny.py with FAST_OVERRIDES and `overrides` ('a__b' keys for nested 'a.b') applied."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    cfg = ConfigFileFlagParser("config", lock_config=False).parse(str(ROOT / "configs" / "tiny.py"))
    values = dict(FAST_OVERRIDES)
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, v in values.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def cli_args(workdir: str | os.PathLike, kill_at_step: int | None = None, **overrides: Any) -> list[str]:
    """The train CLI's arguments; with `kill_at_step`, through tests/kill_at_step.py (SIGKILL after that step)."""
    values = dict(FAST_OVERRIDES)
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    cli = ["-m", "mirage_jax.train"] if kill_at_step is None else [
        str(ROOT / "tests" / "kill_at_step.py"), str(kill_at_step)]
    args = [*cli, "--config=configs/tiny.py", f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in values.items()]


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
    """The saved parameters of a step as numpy (flat 'a/b/c' keys), read without a mesh."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = Path(workdir) / "checkpoints" / str(step) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(str(path)).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ckptr.restore(str(path), args=ocp.args.PyTreeRestore(restore_args=args))
    flat = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = np.asarray(node)

    walk(tree["params"], "")
    return flat
