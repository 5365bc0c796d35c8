"""Start or resume: restore the newest committed checkpoint of the workdir, or initialize.

A resume compares the checkpoint's config and state structure with the current ones first. Changes that
leave the state alone (learning rate, steps, batch size, mesh, process count...) are logged and allowed.
A change of the model definition, or any change of the state's structure (shapes, optimizer layout), is
refused with the fields named, unless `--allow_config_change`: then the leaves whose path and shape
match are restored (parameters, EMA, counters) and the others, and the optimizer state, start fresh.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging

from mirage_base.errors import ExitCode, MirageError
from mirage_jax import checkpoint_format as fmt
from mirage_jax.config import MODEL_EXECUTION_FIELDS, upgrade_model_fields
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train.state import StateLayout, TrainState

# model fields that change how the computation runs, not what the parameters mean
EXECUTION_FIELDS = {f"model.{name}" for name in MODEL_EXECUTION_FIELDS}


class ConfigChangeError(MirageError, RuntimeError):
    """The config changed the train state or the model since the checkpoint; names the fields."""

    exit_code, label = ExitCode.REFUSED, "RESUME REFUSED"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; tuples and lists become lists (as JSON stores them)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = _jsonish(v)
    return out


def _jsonish(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_jsonish(x) for x in v]
    return v


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """field -> (saved value, current value) for every field that differs or exists on one side only."""
    a, b = flatten(saved), flatten(current)
    missing = object()
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


def _fmt(diff: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in diff.items())


def check_compatible(store: ckpt_lib.CheckpointStore, step: int, layout: StateLayout, config: dict[str, Any],
                     allow_change: bool) -> bool:
    """Validate resuming `step` under `config`. True when the state structure matches exactly."""
    saved_cfg = store.read_json(step, "config")
    if isinstance(saved_cfg.get("model"), dict):  # a checkpoint from before model.time_map: same model
        saved_cfg = {**saved_cfg, "model": upgrade_model_fields(saved_cfg["model"])}
    diff = {k: v for k, v in config_diff(saved_cfg, config).items() if not k.startswith("checkpoint.")}
    if diff:
        logging.warning("config differs from the one checkpoint %s was written with: %s", step, _fmt(diff))
    model_diff = {k: v for k, v in diff.items() if k.startswith("model.") and k not in EXECUTION_FIELDS}
    saved = store.saved_shapes(step)
    current = fmt.tree_shapes(layout.abstract.as_dict())
    tree_lines = fmt.describe_tree_diff(saved, current)
    if (model_diff or tree_lines) and not allow_change:
        state_fields = {k: v for k, v in diff.items() if k.startswith(("model.", "optim.", "train.clip"))}
        raise ConfigChangeError(
            f"refusing to resume {store.step_dir(step)}: this config changes the model or the train state.\n"
            f"  changed fields: {_fmt(model_diff or state_fields) or '(none in model/optim; see the state)'}\n"
            + "".join(f"  state: {line}\n" for line in tree_lines)
            + "Run with the config the checkpoint was written with (it is saved in "
            f"{store.step_dir(step) / 'config'}), use a new --workdir, or pass --allow_config_change to "
            "restore the parameters that still fit and initialize the rest.")
    if tree_lines:
        logging.warning("--allow_config_change: the state structure changed; restoring matching leaves only:\n%s",
                        "\n".join(tree_lines))
    return not tree_lines


def restore_or_init(store: ckpt_lib.CheckpointStore, layout: StateLayout, config: dict[str, Any],
                    allow_change: bool) -> tuple[TrainState, Any, int | None]:
    """(state, data-iterator state or None, restored step or None). Never starts fresh when a committed
    checkpoint exists but fails to restore."""
    step = store.latest_step()
    if layout.frozen is not None:  # a LoRA run: restore (and check) its base now, not after compiling the step
        layout.frozen.value()
    if step is None:
        return layout.create(), None, None
    exact = check_compatible(store, step, layout, config, allow_change)
    if layout.frozen is not None:  # a LoRA run: the adapters must have been trained on this base
        layout.frozen.check_resume(store.read_json(step, "meta"), store.step_dir(step))
    target = layout.abstract_with_shardings()
    if exact:
        state, data_state = store.restore(step, target)
        return state, data_state, step
    # partial: restore the leaves present with equal shapes, keep fresh values for the rest
    fresh = layout.create()
    saved = store.saved_shapes(step)
    n_leaves = len(jax.tree.leaves(target.as_dict()))
    # params / EMA leaves that still fit, and the counters; the optimizer state restarts
    keep = {names: leaf for names, leaf in fmt.flatten(target.as_dict()).items() if names[0] != "opt_state"
            and saved.get(names, (None,))[0] == tuple(leaf.shape)}
    restored = store.restore_partial(step, fmt.unflatten(keep))
    merged = fmt.replace_leaves(fresh.as_dict(), fmt.flatten(restored))
    logging.warning("restored %d of %d state arrays from %s; the rest are freshly initialized",
                    len(keep), n_leaves, store.step_dir(step))
    return TrainState.from_dict(merged), store.restore_data_state(step), step

