"""Shared pieces of the benchmarks: alternating timing, machine info, and the runtime's real train step.

Every benchmark reports RATIOS measured within one run, with the compared things timed alternately
(round-robin), because the hosts these run on are shared and noisy: absolute numbers drift with the
neighbours' load, a ratio of medians taken side by side drifts much less. Alternation does not make a busy
host fair, though: PyTorch's OpenMP threads slow down many times more than XLA's when other processes take
the cores (docs/scaling.md). So every benchmark also records the load average before and after it
(`host_state`) and the thread count each side ran with (`set_threads`, `xla_threads`); a result taken with
the load above the core count is marked "not a claim".
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from mirage_base.host import cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alternate(runners: Mapping[str, Callable[[], Any]], rounds: int, reps: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each runner: `rounds` rounds, each running every runner `reps` times in turn.

    A runner either blocks until its work is done (`float(loss)`) or returns an array still being computed
    (JAX's asynchronous dispatch): the round then waits for the last call's result (`jax.block_until_ready`)
    before its time is taken, so every call of the round is counted."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            out = None
            for _ in range(reps):
                out = fn()
            if hasattr(out, "block_until_ready"):
                out.block_until_ready()
            times[name].append((time.perf_counter() - t0) / reps)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> dict[str, float]:
    """{"min", "median", "max"} of a list of per-round values."""
    return {"min": float(min(xs)), "median": median(xs), "max": float(max(xs))}


def load_average() -> float | None:
    """The 1-minute load average (runnable + uninterruptible tasks, exponentially averaged; `os.getloadavg`);
    None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class ForeignCpu:
    """CPU used on this host by processes other than this one and its children, over a `with` block.

    foreign = (busy CPU time of the whole host, /proc/stat: user + nice + system + irq + softirq + steal) -
    (this process tree's: its own, its reaped children's and its live descendants'), in seconds; `cores` =
    foreign / wall seconds of the block; `host_cores` = the whole host's busy time / wall (everyone's, this
    process tree's included). A descendant that ends inside the block unreaped by this tree (a daemon's orphan)
    counts as foreign: an overestimate, never an underestimate. None where /proc/stat is missing."""

    def __enter__(self) -> ForeignCpu:
        self.seconds: float | None = None
        self.cores: float | None = None
        self.host_cores: float | None = None
        self._t0, self._busy0, self._ours0 = time.perf_counter(), _host_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy = time.perf_counter() - self._t0, _host_busy_s()
        if busy is not None and self._busy0 is not None and wall > 0:
            self.seconds = max(0.0, (busy - self._busy0) - (_own_cpu_s() - self._ours0))
            self.cores, self.host_cores = self.seconds / wall, (busy - self._busy0) / wall


def _host_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process, its reaped children (`os.times`) and its live descendants (psutil, with what
    they reaped): the CPU of this process tree, whichever of its processes are still running."""
    import psutil

    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # ended between the listing and the reading: counted once reaped
            continue
        total += c.user + c.system + c.children_user + c.children_system
    return total


def _spin(n: int, barrier: Any = None, out: Any = None) -> float:
    if barrier is not None:
        barrier.wait()  # every process starts its loop at once
    t, x = time.perf_counter(), 0
    for i in range(n):
        x += i * i
    end = time.perf_counter()
    if out is not None:
        out.put((t, end))  # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes
    return end - t


def _together(ctx: Any, procs: int, n: int) -> float:
    """Seconds from the first of `procs` spawned processes starting its loop to the last one ending it."""
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_spin, args=(n, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    spans = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    return max(e for _, e in spans) - min(t for t, _ in spans)


def parallel_capacity(procs: int = 2, rounds: int = 3, n: int = 3_000_000) -> float:
    """The throughput of `procs` processes computing at once, in units of one process alone: procs x t(one alone)
    / (the last one's end - the first one's start, all at once), median over `rounds` rounds (alone and together
    alternate). The work is a Python loop (no memory traffic, no library threads, no I/O), so this is the host's
    own reference for N-process scaling of CPU-bound work: ~procs on procs independent cores; ~1.1-1.3 for 2
    vCPUs that are SMT siblings of one physical core, which a VM cannot see (its lscpu says one thread per core);
    less than procs also when other processes take CPU meanwhile. Work that waits on I/O can scale past it
    (prepare on Dask reached 103% of it: bench/results.md 7e). Every side runs in fresh spawned processes, the
    one alone too: the caller may hold threads (JAX's, Dask's) that would take the GIL from a loop run in it and
    make 'alone' look slow (a CI run measured 1.67x with every process pinned to one CPU that way)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ratios = []
    for _ in range(rounds):
        alone = _together(ctx, 1, n)
        ratios.append(procs * alone / _together(ctx, procs, n))
    return statistics.median(ratios)


FOREIGN_CORES_MAX = 0.1  # other processes' CPU, in cores, that a timing may share the host with and be a claim


def host_state(load_before: float | None, load_after: float | None, ncores: int | None = None,
               foreign_cores: float | None = None) -> dict[str, Any]:
    """Whether a timing taken between two load-average readings is a claim about this host.

    It is not a claim when either reading is above the core count: then runnable tasks outnumbered the cores
    and the compared sides competed with other processes (unequally: OpenMP waits for its slowest thread).
    Linux counts tasks waiting on disk I/O in the load average too, so an I/O benchmark (checkpoints) can push
    it over by itself; the sentence says so rather than blaming other processes.
    A benchmark that itself fills every core (a run of N worker processes on N cores) passes `foreign_cores`,
    the CPU that other processes used while it ran (`ForeignCpu`): then the load before it must be at most the
    core count and `foreign_cores` at most FOREIGN_CORES_MAX; the load after (this run's own processes) is
    recorded but does not decide.
    Returns {"load_before", "load_after", "cores", "claim" (bool), "why" (one sentence)} (+ "foreign_cores")."""
    n = ncores if ncores is not None else cores()
    loads = [x for x in (load_before, load_after) if x is not None]
    if foreign_cores is not None:
        if load_before is None or load_before > n:
            claim, why = False, f"the load average before the run was {load_before} on {n} cores"
        elif foreign_cores > FOREIGN_CORES_MAX:
            claim, why = False, (f"other processes used {foreign_cores:.2f} cores while it ran (at most "
                                 f"{FOREIGN_CORES_MAX} for a claim)")
        else:
            claim, why = True, (f"the load average before was {load_before:.1f} on {n} cores and other processes "
                                f"used {foreign_cores:.2f} cores while it ran (the load after counts the run's own "
                                "workers)")
        return {"load_before": load_before, "load_after": load_after, "cores": n, "claim": claim, "why": why,
                "foreign_cores": foreign_cores}
    if not loads:
        claim, why = False, "the load average could not be read, so whether the host was idle is unknown"
    elif max(loads) > n:
        claim, why = False, (f"the load average reached {max(loads):.1f} on {n} cores: more tasks were runnable or "
                             "waiting on disk I/O than there are cores (other processes', or this run's own)")
    else:
        claim, why = True, f"the load average stayed at or below {max(loads):.1f} on {n} cores"
    return {"load_before": load_before, "load_after": load_after, "cores": n, "claim": claim, "why": why}


THREAD_ENV = ("NPROC", "OMP_NUM_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """Environment that gives a child process `threads` compute threads on both sides: XLA's CPU client sizes
    its intra-op (Eigen) pool from NPROC (xla `DefaultThreadPoolSize`; read when the client starts, so it must
    be set before jax is first used) and OpenMP (PyTorch's CPU kernels) from OMP_NUM_THREADS."""
    return {k: str(int(threads)) for k in THREAD_ENV}


def without_device_count(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) without any device-count flag (e.g. the test suite's
    `--xla_force_host_platform_device_count=8`): a benchmark child then runs on one CPU device, whose intra-op
    pool NPROC sizes, unless it adds its own count."""
    return " ".join(f for f in xla_flags.split() if "device_count" not in f)


def set_threads(threads: int) -> dict[str, int | None]:
    """Give this process `threads` compute threads: NPROC for XLA if jax's CPU client has not started yet, and
    `torch.set_num_threads` if torch is installed. Returns {"requested", "torch"}: the count torch reports."""
    import importlib.util

    if "jax" not in sys.modules:
        os.environ.update(thread_env(threads))
    out: dict[str, int | None] = {"requested": int(threads), "torch": None}
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(int(threads))
        out["torch"] = torch.get_num_threads()
    return out


def xla_threads() -> int | None:
    """XLA intra-op threads alive in this process (threads named tf_XLAEigen in /proc/self/task), counted after
    a computation has run; None where /proc is missing."""
    base = "/proc/self/task"
    if not os.path.isdir(base):
        return None
    n = 0
    for tid in os.listdir(base):
        try:
            with open(os.path.join(base, tid, "comm")) as f:
                n += f.read().startswith("tf_XLAEigen")
        except OSError:
            continue
    return n


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load, python/jax/torch versions and the date (for the results file)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cores_usable": cores(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "diffusers", "grain"):
        info[mod] = module_version(mod)
    return info


def module_version(mod: str) -> str | None:
    """`mod.__version__`, else the installed distribution's (`orbax.checkpoint` -> orbax-checkpoint), "?" if
    neither says; None where the module cannot be imported."""
    from importlib import metadata

    try:
        m = __import__(mod, fromlist=["__version__"])
    except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
        return None
    try:
        return getattr(m, "__version__", None) or metadata.version(mod.replace(".", "-"))
    except metadata.PackageNotFoundError:
        return "?"


def tiny_config(overrides: Mapping[str, Any] | None = None) -> Any:
    """configs/tiny.py with dotted-key overrides ('model.num_layers': 2)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs.tiny import get_config

    cfg = get_config()
    for key, v in (overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


class RealStep:
    """The runtime's jitted, sharded train step (`train.setup.RunSetup`, as `train.loop.Trainer`) on
    `devices`, with an initialized state and one synthetic global batch; `run()` does one step."""

    def __init__(self, cfg: Any, devices: Any = None):
        import jax

        from mirage_jax.train import data as data_lib
        from mirage_jax.train.setup import RunSetup

        self.cfg = cfg
        devices = list(devices if devices is not None else jax.devices()[:1])
        self.setup = RunSetup(cfg, devices)
        self.global_batch = self.setup.run_cfg.train.global_batch_size
        with jax.set_mesh(self.setup.mesh):
            rows = data_lib.process_rows(self.setup.mesh, self.setup.batch_axes, self.global_batch)
            source = data_lib.SyntheticSource(self.setup.batch_shapes, rows, 1)
            self.batch = data_lib.to_global(next(source), self.setup.batch_shardings, self.global_batch)
            self.state = self.setup.layout.create()
        self.compiled: Any = None

    def compile(self) -> Any:
        """AOT-compile the step for the live state and batch (memory and cost analysis come from this)."""
        import jax

        if self.compiled is None:
            with jax.set_mesh(self.setup.mesh):
                self.compiled = self.setup.step_fn.lower(self.state, self.batch).compile()
        return self.compiled

    def run(self) -> float:
        import jax

        fn = self.compiled if self.compiled is not None else self.setup.step_fn
        with jax.set_mesh(self.setup.mesh):
            self.state, metrics = fn(self.state, self.batch)
        return float(jax.device_get(metrics["loss"]))

    def analytic_flops(self) -> float:
        """describe.count_flops (forward + backward matmuls) x global batch: the MFU numerator."""
        from mirage_jax.describe import count_flops

        return float(count_flops(self.setup.mcfg, dataclasses.asdict(self.setup.run_cfg.shapes)) * self.global_batch)

    def compiled_flops(self) -> dict[str, float]:
        """XLA cost_analysis FLOPs of the compiled step: raw (a scanned layer body counted once) and
        corrected for the scan trip count with `aot.flops.correct_compiled_flops`."""
        from mirage_jax.aot import flops as aot_flops

        ca = aot_flops.compiled_cost(self.compile())
        raw = float(ca.get("flops", 0.0)) * self.setup.mesh.size  # cost_analysis is per device
        mcfg = self.setup.mcfg
        parts = aot_flops.flop_parts(mcfg, dataclasses.asdict(self.setup.run_cfg.shapes))
        corrected = aot_flops.correct_compiled_flops(
            raw, parts, global_batch=self.global_batch, grad_accum=self.setup.run_cfg.train.grad_accum,
            num_layers=mcfg.num_layers, splash=False, remat=False, padded_tokens=0,
            attn_dim=mcfg.attn_dim)
        return {"raw": raw, "corrected": corrected}

    def memory(self) -> dict[str, int]:
        """Per-device bytes from the compiled step's memory_analysis()."""
        ma = self.compile().memory_analysis()
        out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0)) for k in
               ("argument", "output", "alias", "temp", "generated_code")}
        out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
        return out


def against_target(value: float, target: float, digits: int = 2) -> tuple[str, str]:
    """(`value` printed, "met" or "not met") for a report's "{value}x (target >= {target}: {verdict})": printed
    with `digits` decimals, or more (up to 6) where fewer would round it onto the other side of the target
    (1.5991 against 1.6 prints 1.599, not 1.60), so the printed number always agrees with the verdict."""
    met = value >= target
    while digits < 6 and (round(value, digits) >= target) != met:
        digits += 1
    return f"{value:.{digits}f}", "met" if met else "not met"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def host_line(r: dict[str, Any]) -> str:
    """One sentence on whether a result is a claim, from the load averages recorded around it."""
    h = r.get("host")
    if not h:
        return "Host load not recorded: **not a claim**."
    loads = ", ".join("?" if x is None else f"{x:.1f}" for x in (h["load_before"], h["load_after"]))
    verdict = "a claim for this host" if h["claim"] else "**not a claim**"
    return f"Load average before, after: {loads} on {h['cores']} cores: {verdict} ({h['why']})."
