"""One Orbax CheckpointManager per workdir: items `state`, `data`, `config` and `meta`.

- Saves are asynchronous (`checkpoint.async_save`): `save` returns once the arrays are copied off the
  devices; files are written in the background and the step directory appears under its final name only
  when complete (Orbax writes to a temporary name and renames on commit), so a kill mid-save leaves an
  uncommitted temporary directory that is never listed, never restored, and removed at the next start.
- Retention: the newest `keep_last_n` plus every step that is a multiple of `keep_every_k`.
- Arrays are written as OCDBT + zarr2 chunks WITHOUT zstd compression (`ArrayFormat`, `STATE_FORMAT`; see
  docs/runtime.md "Checkpoint performance" for the measurements); reading follows each checkpoint's own metadata,
  so checkpoints written with compression (before issue 20) restore unchanged.
- Restores go through abstract arrays carrying the CURRENT shardings, so a checkpoint written on one mesh
  and process count restores onto any other.
- A restore that fails raises `CheckpointError` naming the step directory; it never falls back to
  a fresh start on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from mirage_base.errors import CheckpointError, ExitCode, MirageError, in_chain, root_cause
from mirage_jax import checkpoint_format
from mirage_jax.paths import orbax_path
from mirage_jax.run_config import CheckpointConfig
from mirage_jax.train import ownership, preemption
from mirage_jax.train.state import TrainState


class DataStateDamagedError(CheckpointError):
    """A checkpoint's `data_state.json` is unreadable or not the JSON a data source wrote; names the file."""


class CheckpointSaveError(MirageError, RuntimeError):
    """A (background) checkpoint save failed; the message names the step directory and the OS error."""

    exit_code, label = ExitCode.SAVE_FAILED, "CHECKPOINT SAVE FAILED"


class DataStateHandler(ocp.CheckpointHandler):
    """Data position as one JSON file (`data_state.json`, written by process 0), readable by any process count.

    The state is a snapshot taken when the step's batch was drawn (the loop prefetches the next batch
    while the device computes, so the live iterator is already one batch ahead at save time). Both sources
    keep a global position (the synthetic source: the step; the Grain loader:
    `data_pipeline.loader.order.DataPosition`), the same on every process. Checkpoints of older versions hold
    one `process_<i>-of-<n>.json` per process: the first is returned and the source decides (a synthetic step
    restores; a per-process Grain iterator state is refused by the loader, saying why).
    """

    FILE = "data_state.json"

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        if jax.process_index() == 0:
            (directory / self.FILE).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        del args
        path = directory / self.FILE
        if not path.exists():
            legacy = sorted(directory.glob("process_*-of-*.json"))
            if not legacy:
                raise FileNotFoundError(f"no data state ({self.FILE}) in {directory}")
            path = legacy[0]
        raw = path.read_bytes()
        try:
            state = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # json's own StopIteration context says nothing
            raise DataStateDamagedError(f"{path}: damaged, not the JSON the data source wrote ({e}; "
                                        f"{len(raw)} bytes)") from None
        if not isinstance(state, dict):
            raise DataStateDamagedError(f"{path}: damaged, holds {type(state).__name__} {str(state)[:60]!r}, not "
                                        "the data source's position (a JSON object)")
        return state

    def metadata(self, directory: epath.Path) -> None:
        del directory
        return None

    def structure(self, directory: epath.Path) -> None:
        del directory
        return None

    def finalize(self, directory: epath.Path) -> None:
        del directory

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


@dataclasses.dataclass(frozen=True)
class ArrayFormat:
    """How the train state's arrays are written (Orbax `PyTreeCheckpointHandler` / tensorstore options).

    Only writing depends on it: a restore reads each checkpoint's own metadata (OCDBT or a file per chunk,
    zarr2 or zarr3, each array's compressor), so a checkpoint written with one ArrayFormat restores with any other.
    - `ocdbt`: one OCDBT database per process (few large data files) instead of a file per array chunk;
    - `zarr3`: zarr v3 chunk metadata (Orbax default: v2);
    - `compression`: zstd on every chunk (level 1 with zarr2, 3 with zarr3; Orbax default: on);
    - `data_file_mib`: OCDBT target data file size in MiB (None: Orbax's, 2 GiB locally, 400 MiB on GCS).
    """

    ocdbt: bool = True
    zarr3: bool = False
    compression: bool = False
    data_file_mib: int | None = None

    def handler(self) -> ocp.StandardCheckpointHandler:
        return StateHandler(self)


LEGACY_FORMAT = ArrayFormat(compression=True)  # Orbax's defaults: what CheckpointStore wrote before issue 20
# zstd costs CPU on every save (random-like float mantissas barely compress: ~8% fewer bytes on disk), so the state
# is written uncompressed (bench/checkpoint.py --compare; docs/runtime.md "Checkpoint performance").
STATE_FORMAT = ArrayFormat()


class StateHandler(ocp.StandardCheckpointHandler):
    """StandardCheckpointHandler (its StandardSave / StandardRestore and validation) writing with `ArrayFormat`.

    The same on-disk format as the standard handler (both wrap a PyTreeCheckpointHandler; only the write options
    differ), so either reads what the other wrote; the step's metadata names this class as the item's handler."""

    def __init__(self, fmt: ArrayFormat):
        super().__init__(use_ocdbt=fmt.ocdbt)
        self._format = fmt
        # orbax-checkpoint 0.12: StandardCheckpointHandler delegates everything to `_impl` and exposes neither
        # compression nor zarr3; tests/test_checkpoint_array_format.py reads the written chunks' compressor back.
        self._impl = ocp.PyTreeCheckpointHandler(
            use_ocdbt=fmt.ocdbt, use_zarr3=fmt.zarr3, use_compression=fmt.compression)

    async def async_save(self, directory: Any, item: Any = None, save_args: Any = None, args: Any = None) -> Any:
        if self._format.data_file_mib is None or args is None:
            return await super().async_save(directory, item, save_args, args)
        item = self._validate_save_state(args.item, save_args=args.save_args)
        return await self._impl.async_save(directory, args=ocp.args.PyTreeSave(
            item=item, save_args=args.save_args, custom_metadata=args.custom_metadata,
            ocdbt_target_data_file_size=self._format.data_file_mib << 20))


@ocp.args.register_with_handler(StateHandler, for_save=True)
@dataclasses.dataclass
class StateSave(ocp.args.StandardSave):
    """StandardSave for `StateHandler` (Orbax maps argument classes to handler classes one to one)."""


@ocp.args.register_with_handler(StateHandler, for_restore=True)
@dataclasses.dataclass
class StateRestore(ocp.args.StandardRestore):
    """StandardRestore for `StateHandler`."""


class _UnretrievedSaveTasks(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' for Orbax's own write tasks. When a background save
    fails (a full disk), every write fragment's task fails; Orbax raises the first and leaves the rest
    unretrieved, and asyncio logs each with its traceback when the task is collected: in the finalize thread, at
    a moment of its own (sometimes before the main thread has seen the failure at all). The failure itself reaches
    the user as one line from `CheckpointStore.save_error` / `wait` (CHECKPOINT SAVE FAILED, exit 4)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Task exception was never retrieved") and "orbax/checkpoint" in msg)


logging.getLogger("asyncio").addFilter(_UnretrievedSaveTasks())


class CheckpointStore:
    """The workdir's checkpoints (WORKDIR/checkpoints/<step>/{state,data,config,meta}).

    `array_format` sets how the state's arrays are written (`STATE_FORMAT`; bench/checkpoint.py compares others)."""

    def __init__(self, workdir: str, ckpt_cfg: CheckpointConfig, *, read_only: bool = False,
                 array_format: ArrayFormat = STATE_FORMAT):
        self.directory = orbax_path(workdir) / checkpoint_format.CHECKPOINTS
        self.last_saved: int | None = None
        self._unchecked = False  # a save was started and its outcome not yet looked at
        self._failed = False  # a save failure was reported: the process is about to exit
        keep: list[ocm.PreservationPolicy] = [ocm.LatestN(ckpt_cfg.keep_last_n)]  # >= 1: run_config checks it
        if ckpt_cfg.keep_every_k > 0:
            keep.append(ocm.EveryNSteps(ckpt_cfg.keep_every_k))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(keep),
            enable_async_checkpointing=ckpt_cfg.async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": array_format.handler(),
                "data": DataStateHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        _quiet_abandoned_write_callbacks()
        _bounded_barriers()
        # Orbax deletes unfinished step directories of earlier runs in a background thread and waits for it only
        # at the first save; wait now, so that once the store exists the workdir holds committed steps only
        # (a rerun after a kill -9 mid-save must not find the torn step still there, even briefly).
        wait_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_cleanup is not None:
            wait_cleanup()
        if not read_only:
            preemption.note_committed(self.directory, self.latest_step())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """The newest COMMITTED step (uncommitted temporary directories are not steps)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: Any, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Start saving `step` (asynchronously when configured); all processes must call it.
        `data_state` is the data iterator's state positioned at batch `step` (JSON-able)."""
        previous, self.last_saved = self.last_saved, step
        self._unchecked = True
        try:
            return self.manager.save(step, force=True, args=ocp.args.Composite(
                state=StateSave(state.as_dict()),
                data=DataStateSave(data_state),
                config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(meta),
            ))
        except Exception as e:  # noqa: BLE001 - Orbax raises a failed background save at the next save
            raise self._save_error(e, previous) from e

    def read_json(self, step: int, item: str) -> dict[str, Any]:
        """The `config` or `meta` item of a step, as saved."""
        try:
            return checkpoint_format.read_item(self.step_dir(step), item)
        except CheckpointError as e:
            raise CheckpointError(f"{e}. Move {self.step_dir(step)} away to resume from the previous "
                                         "checkpoint") from e

    def saved_shapes(self, step: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
        """Path -> (shape, dtype) of every array of the saved train state (from metadata, no data read)."""
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read the state metadata of {self.step_dir(step)}: {e}. "
                                         "Move that directory away to resume from the previous checkpoint") from e
        return checkpoint_format.tree_shapes(meta)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, Any]:
        """(state restored into the shardings of `target` (abstract arrays), the data-iterator state)."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=StateRestore(target.as_dict()), data=DataStateRestore()))
        except Exception as e:  # noqa: BLE001 - re-raised with the step directory
            why = _find_cause(e, DataStateDamagedError) or root_cause(e)
            raise CheckpointError(
                f"restoring {self.step_dir(step)} failed: {why}. The run will NOT start from scratch "
                f"by itself. {_MOVE_AWAY.format(step_dir=self.step_dir(step))} (steps: {self.all_steps()}), or use "
                "a new --workdir to start over.") from e
        return TrainState.from_dict(dict(out["state"])), out["data"]

    def restore_data_state(self, step: int) -> Any:
        """Only the data-iterator state of `step`."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(data=DataStateRestore()))["data"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"restoring the data state of {self.step_dir(step)} failed: "
                f"{_find_cause(e, DataStateDamagedError) or root_cause(e)}. "
                f"{_MOVE_AWAY.format(step_dir=self.step_dir(step))}") from e

    def restore_partial(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """Restore only the leaves of `target` (a sub-tree of the saved state with equal shapes)."""
        try:
            return checkpoint_format.restore_subtree(self.step_dir(step), target)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"partial restore of {self.step_dir(step)} failed: {root_cause(e)}. "
                                         f"{_MOVE_AWAY.format(step_dir=self.step_dir(step))}") from e

    def save_error(self) -> CheckpointSaveError | None:
        """The failure of a background save that has ended since the last call, else None (never blocks)."""
        # Only ever wait for the manager's finalize thread, never call `check_for_errors`: Orbax (0.12) raises a
        # background failure ONCE, to whichever thread asks first. If this (main) thread took it from the async
        # checkpointer, the finalize thread would go on finalizing the failed step and its own secondary error
        # ("cannot schedule new futures after shutdown") could be the one reported. The finalize thread always
        # asks first and keeps what it got; joining it (once the save has ended: never blocks) raises that.
        if not self._unchecked or self.manager.is_saving_in_progress():
            return None
        self._unchecked = False
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - returned as one message
            return self._save_error(e, self.last_saved)
        preemption.note_committed(self.directory, self.last_saved)
        return None

    def _save_error(self, e: BaseException, step: int | None) -> CheckpointSaveError:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # asyncio's other reports as the loops close
        self._failed = True
        os_error = _find_cause(e, OSError)
        m = _TS_WRITE_ERROR.search(str(e))
        if os_error is not None:
            what = f"{os_error.strerror or os_error}" + (f": {os_error.filename}" if os_error.filename else "")
        elif m:  # tensorstore's message: 'Failed writing: "<file>": <what> [os_error_code='N']'
            what = f"{m.group('err').strip()} (errno {m.group('code')}): {m.group('path')}"
        else:
            what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        steps = self.all_steps()
        last = f"the last committed checkpoint is {max(steps)}" if steps else "no checkpoint was committed yet"
        target = self.step_dir(step) if step is not None else self.directory
        other = ownership.intruder()
        if other is not None:  # e.g. a --takeover, whose start removed this run's unfinished step directory
            err = CheckpointSaveError(f"writing checkpoint {target} failed: {what}, because another trainer, "
                                      f"{other}, owns this workdir now (the storage is not at fault); {last}. This "
                                      "run stops; leave the workdir to that run, or stop it and rerun the same "
                                      "command")
        else:
            err = CheckpointSaveError(f"writing checkpoint {target} failed: {what}. {last} (intact, "
                                      "restorable); fix the storage (space, permissions) and rerun the same command")
        err.__cause__ = e
        return err

    def wait(self) -> None:
        """Block until every started save is committed; a failed one raises CheckpointSaveError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - one message
            raise self._save_error(e, self.last_saved) from e
        if error := self.save_error():
            raise error

    def close(self) -> None:
        """Wait for started saves and release Orbax's threads. After a reported save failure it does nothing:
        closing tears down executors that the failed save's callbacks may still use, and their tracebacks would
        bury the one message; the caller exits (nothing is pending, the committed steps are on disk)."""
        if self._failed:
            return
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - a failed save was (or will be) reported by save_error / wait
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            logging.getLogger(__name__).warning("closing the checkpoint manager: %s", first_line)


def _bounded_barriers() -> None:
    """Make Orbax's cross-process barriers (save start, directory creation, commit) wait through the JAX
    coordination service, with a timeout (`multihost.sync_global_processes`: 300 s, or the async save's
    `AsyncOptions.timeout_secs` for the commit barrier), instead of its default of a device collective
    (`multihost_utils.sync_global_devices`), which has no timeout and in which a process cannot even be
    interrupted: a peer that never arrives (killed, or stopped by a signal elsewhere) would hold it forever.
    Orbax 0.12 reads the absl flag `experimental_orbax_use_distributed_barrier` at every barrier."""
    from absl import flags

    if jax.process_count() > 1 and "experimental_orbax_use_distributed_barrier" in flags.FLAGS:
        flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def _quiet_abandoned_write_callbacks() -> None:
    """Once per process: tensorstore callbacks of a write abandoned by a failed save post to the event loop
    that Orbax's save thread ran, after that loop closed; each raises "Event loop is closed" in a tensorstore
    thread and goes to `sys.unraisablehook`, whose default prints a traceback (dozens, burying the one
    CHECKPOINT SAVE FAILED line). Those are counted and logged once at debug level; any other unraisable
    exception still goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_mirage_quiet", False):
        return
    dropped = [0]

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            dropped[0] += 1
            if dropped[0] == 1:
                logging.getLogger(__name__).debug("dropping 'Event loop is closed' errors of abandoned writes")
            return
        previous(unraisable)

    hook._mirage_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


_MOVE_AWAY = "If this checkpoint is damaged, move {step_dir} away to resume from the previous checkpoint"


_TS_WRITE_ERROR = re.compile(r'Failed writing: "(?P<path>[^"]+)": (?P<err>[^\[]+)\[os_error_code=.(?P<code>\d+)')


def _find_cause(e: BaseException | None, kind: type[Exception]) -> Any:
    """The first exception of type `kind` in `e`'s chain of causes and contexts, or None."""
    return in_chain(e, lambda c: isinstance(c, kind))

