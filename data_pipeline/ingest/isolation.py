"""Per-source fault isolation: a source that makes any stage raise is reported (source, stage, reason) and kept
out of the output; every other source goes on.

The mechanism, for every prepare stage (ingest and the curation stages alike):

- A stage's per-source work runs inside `isolate(source, stage, produce)`; an `Exception` it raises becomes a
  `Failure(source, stage, reason)` element in the same output stream as the stage's results (one PCollection,
  no tagged outputs: Beam's DaskRunner 2.77 hands every tagged output of a ParDo to every consumer).
- Code deeper down names the step that failed with `with stage("decode"): ...`: the error reaches `isolate`
  as a `StageError` carrying that name, so a probe failure says `probe`, not the DoFn's name.
- A Beam stage over per-source elements is wrapped as `beam.ParDo(Isolated(MyDoFn(), "faces", source_of))`:
  it passes `Failure` elements through untouched and isolates each other element's `process`.
- Results a source produced before it failed may already be downstream: prepare drops every record of a
  failed source when it plans the shards (`prepare._shard_plan`), so a failed source has no record at all.
  The manifest lists each failure as `"<source>: <stage>: <reason>"` in `sources.failed` and counts it in
  `stats` (`failed_sources`, `failed:<stage>`).

`BaseException`s that are not `Exception`s (KeyboardInterrupt, SystemExit, GeneratorExit) are never caught.
"""

from __future__ import annotations

import contextlib
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
    """Wraps a per-source DoFn: `process` of each element runs under `isolate(source_of(element), stage, ...)`;
    Failure elements of earlier stages, and with `accepts` every element that is not an instance of it (prepare's
    stream also carries per_source.SourceReport and ClipRecord elements), pass through unchanged.
    setup/start_bundle/finish_bundle/teardown are forwarded (a setup error is not per-source: it fails the run)."""

    def __init__(self, fn: beam.DoFn, stage_name: str, source_of: Callable[[Any], str],
                 accepts: type | tuple[type, ...] | None = None):
        self.fn, self.stage_name, self.source_of, self.accepts = fn, stage_name, source_of, accepts

    def setup(self) -> None:
        self.fn.setup()

    def start_bundle(self) -> None:
        self.fn.start_bundle()

    def process(self, element: Any) -> Iterator[Any]:
        if isinstance(element, Failure) or (self.accepts is not None and not isinstance(element, self.accepts)):
            yield element
            return
        yield from isolate(self.source_of(element), self.stage_name, lambda: self.fn.process(element) or ())

    def finish_bundle(self) -> None:
        self.fn.finish_bundle()  # a per-source stage emits from process only

    def teardown(self) -> None:
        self.fn.teardown()

