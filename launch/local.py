#!/usr/bin/env python3
"""Run N JAX processes of one command on this machine, joined like the hosts of a pod.

    python launch/local.py --processes=2 --devices-per-process=4 -- \\
        python -m mirage_jax.train --config=configs/tiny.py --workdir=/tmp/run

Each process gets M CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=M, JAX_PLATFORMS=cpu),
each running single-threaded (the N x M devices already oversubscribe the machine's cores),
and MIRAGE_COORDINATOR_ADDRESS / MIRAGE_NUM_PROCESSES / MIRAGE_PROCESS_ID, which `mirage_jax.train`
reads (the same values can be passed as --coordinator_address / --num_processes / --process_id).
Output lines are prefixed `[p<i>]`. If one process fails, the others are stopped and the launcher exits
with the failing status. SIGTERM / SIGINT (Ctrl-C) to the launcher is forwarded to every process (a local
preemption drill; the trainers save the agreed stop step and exit 0; a second Ctrl-C makes them exit at once
with 130); a process still running `--stop-grace-s` (default 150 s: the trainer's own stop bound,
MIRAGE_STOP_TIMEOUT_S = 120 s, plus 30 s) after the FIRST forwarded signal is killed (SIGKILL), so the job
ends within that bound whatever its processes are blocked in. The launcher then exits with the worst status
of its processes. The processes start with SIGTERM and SIGINT blocked (the trainer unblocks them once its
handler is installed, so a signal during interpreter start-up is held, not fatal) and with
MIRAGE_LAUNCHER_PID set (the trainer exits when the launcher dies, even by kill -9), each in its own
process group, so that a terminal's Ctrl-C reaches them once, through the launcher.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

SINGLE_THREADED = "--xla_cpu_multi_thread_eigen=false"
GRACE_S = 30.0  # after a process failed, how long the others get before SIGKILL
STOP_GRACE_S = 150.0  # after a forwarded signal, how long every process gets before SIGKILL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], i: int, n: int, devices: int, address: str) -> dict[str, str]:
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    if "xla_cpu_multi_thread_eigen" not in flags:
        # N x M devices share this machine's cores: per-device intra-op thread pools would spin against each
        # other (docs/runtime.md). Every token must be a --flag: XLA stops honouring the rest of XLA_FLAGS
        # (the device count included) after one that is not.
        flags = f"{flags} {SINGLE_THREADED}".strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["MIRAGE_COORDINATOR_ADDRESS"] = address
    env["MIRAGE_NUM_PROCESSES"] = str(n)
    env["MIRAGE_PROCESS_ID"] = str(i)
    env["PYTHONUNBUFFERED"] = "1"
    env["MIRAGE_LAUNCHER_PID"] = str(os.getpid())
    return env


def pump(i: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(f"[p{i}] {line.decode(errors='replace')}")
            sys.stdout.flush()
    stream.close()


def main(argv: list[str] | None = None) -> int:
    # held until `forward` is installed; the children inherit the blocked mask through exec (the trainer
    # unblocks it once its own handler is in place)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="number of processes (N)")
    parser.add_argument("--devices-per-process", type=int, default=4, help="CPU devices per process (M)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--stop-grace-s", type=float, default=STOP_GRACE_S,
                        help="seconds after a forwarded SIGTERM/SIGINT before the processes still running are killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ... run in every process")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; put it after `--`")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be >= 1")
    address = f"127.0.0.1:{args.port or free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps = []
    for i in range(args.processes):
        env = child_env(dict(os.environ), i, args.processes, args.devices_per_process, address)
        # own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it once (in the
        # terminal's group each trainer would get the keypress twice, the second read as "Ctrl-C again")
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
        procs.append(p)
        t = threading.Thread(target=pump, args=(i, p.stdout, lock), daemon=True)
        t.start()
        pumps.append(t)

    forwarded = {"signal": None, "at": None}

    def forward(signum: int, frame) -> None:
        del frame
        forwarded["signal"] = signum
        if forwarded["at"] is None:
            forwarded["at"] = time.monotonic()
        with lock:
            print(f"[launcher] got {signal.Signals(signum).name}; forwarding to {len(procs)} processes", flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    killed = False
    failed_at = None
    status = 0
    while True:
        codes = [p.poll() for p in procs]
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if bad and failed_at is None:
            i, c = bad[0]
            status = c if c > 0 else 128 - c
            failed_at = time.monotonic()
            with lock:
                print(f"[launcher] process {i} exited with status {c}; stopping the others", flush=True)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        late = ((failed_at is not None and now - failed_at > GRACE_S)
                or (forwarded["at"] is not None and now - forwarded["at"] > args.stop_grace_s))
        if late and not killed:
            killed = True
            running = [i for i, p in enumerate(procs) if p.poll() is None]
            with lock:
                print(f"[launcher] processes {running} still running "
                      + (f"{args.stop_grace_s:.0f} s after {signal.Signals(forwarded['signal']).name}"
                         if failed_at is None else f"{GRACE_S:.0f} s after a process failed")
                      + "; killing them (SIGKILL)", flush=True)
            for i in running:
                procs[i].kill()
        time.sleep(0.05)
    for t in pumps:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if status == 0:
        worst = [c for c in codes if c != 0]
        status = (worst[0] if worst[0] > 0 else 128 - worst[0]) if worst else 0
    with lock:
        print(f"[launcher] exit statuses {codes}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
