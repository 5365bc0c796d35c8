"""The README's main command (`make demo`): the whole A-roll path on a laptop CPU, end to end.

    python -m mirage_jax.demo [--out=demo_out] [--fast] [--syncnet-weights=syncnet_v2.model]

1. synthesize  talking-head A-roll (espeak-ng speech, drawn faces) for training and, with another seed, held out
2. prepare     Beam ingest of both into ArrayRecord shards + manifest.json (`dct` video latents, log-mel audio)
3. train       the tiny config (`configs/tiny.py:demo`) as 2 processes (launch/local.py) x
               --devices_per_process CPU devices (default 4), checkpointing; halfway through
               the launcher gets SIGTERM (a preemption drill: every process saves and exits 0), then the
               same command resumes from the checkpoint to the end
4. generate    videos for held-out speech (with that clip's caption and a reference frame) and for a
               `--say` sentence, through the `mirage_jax.generate` CLI
5. eval        `mirage_jax.eval --json` on the held-out clips: lip-sync of the generated videos against the
               shuffled-audio floor and the real-clip ceiling, offset, held-out loss; with `--syncnet-weights`
               also SyncNet's LSE-C / LSE-D of the same three (docs/eval.md), printed next to the exact metric

Every stage is the project's own command line run as a subprocess (what a user would type), timed. The
last line printed is the eval JSON. `--fast` shrinks everything for the test suite (a smoke test of the
path, not of learning).

This package: `__main__` (this file: the stages, run by `python -m mirage_jax.demo`) and `preempt` (the
preemption drill from outside a run that stage 3 uses; library code, so the demo imports no tools/).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from mirage_jax.demo.preempt import preempt_at_step

flags.DEFINE_string("out", "demo_out", "Everything the demo writes goes under this directory.")
flags.DEFINE_bool("fast", False, "Tiny sizes and a few steps: checks the path works, not that it learns.")
flags.DEFINE_integer("steps", None, "Training steps, a complete lr schedule (default: configs/tiny.py:demo's "
                     "train.steps; --fast: 6).")
flags.DEFINE_integer("clips", None, "Training source clips (default: 160; --fast: 4).")
flags.DEFINE_integer("seed", 0, "Data seed (held-out data uses seed + 1000).")
flags.DEFINE_integer("eval_seeds", None, "Sampling seeds for the eval spread (default: 3; --fast: 1).")
flags.DEFINE_string("syncnet_weights", None, "SyncNet weights (syncnet_v2.model, docs/eval.md): eval adds LSE-C / "
                    "LSE-D of the drawn faces (scored as face crops) next to the exact lip-sync metric.")
flags.DEFINE_bool("resume_drill", True, "SIGTERM the training halfway and resume it.")
flags.DEFINE_integer("devices_per_process", 4,
                     "CPU devices per training process: 2 processes x 4 devices is a data-parallel mesh of 8, joined "
                     "like the hosts of a pod (docs/runtime.md, 'Several processes on one machine').")

SAY = "Hello there. This video was generated from my voice, on a laptop processor."
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
# the config the demo trains (generate and eval read its guidance): the training CLI loads it by path
DEMO_CONFIG = os.path.join(ROOT, "configs", "tiny.py") + ":demo"


def _stream(cmd: list[str], tag: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    print(f"[{tag}] $ {shlex.join(cmd)}", flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)


def run(cmd: list[str], tag: str, *, quiet: bool = False, keep: bool = False) -> str:
    """Run `cmd`, echoing its output prefixed with `[tag]` (progress-bar noise dropped when `quiet`)."""
    p = _stream(cmd, tag)
    lines = []
    assert p.stdout is not None
    for line in p.stdout:
        if keep:
            lines.append(line)
        if not quiet or _worth_showing(line):
            sys.stdout.write(f"[{tag}] {line}")
            sys.stdout.flush()
    if p.wait() != 0:
        raise SystemExit(f"demo: stage {tag} failed (exit {p.returncode}): {shlex.join(cmd)}")
    return "".join(lines)


def _worth_showing(line: str) -> bool:
    noise = ("it/s]", "s/it]", "clip/s]", "source/s]", "step/s]", "WARNING: All log messages", "I0000", "W0000",
             "[Gloo]", "apitools not found")
    text = line.split("] ", 1)[1] if line.startswith("[p") and "] " in line else line
    return bool(text.strip()) and not any(n in line for n in noise)


def train_with_drill(cmd: list[str], workdir: str, stop_at: int | None) -> None:
    """Run the training command; with `stop_at`, SIGTERM the launcher once metrics pass that step
    (`demo.preempt.preempt_at_step`), check the preemption save and clean exit, then run the same command again
    to resume."""
    if stop_at is None:
        run(cmd, "train", quiet=True)
        return
    print(f"[train] $ {shlex.join(cmd)}", flush=True)

    def echo(line: str) -> None:
        if _worth_showing(line):
            sys.stdout.write(f"[train] {line}")
            sys.stdout.flush()

    def announce(step: int) -> None:
        print(f"[train] --- demo: step {step} reached: sending SIGTERM to the launcher (preemption drill) ---",
              flush=True)

    r = preempt_at_step(cmd, workdir, stop_at, cwd=ROOT, on_line=echo, on_signal=announce)
    if r.returncode != 0:
        raise SystemExit(f"demo: training exited with {r.returncode}")
    if r.signalled_at is None:
        print("[train] (training finished before the drill could preempt it)")
        return
    print("[train] --- demo: preempted run exited 0; resuming with the same command ---", flush=True)
    run(cmd, "train", quiet=True)


MARKER = ".mirage_demo"


def _fresh_out(out: str) -> None:
    """Start from an empty --out. A directory an earlier demo made (it holds MARKER) is cleared; any other
    non-empty directory is refused, so the demo never deletes what it did not write."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, MARKER)):
            raise SystemExit(f"demo: --out={out} is not empty and was not written by the demo; choose another --out")
        print(f"[demo] clearing the previous demo run in {out}", flush=True)
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "w").close()


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    F = flags.FLAGS
    if F.syncnet_weights:  # a wrong file is one line now, not after training
        from mirage_jax.eval.syncnet import check_state_dict, read_state_dict

        F.syncnet_weights = os.path.abspath(F.syncnet_weights)
        check_state_dict(read_state_dict(F.syncnet_weights, "--syncnet-weights"), F.syncnet_weights,
                         "--syncnet-weights")
    fast = F.fast
    out = os.path.abspath(F.out)
    py = sys.executable
    # default: the config's own steps, loaded as `--config=` loads it (here, not when this module is imported)
    steps = F.steps or (6 if fast else int(ConfigFileFlagParser("config").parse(DEMO_CONFIG).train.steps))
    clips = F.clips or (4 if fast else 160)
    held = 2 if fast else 8
    seconds = 2 if fast else 4
    eval_seeds = F.eval_seeds or (1 if fast else 3)
    times: dict[str, float] = {}
    raw_tr, raw_ho = f"{out}/raw/train", f"{out}/raw/heldout"
    sh_tr, sh_ho = f"{out}/shards/train", f"{out}/shards/heldout"
    workdir, videos = f"{out}/run", f"{out}/videos"
    config = "configs/tiny.py:demo"
    _fresh_out(out)

    t = time.perf_counter()
    run([py, "-m", "data_pipeline.synthesize", f"--out={raw_tr}", f"--clips={clips}", f"--seconds={seconds}",
         f"--seed={F.seed}"], "synthesize", quiet=True)
    run([py, "-m", "data_pipeline.synthesize", f"--out={raw_ho}", f"--clips={held}", f"--seconds={seconds}",
         f"--seed={F.seed + 1000}"], "synthesize", quiet=True)
    times["synthesize"] = time.perf_counter() - t

    t = time.perf_counter()
    for src, dst in ((raw_tr, sh_tr), (raw_ho, sh_ho)):
        run([py, "-m", "data_pipeline.prepare", f"--input={src}", f"--output={dst}", "--clip-seconds=1",
             "--video-encoder=dct"], "prepare", quiet=True)
    times["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    # A persistent compilation cache under --out: the resumed run after the drill (and later runs of the same
    # program) load the compiled step instead of compiling it again (~40 s on 2 cores).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", f"{out}/jax_cache")
    dpp = F.devices_per_process
    train_cmd = [py, "launch/local.py", "--processes=2", f"--devices-per-process={dpp}", "--",
                 py, "-m", "mirage_jax.train", f"--config={config}", f"--workdir={workdir}",
                 f"--config.data.source={sh_tr}", f"--config.train.steps={steps}"]
    if fast:
        train_cmd += ["--config.train.log_every=1", "--config.checkpoint.save_every=3"]
    train_with_drill(train_cmd, workdir, steps // 2 if F.resume_drill else None)
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    with open(f"{raw_ho}/clip_00000.json") as f:
        caption = json.load(f)["caption"]
    gen = [py, "-m", "mirage_jax.generate", f"--checkpoint={workdir}"]
    run(gen + [f"--audio={raw_ho}/clip_00000.mp4", f"--ref={raw_ho}/clip_00001.mp4", f"--caption={caption}",
               "--seconds=1", f"--out={videos}/heldout_speech.mp4"], "generate", quiet=True)
    run(gen + [f"--say={SAY}", f"--ref={raw_ho}/clip_00001.mp4", f"--caption={caption}",
               f"--out={videos}/say.mp4"], "generate", quiet=True)
    times["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    report_text = run([py, "-m", "mirage_jax.eval", f"--checkpoint={workdir}", f"--data={sh_ho}", "--json",
                       f"--clips={2 if fast else 16}", f"--seeds={eval_seeds}"] + (["--steps=4"] if fast else [])
                      + ([f"--syncnet-weights={F.syncnet_weights}", "--syncnet-cropped"] if F.syncnet_weights else []),
                      "eval", quiet=True, keep=True)
    times["eval"] = time.perf_counter() - t
    report = json.loads(report_text.strip().splitlines()[-1])
    report["sync_say"] = _video_sync(f"{videos}/say.mp4")
    _summary(report, times, out, videos, workdir)
    print(json.dumps(report), flush=True)


def _video_sync(mp4: str) -> float:
    """Lip-sync of a generated mp4 against the speech track in its sidecar (written by mirage_jax.generate)."""
    import av
    import numpy as np

    from mirage_jax.eval import lipsync

    with av.open(mp4) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with open(os.path.splitext(mp4)[0] + ".json") as f:
        track = np.asarray(json.load(f)["mouth"])
    return lipsync.sync_frames(frames, track).score


def _summary(report: dict[str, Any], times: dict[str, float], out: str, videos: str, workdir: str) -> None:
    print("\n==== mirage_jax demo ====")
    for k, v in times.items():
        print(f"  {k:<11} {v:7.1f} s")
    print(f"  {'total':<11} {sum(times.values()):7.1f} s")
    g, f, r = report["sync_generated"], report["sync_shuffled"], report["sync_real"]
    print(f"  lip-sync (Pearson r of mouth opening vs speech), {report['clips']} held-out clips x "
          f"{report['seeds']} seeds:")
    print(f"    generated        {g:+.3f} +- {report['sync_generated_std']:.3f}")
    print(f"    shuffled audio   {f:+.3f} +- {report['sync_shuffled_std']:.3f}   (floor)")
    print(f"    real clips       {r:+.3f} +- {report['sync_real_std']:.3f}   (ceiling)")
    print(f"    gap closed       {report['gap_closed']:.2f}  (generated - floor) / (ceiling - floor)")
    print(f"    offset           {report['offset_frames']} frames (confidence {report['offset_confidence']:.2f})")
    print(f"    --say video      {report['sync_say']:+.3f}   ({videos}/say.mp4, TTS speech, windows of 1 s)")
    if report.get("lse_c_generated") is not None:
        print("  SyncNet LSE-C (higher is better) / LSE-D (lower is better), the drawn faces as face crops:")
        for name, key, note in (("generated", "generated", ""), ("shuffled audio", "shuffled", "   (floor)")):
            print(f"    {name:<16} {report[f'lse_c_{key}']:.3f} +- {report[f'lse_c_{key}_std']:.3f} / "
                  f"{report[f'lse_d_{key}']:.3f} +- {report[f'lse_d_{key}_std']:.3f}{note}")
        print(f"    real clips       {report['lse_c_real']:.3f} / {report['lse_d_real']:.3f}   (ceiling)")
        print(f"    offset           {report['lse_offset_generated']} frames (real clips: {report['lse_offset_real']})")
    print(f"  held-out loss      {report['heldout_loss']:.4f}")
    print(f"  videos             {videos}/heldout_speech.mp4, {videos}/say.mp4")
    print(f"  tensorboard        tensorboard --logdir={workdir}   (metrics also in {workdir}/metrics.jsonl)")
    print(f"  everything under   {out}")


if __name__ == "__main__":
    from mirage_base import cli  # not `import run`: this module has its own run() (a subprocess)

    cli.run(main, "demo")
