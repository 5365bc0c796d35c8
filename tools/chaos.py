"""Chaos drill: kill a 2-process training job at random moments, restart it, and check nothing was lost.

    python -m tools.chaos --iterations=20 --seed=0 [--keep=DIR]      (`make chaos N=20`)

Setup: synthetic A-roll -> `data_pipeline.prepare` shards; the tiny config (`configs/tiny.py:fast`) as
2 processes x 4 CPU devices through launch/local.py, fed by the Grain loader with one worker process each.
Every iteration launches the same command, waits for a moment drawn from a seeded RNG (`setup`: since
the launcher started both processes; `restore`: after the mesh/parameter line; `compile`: after
"initialized/resumed at step"; `step`: after the first step; `save`: right after "checkpoint N started")
plus a random delay, then sends
  - SIGTERM to the launcher (a preemption; forwarded to both trainers), or
  - SIGINT to the launcher's process group (Ctrl-C in the launching terminal; the launcher, whose trainers
    run in their own group, forwards it), or
  - SIGKILL to both trainers at once (a host crash; nothing gets to react), or
  - SECOND: starts the same command again while the job runs (a re-queued job whose old allocation still
    runs); the second job must be refused (exit 5, `WORKDIR IN USE` naming the first) without touching the
    workdir, and the first is then preempted with SIGTERM.
Then the same command runs until the job finishes, and an uninterrupted run of the same steps runs in
another workdir. Checked:
  - the final parameters are bitwise equal to the uninterrupted run's;
  - every SIGTERM and SIGINT ended the job with exit 0 within `GRACE_S`;
  - every second job was refused with exit 5 within `GRACE_S` and the first went on to a clean stop;
  - after each SIGKILL the next run resumed from the newest checkpoint committed before the kill or later
    (no step lost beyond the last commit);
  - no process of the job (trainers, Grain workers, multiprocessing's resource tracker) is alive a few
    seconds after the launcher exits.
Prints a table: iterations, kills by kind and moment, exits, resumes, most steps lost, orphans, and the
job's goodput across all its restarts (`python -m mirage_jax.goodput` of the drill's workdir).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mirage_jax.checkpoint_format import CHECKPOINTS, ParamReader, step_dir
from mirage_jax.demo.preempt import last_logged_step

ROOT = Path(__file__).resolve().parents[1]  # the repository: the CLIs run from it (configs/, launch/)

GRACE_S = 60.0  # a SIGTERM must end the job within this (a pod's grace period is typically 30-120 s)
ORPHAN_WAIT_S = 5.0  # after the launcher exits, every process of the job must be gone within this
MOMENTS = {  # moment -> (log line that starts the clock, or None: the launch; max random delay in s)
    "setup": (None, 2.0),
    "restore": (re.compile(r"parameters; process \d feeds"), 0.3),
    "compile": (re.compile(r"(resumed from checkpoint|initialized) at step"), 1.0),
    "step": (re.compile(r"first step took"), 1.0),
    "save": (re.compile(r"checkpoint \d+ started"), 0.2),
}
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")
RESTORED = re.compile(r"(resumed from checkpoint|initialized) at step")
KINDS = ("SIGTERM", "SIGINT", "SIGKILL", "SECOND")


def second_trainer(cmd: list[str], env: dict[str, str], workdir: Path, first: Launch) -> str | None:
    """Start `cmd` again while `first` runs on the same workdir; None if it was refused as it must be (exit 5,
    a `WORKDIR IN USE` line naming the first job's process 0, before its trainers opened the checkpoints), else
    what went wrong."""
    second = start(cmd, env)
    rc = second.finish(GRACE_S)
    if rc is None:
        second.proc.kill()
        second.proc.wait()
        return f"the second job was not refused within {GRACE_S:.0f} s:\n{second.text[-3000:]}"
    trainers = first.trainers()
    refusals = [line for line in second.text.splitlines() if "WORKDIR IN USE" in line]
    if rc != 5 or not refusals or not any(f"pid {pid} " in refusals[0] for pid in trainers):
        return f"the second job ended with exit {rc} (want 5, naming one of {trainers}):\n{second.text[-3000:]}"
    if RESTORED.search(second.text):
        return f"the second job opened the workdir's checkpoints before it was refused:\n{second.text[-3000:]}"
    return None


def prepare_shards(out: Path) -> Path:
    """Two 2 s synthetic clips -> 1 s records in ArrayRecord shards (data_pipeline.prepare)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    for args in (["-m", "data_pipeline.synthesize", f"--out={out / 'raw'}", "--clips=2", "--seconds=2", "--seed=1"],
                 ["-m", "data_pipeline.prepare", f"--input={out / 'raw'}", f"--output={out / 'shards'}",
                  "--clip-seconds=1"]):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return out / "shards"


def command(workdir: Path, shards: Path, steps: int, save_every: int) -> list[str]:
    values = {"data.source": shards, "data.worker_count": 1, "mesh.ici.data": 2, "mesh.ici.fsdp": -1,
              "train.steps": steps, "checkpoint.save_every": save_every}
    return [sys.executable, str(ROOT / "launch" / "local.py"), "--processes=2", "--devices-per-process=4", "--",
            sys.executable, "-m", "mirage_jax.train", "--config=configs/tiny.py:fast", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in values.items()]]


def committed_steps(workdir: Path) -> list[int]:
    """Steps whose directory has its final name (Orbax renames a finished save into place)."""
    d = workdir / CHECKPOINTS
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) of every process (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(d.name)] = (int(fields[1]), fields[19])
    return out


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live descendant of `root`."""
    table = _proc_table()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def alive(pids: dict[int, str]) -> list[int]:
    """The pids of `pids` that still run (same start time, not a zombie)."""
    table, out = _proc_table(), []
    for pid, start in pids.items():
        if pid in table and table[pid][1] == start:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                out.append(pid)
    return out


@dataclasses.dataclass
class Launch:
    """One run of the command: output lines, exit status, the job's processes seen while it ran."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    seen: dict[int, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def watch(self) -> None:
        self.seen.update(descendants(self.proc.pid))

    def wait_for(self, pattern: re.Pattern | None, timeout: float) -> float | None:
        """Monotonic time when a line matching `pattern` appeared (for None: when the launcher had started
        both processes); None if the job ended or `timeout` passed first."""
        deadline = time.monotonic() + timeout
        i = 0
        while time.monotonic() < deadline:
            if pattern is None and len(self.trainers()) >= 2:  # the launcher has started the job's processes
                return time.monotonic()
            while pattern is not None and i < len(self.lines):
                if pattern.search(self.lines[i][1]):
                    return self.lines[i][0]
                i += 1
            if self.proc.poll() is not None and i >= len(self.lines):
                return None
            self.watch()
            time.sleep(0.02)
        return None

    def trainers(self) -> list[int]:
        """The launcher's children (the trainer processes)."""
        return [pid for pid, (ppid, _) in _proc_table().items() if ppid == self.proc.pid]

    def finish(self, timeout: float) -> int | None:
        """Exit status (None if still running after `timeout`), watching the process tree meanwhile."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.watch()
            time.sleep(0.05)
        return self.proc.poll()

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def start(cmd: list[str], env: dict[str, str]) -> Launch:
    """Start the launcher in its own session (process group), as a terminal starts a command: SIGINT to that
    group is a Ctrl-C in the launching terminal."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return Launch(proc)


def save_log(base: Path, name: str, launch: Launch) -> None:
    (base / "logs").mkdir(exist_ok=True)
    (base / "logs" / f"{name}.log").write_text(launch.text)


def orphans_after(launch: Launch) -> list[int]:
    """Processes of the job still alive ORPHAN_WAIT_S after the launcher exited."""
    deadline = time.monotonic() + ORPHAN_WAIT_S
    left = alive(launch.seen)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive(launch.seen)
    for pid in left:  # don't leave them behind for the next iteration
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@dataclasses.dataclass
class Report:
    iterations: int = 0
    kills: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    exits: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    resumes: int = 0
    most_steps_lost: int = 0
    orphans: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    bitwise_equal: bool | None = None
    log: list[str] = dataclasses.field(default_factory=list)
    goodput: str = ""  # mirage_jax.goodput's summary of the drill's workdir (every restart), once the job finished

    def table(self) -> str:
        rows = [("iterations", str(self.iterations))]
        for kind in KINDS:
            by = {m: n for (k, m), n in sorted(self.kills.items()) if k == kind}
            rows.append((f"{kind} by moment", ", ".join(f"{m} {n}" for m, n in by.items()) or "-"))
        rows.append(("exits", ", ".join(f"{k}: {n}" for k, n in sorted(self.exits.items())) or "-"))
        rows += [("resumes", str(self.resumes)), ("most steps lost (SIGKILL)", str(self.most_steps_lost)),
                 ("orphans", str(self.orphans)),
                 ("final params bitwise equal", {None: "not compared", True: "yes", False: "NO"}[self.bitwise_equal]),
                 ("failures", str(len(self.failures)))]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_chaos(base: Path, iterations: int, seed: int, steps: int = 24, save_every: int = 4,
              shards: Path | None = None, schedule: list[tuple[str, str]] | None = None) -> Report:
    """The drill (see the module docstring) under `base`; returns the report (failures listed, not raised).
    `schedule`: fixed (signal, moment) pairs, one per iteration, instead of drawn ones (delays stay drawn)."""
    rng = random.Random(seed)
    shards = shards or prepare_shards(base / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    rep = Report()
    workdir = base / "chaos"
    cmd = command(workdir, shards, steps, save_every)

    def note(msg: str) -> None:
        rep.log.append(msg)
        print(f"[chaos] {msg}", flush=True)

    def check_resume(launch: Launch, expect_at_least: int | None) -> None:
        m = RESUMED.search(launch.text)
        if m:
            rep.resumes += 1
        if expect_at_least is not None and (m is None or int(m.group(1)) < expect_at_least):
            got = m.group(1) if m else "no resume"
            rep.failures.append(f"resumed at {got}, but checkpoint {expect_at_least} was committed before the kill")

    pending_min: int | None = None  # after a SIGKILL: the newest step committed before it
    for it in range(iterations):
        rep.iterations += 1
        kind = rng.choice(KINDS)
        moment = rng.choice(sorted(MOMENTS))
        if schedule:
            kind, moment = schedule[it % len(schedule)]
        pattern, max_delay = MOMENTS[moment]
        delay = rng.uniform(0.0, max_delay)
        launch = start(cmd, env)
        t = launch.wait_for(pattern, timeout=600)
        sent = False
        if t is not None:
            while time.monotonic() < t + delay and launch.proc.poll() is None:
                launch.watch()
                time.sleep(0.01)
            launch.watch()
            if launch.proc.poll() is None:
                committed = committed_steps(workdir)
                if kind == "SECOND":
                    second = second_trainer(cmd, env, workdir, launch)
                    if second:
                        rep.failures.append(f"iteration {it}: SECOND at {moment}: {second}")
                t_sent = time.monotonic()
                if kind in ("SIGTERM", "SECOND"):
                    launch.proc.send_signal(signal.SIGTERM)
                elif kind == "SIGINT":
                    os.killpg(launch.proc.pid, signal.SIGINT)
                else:
                    for pid in launch.trainers():
                        os.kill(pid, signal.SIGKILL)
                sent = True
        rc = launch.finish(GRACE_S if sent else 900)
        if rc is None:
            launch.proc.kill()
            rc = launch.proc.wait()
            rep.failures.append(f"iteration {it}: {kind} at {moment}: the job did not exit within {GRACE_S:.0f} s")
        check_resume(launch, pending_min)
        pending_min = None
        if sent:
            rep.kills[(kind, moment)] += 1
            took = time.monotonic() - t_sent
            outcome = ("nothing new trained" if "nothing new was trained" in launch.text else
                       "saved" if "PREEMPTED" in launch.text else "finished" if "DONE:" in launch.text else "-")
            note(f"iteration {it}: {kind} at {moment} +{delay:.2f} s -> exit {rc} after {took:.1f} s ({outcome}); "
                 f"committed before: {committed[-1:] or 'none'}, last logged step {last_logged_step(workdir)}")
            if kind != "SIGKILL" and rc != 0:
                rep.failures.append(f"iteration {it}: {kind} at {moment} ended with exit {rc}:\n"
                                    + launch.text[-3000:])
            if kind == "SIGKILL":
                pending_min = committed[-1] if committed else None
                lost = last_logged_step(workdir) - max(committed_steps(workdir) or [0])
                rep.most_steps_lost = max(rep.most_steps_lost, lost)
        else:
            note(f"iteration {it}: the job ended (exit {rc}) before {kind} at {moment} +{delay:.2f} s")
            if rc != 0:
                rep.failures.append(f"iteration {it}: the job failed by itself (exit {rc}):\n{launch.text[-3000:]}")
        save_log(base, f"iteration_{it}", launch)
        rep.exits[f"{'-' if not sent else kind} -> {rc}"] += 1
        left = orphans_after(launch)
        if left:
            rep.orphans += len(left)
            rep.failures.append(f"iteration {it}: {len(left)} process(es) of the job still alive: {left}")
    final = start(cmd, env)
    rc = final.finish(900)
    save_log(base, "final", final)
    check_resume(final, pending_min)
    rep.orphans += len(orphans_after(final))
    if rc != 0 or "DONE:" not in final.text:
        rep.failures.append(f"the final run ended with exit {rc}:\n{final.text[-3000:]}")
        return rep
    from mirage_jax import goodput

    events, damaged = goodput.read_events(workdir)
    rep.goodput = goodput.format_summary(goodput.summarize(events), damaged)
    ref_dir = base / "reference"
    ref = start(command(ref_dir, shards, steps, save_every), env)
    rc = ref.finish(900)
    save_log(base, "reference", ref)
    if rc != 0:
        rep.failures.append(f"the uninterrupted run failed:\n{ref.text[-3000:]}")
        return rep
    want, got = (ParamReader(step_dir(str(d), steps)).read_all() for d in (ref_dir, workdir))
    import numpy as np

    diff = [k for k in want if k not in got or not np.array_equal(want[k], got[k])]
    rep.bitwise_equal = not diff and sorted(want) == sorted(got)
    if not rep.bitwise_equal:
        rep.failures.append(f"final parameters differ from the uninterrupted run's in {len(diff)} arrays: {diff[:5]}")
    return rep


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24, help="train.steps of the job")
    parser.add_argument("--save-every", type=int, default=4, help="checkpoint.save_every of the job")
    parser.add_argument("--keep", default=None, help="work under this directory and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mirage_chaos_") as tmp:
        base = Path(args.keep or tmp)
        base.mkdir(parents=True, exist_ok=True)
        rep = run_chaos(base, args.iterations, args.seed, args.steps, args.save_every)
    print(rep.table())
    if rep.goodput:
        print(rep.goodput)
    for f in rep.failures:
        print(f"FAIL: {f}")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
