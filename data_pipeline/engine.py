"""Which Beam runner executes prepare's pipeline, and the lifetime of what it needs (a Dask cluster).

- `local` (default): Beam's FnApiRunner in this process.
- `dask`: Beam's DaskRunner (apache_beam.runners.dask) on a dask.distributed cluster. Without an address, a
  LocalCluster of `workers` worker processes (one thread each) is started here and stopped when the run ends,
  fails or is interrupted (Ctrl-C); with `dask_address` (or Beam's `--dask_client_address` after `--`) the run
  joins that cluster, whose workers must import this repository's `data_pipeline` and read the input and output.
- any other name (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, PortableRunner): passed to Beam with
  the extra Beam flags.

What the DaskRunner of apache-beam 2.77 does not do (read in its source, and checked by tests/test_data_dask.py),
and how prepare's pipeline stays correct on it:
- its ParDo keeps one output list per transform, shared by every bundle that gets the same deserialized
  arguments (the tasks run by worker threads of one process: seen with an in-process cluster), never
  cleared: a bundle returns earlier bundles' outputs again (duplicate records) -> `_dask_runner()` below
  translates ParDo with `_bundle`, which gives each bundle its own DoFn copy and receivers (and also keeps
  what `finish_bundle` emits);
- it computes only the last transform applied; a side input's producer is recomputed inside every task that
  reads it -> prepare has one sink and no side inputs (joins are GroupByKey / CoGroupByKey);
- a multi-output ParDo hands every tagged output to every consumer -> stages emit one stream of typed elements
  (ingest.isolation), consumers filter by type;
- what `finish_bundle` emits is dropped (so BatchElements loses its last batch) -> fixed by `_bundle`, and
  prepare batches sources in the launcher anyway (deterministic, sized for the workers);
- `Create` makes partitions of 128 elements, `Reshuffle` is a no-op -> prepare passes
  `--dask_partition_size=1` (one batch of sources per partition, unless `--dask_npartitions`/
  `--dask_partition_size` is given after `--`);
- its GroupByKey is `Bag.groupby`, a task shuffle of n**2 pieces for n input partitions, and every Flatten adds
  its inputs' partitions: a run of 8 sources made ~1,500 tasks of a few records, dispatched one by one by the
  scheduler, so 2 workers took as long as 1 -> `_dask_runner()` concatenates a GroupByKey's input into at most
  one partition per worker first (at most workers**2 pieces per shuffle);
- `setup`/`teardown` run around every bundle -> models are loaded through `ingest.per_worker.load_once`;
- the Client it creates is never closed -> closed here after the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from mirage_base.errors import InputError
from mirage_base.host import cores

log = logging.getLogger(__name__)

_ADDRESS_ARGS = ("--dask_client_address", "--dask_address")
_PARTITION_ARGS = ("--dask_npartitions", "--dask_partition_size")


@dataclasses.dataclass
class Engine:
    """A runner ready to run a pipeline: Beam's `runner` argument, its options, how many work items it runs at
    once (`parallelism`, for sizing batches; None: unknown) and whether it runs in this process."""

    runner: Any
    options: PipelineOptions
    parallelism: int | None
    in_process: bool
    description: str


def _arg_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    for i, a in enumerate(args):
        for n in names:
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
            if a == n and i + 1 < len(args):
                return args[i + 1]
    return None


def _without(args: Sequence[str], names: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not any(a.startswith(n + "=") for n in names):
            out.append(a)
    return out


@contextlib.contextmanager
def open_engine(
    runner: str, beam_args: Sequence[str] = (), *, workers: int = 2, dask_address: str | None = None
) -> Iterator[Engine]:
    """The Engine for `runner`; for `dask` without an address, a LocalCluster of `workers` processes that lives
    exactly as long as the `with` block (stopped on error and KeyboardInterrupt too)."""
    if runner == "local":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        yield Engine(FnApiRunner(), PipelineOptions(list(beam_args)), 1, True, "local (FnApiRunner, this process)")
        return
    if runner != "dask":
        yield Engine(runner, PipelineOptions(["--runner", runner, *beam_args]), None, False, runner)
        return
    address = dask_address or _arg_value(beam_args, _ADDRESS_ARGS)
    args = _without(beam_args, _ADDRESS_ARGS)
    if _arg_value(args, _PARTITION_ARGS) is None:
        args.append("--dask_partition_size=1")
    if address:
        threads = _cluster_threads(address)
        opts = PipelineOptions([*args, f"--dask_client_address={address}"])
        yield Engine(_dask_runner(threads), opts, threads, False, f"dask cluster {address} ({threads} worker threads)")
        return
    if workers < 1:
        raise InputError(f"--workers={workers}: a local Dask cluster needs at least 1 worker process")
    from dask.distributed import LocalCluster

    # the worker processes read their log levels from the environment when they import distributed
    os.environ.setdefault(_WORKER_LOG_ENV, "warning")
    cluster = None
    try:
        with _sigint_held():  # its processes start with SIGINT blocked: the Ctrl-C is the launcher's
            spawned = len(multiprocessing.active_children())
            cluster = LocalCluster(
                n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.WARNING, preload=[__name__],  # dask_setup below runs in each worker
                env={THREADS_ENV: os.environ.get(THREADS_ENV) or str(max(1, cores() // workers)), _OWN_ENV: "1"},
            )
            cluster.scale(workers)
            deadline = time.monotonic() + SPAWN_WAIT_S  # until the worker processes exist (not until they run)
            while len(multiprocessing.active_children()) < spawned + workers and time.monotonic() < deadline:
                time.sleep(0.01)
        while True:  # their start-up (seconds of imports); in short waits, so a Ctrl-C stops the run at once
            try:
                cluster.wait_for_workers(workers, timeout=0.5)
                break
            except TimeoutError:
                continue
        opts = PipelineOptions([*args, f"--dask_client_address={cluster.scheduler_address}"])
        yield Engine(_dask_runner(workers), opts, workers, False, f"dask LocalCluster ({workers} worker processes)")
    finally:
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT held while the block runs: the processes created meanwhile (a Dask cluster's workers) never see a
    Ctrl-C of their own, and one pressed in that moment stops this process right after the block instead of
    being lost.

    How: the calling (main) thread blocks SIGINT (`pthread_sigmask`), so the threads started in the block (Dask's
    IO loop, which starts the worker processes from threads of its own) and the processes they start inherit
    the blocked mask: a child keeps it through multiprocessing's 'spawn' (fork and exec reset handlers, not the
    mask), so a Ctrl-C to the process group stays pending in a worker, undelivered, while it imports (no
    KeyboardInterrupt traceback), until the worker preload (`dask_setup`) sets SIG_IGN, which discards it.
    multiprocessing's resource tracker is started first: starting it unblocks SIGINT in the thread that does,
    which would then start a worker with SIGINT deliverable. Ignoring SIGINT instead (SIG_IGN, which children
    inherit too) lost a Ctrl-C pressed in the block: the kernel discards an ignored signal. Meanwhile SIGINT's
    handler here only records it (a thread older than the block, SIGINT unblocked, may take the signal).
    On the way out the previous handler is restored first, then the mask: a SIGINT held pending is delivered
    then, to that handler (KeyboardInterrupt by default), and a recorded one is raised again
    (`signal.raise_signal`). A process started in the block by a thread older than the block is not covered
    (LocalCluster starts a new IO loop thread). Off the main thread, where Python cannot set handlers,
    nothing is changed."""
    import signal
    from multiprocessing import resource_tracker

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the caller's, restored as it was
    resource_tracker.ensure_running()  # its start leaves SIGINT unblocked in this thread: done before blocking
    pressed: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGINT held pending reaches `before` here
        if pressed:
            signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def _sigint_recorded() -> Iterator[list[int]]:
    """Within the block, a SIGINT raises KeyboardInterrupt as by default and is also appended to the yielded list,
    so a caller polling it sees a Ctrl-C whose exception was swallowed; the previous handler is restored after.
    Off the main thread, where Python cannot set handlers, the list stays empty."""
    import signal

    pressed: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def record(signum: int, frame: Any) -> None:
        pressed.append(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, record)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, before)


def _bundle(items: Iterable[Any], fn_bytes: bytes, label: str, window_fn: Any, side_inputs: Any, args: list[Any],
            kwargs: dict[str, Any]) -> list[Any]:
    """One Dask partition through a DoFn: a fresh DoFn (unpickled from `fn_bytes`) and fresh receivers per bundle,
    setup -> start_bundle -> process each -> finish_bundle -> teardown; returns every output (finish_bundle's
    included). What Beam's `transform_evaluator.apply_dofn_to_bundle` does, without its shared output list."""
    from apache_beam.internal import pickler
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
    from apache_beam.runners.dask.transform_evaluator import OneReceiver

    receivers = OneReceiver()
    handler = _OutputHandler(
        window_fn=window_fn, main_receivers=receivers[None], tagged_receivers=receivers,
        per_element_output_counter=None, output_batch_converter=None, process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(pickler.loads(fn_bytes)), handler, context=DoFnContext(label, state=None),
        side_inputs=side_inputs, input_args=args, input_kwargs=kwargs, user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam(),
    )
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for it in items:
        invoker.invoke_process(it)
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return [v.value for v in receivers.values]


def _dask_runner(shuffle_partitions: int) -> Any:
    """Beam's DaskRunner with ParDo translated by `_bundle` and GroupByKey by a shuffle of `shuffle_partitions`
    partitions (the translation table is swapped only while the pipeline's Dask graph is built, under a lock).

    Why the GroupByKey: Beam's translation is `Bag.groupby`, whose task-based shuffle (the one a distributed
    client gets) splits each of its n input partitions n ways and keeps n partitions: n**2 tasks. Every Flatten
    (`dask.bag.concat`) adds its inputs' partitions, so prepare's last shuffles had 18-28 partitions and one run
    of 8 sources made 1,816 tasks, 1,513 of them `shuffle-split`s of a few records each; the scheduler
    dispatching them one by one held the run at the same wall time for 1 and 2 workers. The input is first
    concatenated into at most `shuffle_partitions` partitions (`Bag.repartition`: adjacent partitions joined
    in order, no shuffle), so a shuffle makes at most `shuffle_partitions**2` splits and its output keeps
    one partition per worker."""
    from apache_beam.internal import pickler
    from apache_beam.runners.dask import transform_evaluator as te
    from apache_beam.runners.dask.dask_runner import DaskRunner
    from apache_beam.runners.dask.overrides import _GroupByKeyOnly

    class ParDo(te.ParDo):
        def apply(self, input_bag: Any, side_inputs: Any = None) -> Any:
            transform = self.transform
            args, kwargs = transform.raw_side_inputs
            main_input = next(iter(self.applied.main_inputs.values()))
            window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
            return input_bag.map(te.get_windowed_value, window_fn).map_partitions(
                _bundle, pickler.dumps(transform.fn), transform.label, window_fn, side_inputs, list(args), kwargs
            )

    class GroupByKey(te.GroupByKey):
        def apply(self, input_bag: Any, side_inputs: Any = None) -> Any:
            if input_bag.npartitions > shuffle_partitions:
                input_bag = input_bag.repartition(npartitions=shuffle_partitions)
            return super().apply(input_bag, side_inputs)

    class FixedDaskRunner(DaskRunner):
        def run_pipeline(self, pipeline: Any, options: Any) -> Any:
            ours = {beam.ParDo: ParDo, _GroupByKeyOnly: GroupByKey}
            with _TRANSLATING:
                old = {k: te.TRANSLATIONS[k] for k in ours}
                te.TRANSLATIONS.update(ours)
                try:
                    return super().run_pipeline(pipeline, options)
                finally:
                    te.TRANSLATIONS.update(old)

    return FixedDaskRunner()


_TRANSLATING = threading.Lock()


def dask_setup(worker: Any) -> None:
    """Dask preload hook, in each worker process of the LocalCluster prepare starts (and of a joined cluster
    whose workers were started with `--preload data_pipeline.engine`): ignore SIGINT (and do not log each
    cancelled task), and cap OpenCV's and FFmpeg's threads at the worker's share of the host
    (ingest.per_worker.set_thread_budget): THREADS_ENV (a LocalCluster's: cores // workers unless the user set
    it), else the worker's task threads. A Ctrl-C in the terminal reaches the whole process group; prepare (the
    launcher) stops the cluster in order, instead of every worker printing its own KeyboardInterrupt traceback."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the tasks a Ctrl-C (or a failure) cancels are each logged as a warning here: the driver reports the stop
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
    if os.environ.get(_OWN_ENV):  # a LocalCluster prepare started: the scheduler leaves only when prepare stops
        logging.getLogger("distributed.worker").addFilter(SCHEDULER_GONE)
    from data_pipeline.ingest import per_worker

    # OpenCV / FFmpeg threads: the worker's share of its host (THREADS_ENV), else its task threads
    per_worker.set_thread_budget(int(os.environ.get(THREADS_ENV) or worker.state.nthreads))


THREADS_ENV = "MIRAGE_WORKER_THREADS"  # OpenCV/FFmpeg threads per worker process; default cores // workers
_OWN_ENV = "MIRAGE_OWN_DASK_CLUSTER"  # set in the worker processes of a LocalCluster that prepare starts


class _SchedulerGone(logging.Filter):
    """Drops a worker's "Failed to communicate with scheduler during heartbeat" record (ERROR, with a traceback)
    when the cause is the scheduler's connection being gone (an OSError: CommClosedError, refused). When a
    LocalCluster stops (at the end of a run or on Ctrl-C), its scheduler retires the workers and closes their
    connections while a worker's periodic heartbeat may be in flight; the worker logs that traceback, and is
    closed a moment later by its Nanny (dask/distributed#7105; seen in a Ctrl-C on prepare). Installed only in
    the workers of prepare's own cluster, whose scheduler lives in the launcher: a joined cluster's workers keep
    the record for its operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        gone = record.exc_info is not None and isinstance(record.exc_info[1], OSError)
        return not (gone and record.getMessage().startswith("Failed to communicate with scheduler during heartbeat"))


SCHEDULER_GONE = _SchedulerGone()


SPAWN_WAIT_S = 60  # at most this long with SIGINT held while a LocalCluster's processes are created
CONNECT_TIMEOUT_S = 5  # a scheduler that is up answers in milliseconds; Dask's own default waits 30 s
_WORKER_LOG_ENV = "DASK_LOGGING__DISTRIBUTED"
QUIET = ("apache_beam", "distributed", "dask", "tornado", "bokeh")  # their INFO lines are not the user's news


def quiet_logs() -> None:
    """Beam's and Dask's loggers (QUIET) to WARNING in this process and in the worker processes of a
    LocalCluster started after this (`DASK_LOGGING__DISTRIBUTED`, unless the user set it): prepare's own INFO
    lines stay. For CLIs; a library caller keeps its own logging configuration."""
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault(_WORKER_LOG_ENV, "warning")


def _cluster_threads(address: str) -> int:
    """Worker threads of the Dask cluster at `address`; InputError naming `--dask-address` when no scheduler
    answers within CONNECT_TIMEOUT_S (a wrong host or port, or a cluster that is not up)."""
    import socket
    import urllib.parse

    from dask.distributed import Client

    url = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    limit = CONNECT_TIMEOUT_S + 2  # the Client's own connect timeout, and its handshake's
    try:
        if url.scheme == "tcp" and url.hostname and url.port:  # nothing listening: refused at once, not retried
            socket.create_connection((url.hostname, url.port), timeout=CONNECT_TIMEOUT_S).close()
        return _within(limit, lambda: _count_threads(Client, address))
    except (OSError, ValueError) as e:  # TimeoutError is an OSError; a malformed address is a ValueError
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--dask-address={address}: no Dask scheduler reached ({why}; waited at most "
                         f"{limit:g} s); start one (`dask scheduler`) or fix the address "
                         "(tcp://HOST:PORT)") from None


def _count_threads(client_cls: Any, address: str) -> int:
    with client_cls(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as c:
        return max(1, sum(c.nthreads().values()))


def _within(seconds: float, fn: Any) -> Any:
    """`fn()`'s result, or TimeoutError if it has not returned within `seconds` (it is left to finish in a daemon
    thread): dask.distributed's Client waits for a scheduler's handshake without a limit, so a port that accepts
    connections but never speaks Dask would hang prepare."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=call, daemon=True, name="dask-address-check")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer in Dask's protocol within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


WAIT_SLICE_S = 0.5  # how often the wait for a Dask run looks for a Ctrl-C that Python could not raise


def run(pipeline: Any) -> None:
    """Runs `pipeline` to completion; on an error or Ctrl-C the run is cancelled where the runner can. A Dask
    client opened by the DaskRunner is closed either way.

    A Dask run is waited for in WAIT_SLICE_S slices with SIGINT recorded (`_sigint_recorded`): a Ctrl-C's
    KeyboardInterrupt raised inside a garbage-collector callback (distributed's GCDiagnosis runs one in this
    process) is printed as "Exception ignored" and lost, and the run went on to exit 0; the next slice raises
    it again."""
    result = pipeline.run()
    try:
        futures = getattr(result, "futures", None)
        if futures is not None:
            from dask.distributed import wait

            with _sigint_recorded() as pressed:
                while True:
                    if pressed:
                        raise KeyboardInterrupt
                    try:
                        wait(futures, timeout=WAIT_SLICE_S)
                        break
                    except TimeoutError:
                        continue
        result.wait_until_finish()  # the results, and a worker's error raised here
    except BaseException:
        with contextlib.suppress(Exception):
            result.cancel()
        raise
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()
