"""The frozen base of a LoRA run: restored from `lora.base`, fingerprinted, checked against a run's checkpoints.

`lora.base` is anything `checkpoint_format.resolve_step_dir` accepts: a Mirage workdir (its newest committed
step), its `checkpoints` folder or one step folder, local or gs://, written on any mesh and process count (a
warm-start output is such a workdir). Only its `params` subtree is read (`checkpoint_format.restore_subtree`,
the one Orbax partial restore) straight into this run's shardings. Its saved model config must define the same
network as this run's (execution fields such as the attention backend may differ).

The fingerprint (`fingerprint`) is a SHA-256 over every leaf's path, shape, dtype and two wrapping uint32 sums of
its raw bits: sum(bits) and sum(bits * w(i)) with w a position weight. Integer sums are exact in any order, so the
same parameters give the same fingerprint on any mesh, process count or host (the export computes it leaf by
leaf on the host); changing or moving any value changes it (w is odd per position, a collision needs two
changes that cancel mod 2^32). Every checkpoint of a LoRA run records it in its `meta` item (`lora_base`), and a
resume against another base is refused naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_base.errors import ExitCode, MirageError
from mirage_jax import checkpoint_format as fmt
from mirage_jax.config import MODEL_EXECUTION_FIELDS, ModelConfig
from mirage_jax.run_config import LoraConfig

META_KEY = "lora_base"  # the key of a LoRA run's checkpoint meta: {"path": step folder, "sha256": fingerprint}


class LoraBaseError(MirageError, ValueError):
    """The LoRA base cannot be used: missing, another network, or not the base the adapters were trained on."""

    exit_code, label = ExitCode.REFUSED, "LORA BASE"


def _leaf_sums(x: jax.Array) -> jax.Array:
    """(2,) uint32: the wrapping sums of x's raw bits and of bits * w(position)."""
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
    w = jnp.ones(x.shape, jnp.uint32)
    for d, prime in zip(range(x.ndim), (2654435761, 2246822519, 3266489917, 668265263), strict=False):
        w = w + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(prime)
    w = w * jnp.uint32(2) + jnp.uint32(1)  # odd: a changed value always changes the weighted sum
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * w, dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree.map(_leaf_sums, tree))  # one program for a whole tree


def _line(name: str, x: Any, sums: jax.Array) -> str:
    s = np.asarray(sums.addressable_data(0))  # replicated: every process holds the value
    return f"{name}|{tuple(x.shape)}|{np.dtype(x.dtype).name}|{int(s[0])}|{int(s[1])}"


def leaf_digest(name: str, x: Any) -> str:
    """One leaf's line of the fingerprint: 'path|shape|dtype|sum|weighted sum' (the export reads leaf by leaf)."""
    return _line(name, x, _tree_sums(x))


def combine_digests(lines: dict[str, str]) -> str:
    """SHA-256 (hex) of the leaf lines in path order."""
    h = hashlib.sha256()
    for name in sorted(lines):
        h.update(lines[name].encode() + b"\n")
    return h.hexdigest()


def fingerprint(params: dict[str, Any]) -> str:
    """The fingerprint of a parameter tree (nested dicts of arrays, sharded or not; see the module docstring)."""
    flat = fmt.flatten(params)
    sums = _tree_sums(flat)
    return combine_digests({"/".join(n): _line("/".join(n), v, sums[n]) for n, v in flat.items()})


def check_same_network(base_model: ModelConfig, model: ModelConfig, where: str) -> None:
    """Raise LoraBaseError naming the fields when the base's model config defines another network."""
    diff = {f.name: (getattr(base_model, f.name), getattr(model, f.name)) for f in dataclasses.fields(model)
            if f.name not in MODEL_EXECUTION_FIELDS and getattr(base_model, f.name) != getattr(model, f.name)}
    if diff:
        raise LoraBaseError(f"lora.base {where} is another network than this run's model: "
                            + ", ".join(f"model.{k}: base {a!r}, this run {b!r}" for k, (a, b) in diff.items())
                            + "; train the adapters with the base's model section")


def check_base(meta: dict[str, Any], sha256: str, base: str, step_dir: str) -> None:
    """Raise LoraBaseError (naming both bases) unless `sha256` is the base fingerprint a LoRA checkpoint's `meta`
    records."""
    saved = meta.get(META_KEY)
    if not isinstance(saved, dict):
        raise LoraBaseError(f"{step_dir}: its meta records no LoRA base (not a LoRA checkpoint); use a new --workdir "
                            "for a LoRA run")
    if saved.get("sha256") != sha256:
        theirs = str(saved.get("sha256"))[:16]
        raise LoraBaseError(
            f"{step_dir}: its adapters were trained on base {saved.get('path')} (sha256 {theirs}), but lora.base is "
            f"{base} (sha256 {sha256[:16]}); set lora.base to the base the adapters were trained "
            "on, or use a new --workdir")


def recorded_base_dir(meta: dict[str, Any]) -> Any | None:
    """The step folder a LoRA checkpoint's `meta` records as its adapters' base, when it still holds a committed
    checkpoint; None when it records none or that step is gone (moved, or deleted by keep_last_n)."""
    saved = meta.get(META_KEY)
    if isinstance(saved, dict) and saved.get("path"):
        try:
            return fmt.resolve_step_dir(str(saved["path"]))
        except MirageError:
            pass
    return None


def trained_base_dir(base: str, meta: dict[str, Any]) -> Any:
    """The step folder a LoRA checkpoint's adapters were trained on, for reading (generate, eval, export): the one
    its `meta` records when that still holds a committed checkpoint (`recorded_base_dir`; `lora.base` may name a
    workdir whose newest step has moved on since: a base trained further), else `lora.base` resolved now. The
    caller still checks the fingerprint (`check_base`). LoraBaseError naming lora.base when neither resolves."""
    recorded = recorded_base_dir(meta)
    if recorded is not None:
        return recorded
    try:  # moved or deleted: the configured base, which the caller checks by its fingerprint
        return fmt.resolve_step_dir(base)
    except MirageError as e:
        raise LoraBaseError(f"lora.base={base}: {str(e).removeprefix('--checkpoint ')}") from None


class BaseWeights:
    """The frozen base parameters of a LoRA run, restored on first use into `abstract`'s shardings.

    `abstract`: nested dicts of `jax.ShapeDtypeStruct`s with shardings (the base subtree of the LoRA model's
    state); `value()` the restored arrays; `identity()` {"path", "sha256"} for the checkpoint meta."""

    def __init__(self, lcfg: LoraConfig, model: ModelConfig, abstract: dict[str, Any]):
        self.lcfg, self.model, self.abstract = lcfg, model, abstract
        self._value: dict[str, Any] | None = None
        self._identity: dict[str, str] | None = None

    def step_dir(self) -> Any:
        try:
            return fmt.resolve_step_dir(self.lcfg.base)
        except MirageError as e:
            raise LoraBaseError(f"lora.base={self.lcfg.base}: {str(e).removeprefix('--checkpoint ')}") from None

    def value(self) -> dict[str, Any]:
        """The base parameters (restored once; LoraBaseError / CheckpointError in one line)."""
        if self._value is None:
            step = self.step_dir()
            saved = fmt.read_config(step)
            if saved.lora.enabled:  # its checkpoints hold adapters only: a partial restore would miss the base
                raise LoraBaseError(
                    f"lora.base={self.lcfg.base}: {step} is a LoRA run (its checkpoints hold adapters only, trained "
                    f"on base {saved.lora.base}); set lora.base to a full run's workdir, such as that base")
            check_same_network(saved.model, self.model, str(step))
            self._value = fmt.restore_subtree(step, {"params": self.abstract})["params"]
            self._identity = {"path": str(step), "sha256": fingerprint(self._value)}
        return self._value

    def identity(self) -> dict[str, str]:
        """{"path": the base's step folder, "sha256": its fingerprint} (restores the base if not done yet)."""
        self.value()
        assert self._identity is not None
        return dict(self._identity)

    def check_resume(self, saved_meta: dict[str, Any], step_dir: Any) -> None:
        """Refuse (one line naming both bases) to resume adapters trained on another base than this run's."""
        mine = self.identity()
        try:
            check_base(saved_meta, mine["sha256"], mine["path"], str(step_dir))
        except LoraBaseError as e:
            raise LoraBaseError(f"refusing to resume {e}") from None
