"""Per-source fault isolation: a source that makes any stage raise is reported (source, stage, reason) and kept
out of the output; every other source goes on.

The mechanism, for every prepare stage (ingest and the curation stages of data_pipeline.curate alike):

- A stage's per-source work runs inside `isolate(source, stage, produce)`; an `Exception` it raises becomes a
  `Failure(source, stage, reason)` element in the same output stream as the stage's results (one PCollection,
  no tagged outputs: Beam's DaskRunner 2.77 hands every tagged output of a ParDo to every consumer).
- Code deeper down names the step that failed with `with stage("decode"): ...`: the error reaches `isolate`
  as a `StageError` carrying that name, so a probe failure says `probe`, not the DoFn's name.
- A per-source DoFn becomes a stage over prepare's batches of sources (lists cut by `prepare.source_batches`)
  as `beam.ParDo(Isolated(MyDoFn(), "curate:faces", source_of))`: each item of a batch goes through the DoFn's
  `process` under `isolate`, a `Failure` item of an earlier stage passes through, and the batch comes out as
  a list again (data_pipeline.curate.stage.add_stages wires the curation stages this way). The batch then
  reaches ingest (`prepare.IngestBatch`), which passes its `Failure` items on into the stream.
- Results a source produced before it failed may already be downstream: prepare drops every record of a
  failed source when it plans the shards (`prepare._shard_plan`), so a failed source has no record at all.
  The manifest lists each failure as `"<source>: <stage>: <reason>"` in `sources.failed` and counts it in
  `stats` (`failed_sources`, `failed:<stage>`).

`BaseException`s that are not `Exception`s (KeyboardInterrupt, SystemExit, GeneratorExit) are never caught.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam

log = logging.getLogger(__name__)


class Failure(NamedTuple):
    """A source kept out of the output: its path (as listed), the stage that raised and why (one line)."""

    source: str
    stage: str
    reason: str

    def line(self) -> str:
        """`"<source>: <stage>: <reason>"`: the manifest's `sources.failed` entry and prepare's FAILED line."""
        return f"{self.source}: {self.stage}: {self.reason}"


class StageError(Exception):
    """An error raised inside `stage(name)`: carries the stage's name; `__cause__` is the original error."""

    def __init__(self, stage_name: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage_name, error


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Names the step the enclosed code belongs to: an Exception raised in it becomes StageError(name). An error
    already named by an inner `stage` keeps its (innermost) name."""
    try:
        yield
    except StageError:
        raise
    except Exception as e:
        raise StageError(name, e) from e


def reason_of(error: BaseException, source: str) -> str:
    """One line for `error`: its message without a leading "<source>: " (the Failure names the source), else its
    type name."""
    msg = " ".join(str(error).split()) or type(error).__name__
    return msg[len(source) + 2 :] if msg.startswith(source + ": ") else msg


def failure_of(error: BaseException, source: str, default_stage: str) -> Failure:
    """The Failure for `error` raised while `default_stage` processed `source` (a StageError names its own stage)."""
    if isinstance(error, StageError):
        return Failure(source, error.stage, reason_of(error.error, source))
    return Failure(source, default_stage, reason_of(error, source))


def isolate(source: str, stage_name: str, produce: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Yields what `produce()` yields; if it raises an Exception, logs a warning and yields one Failure instead of
    raising (what was yielded before stays yielded: prepare drops a failed source's records)."""
    try:
        yield from produce()
    except Exception as e:
        f = failure_of(e, source, stage_name)
        log.warning("skipping source %s (stage %s): %s", f.source, f.stage, f.reason)
        yield f


class Isolated(beam.DoFn):
    """Wraps a per-source DoFn as a stage over batches: an element is a list of per-source items; each item's
    `process` runs under `isolate(source_of(item), stage_name, ...)`, and the stage yields one list, each item
    replaced by what its `process` yielded, or by its one Failure if it raised (anything it yielded before is
    dropped); Failure items of earlier stages pass through unchanged, in place.
    setup/start_bundle/finish_bundle/teardown are forwarded (a setup error is not per-source: it fails the run)."""

    def __init__(self, fn: beam.DoFn, stage_name: str, source_of: Callable[[Any], str]):
        self.fn, self.stage_name, self.source_of = fn, stage_name, source_of

    def setup(self) -> None:
        self.fn.setup()

    def start_bundle(self) -> None:
        self.fn.start_bundle()

    def process(self, batch: list[Any]) -> Iterator[list[Any]]:
        out: list[Any] = []
        for item in batch:
            if isinstance(item, Failure):
                out.append(item)
                continue
            got = list(isolate(self.source_of(item), self.stage_name, functools.partial(self._process, item)))
            failed = [g for g in got if isinstance(g, Failure)]
            out.extend(failed[-1:] or got)
        yield out

    def _process(self, item: Any) -> Iterable[Any]:
        return self.fn.process(item) or ()

    def finish_bundle(self) -> None:
        self.fn.finish_bundle()  # a per-source stage emits from process only

    def teardown(self) -> None:
        self.fn.teardown()
