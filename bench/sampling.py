"""Cached sampling (issue 33): each cache mode against none at 64 steps with audio + text guidance, in one run.

    python -m bench.sampling [--quick] [--json] [--out=bench_sampling_out] [--train_steps=300]
                             [--workdir=RUN --data=HELDOUT [--train_data=SHARDS]] [--steps=64] [--rounds=3]
                             [--clips=4] [--syncnet_weights=syncnet_v2.model]

A trained run is needed (the lip-sync gap is the point). Without `--workdir` the bench makes its own, the demo's
path in small (`tiny_run`): synthetic A-roll (`--train_clips` 2 s sources for training, another seed held out),
prepared with the demo's encoders (`dct` video, 1 s clips), and `configs/tiny.py:demo` trained `--train_steps`
steps through the train CLI (one process) under `--out`; a later run with the same settings reuses it. With
`--workdir` (e.g. `demo_out/run` after `make demo`) and `--data` (its held-out shards, e.g.
`demo_out/shards/heldout`) it samples that run; `--train_data` names the run's training shards when the saved
`data.source` is not readable (their manifest gives the encoders, as eval's `--train-data`).

Per mode: a MagCache schedule is calibrated first (`cache_schedule.calibrate`, one uncached sample of the first
held-out clip), then every mode's jitted sampler (compiled beforehand) samples the `--clips` held-out clips, timed
alternately with the others (`common.alternate`: shared, noisy hosts); the load average is read around the timing
and a result taken above the core count is "not a claim". Quality against the uncached output, on the decoded
video of the same noise: PSNR = 10 log10(L^2 / MSE) with L the uncached video's range; SSIM (Wang et al. 2004,
C1 = (0.01 L)^2, C2 = (0.03 L)^2) with a uniform window of min(7, H, W) pixels over each (frame, channel) plane,
averaged. Lip-sync: `mirage_jax.eval.heldout.evaluate` with the mode's settings (the exact metric, gap closed =
(generated - floor) / (ceiling - floor) over `--seeds`), and with `--syncnet_weights` SyncNet's LSE-C of the
generated videos (n/a without weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from absl import app, flags

from bench import common

MODES = ("none", "cfg", "mag", "cfg+mag")
MARKER = ".bench_sampling"  # --out was made by this bench (it may replace what is under it)
DEMO_CONFIG = "configs/tiny.py:demo"
SOURCE_SECONDS = 2.0  # length of each synthetic source the bench trains on (recorded in the result)


def psnr(ref: Any, x: Any) -> float:
    """Peak signal-to-noise ratio (dB) of `x` against `ref`, peak = ref's range (inf when equal)."""
    import numpy as np

    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    mse = float(np.mean((ref - x) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return float("inf") if mse == 0 else 10.0 * float(np.log10(peak**2 / mse))


def ssim(ref: Any, x: Any) -> float:
    """Mean SSIM over the (H, W) planes of [..., H, W, C] arrays (uniform window, see the module docstring)."""
    import numpy as np
    from scipy.ndimage import uniform_filter

    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    h, w = ref.shape[-3], ref.shape[-2]
    planes_r = np.moveaxis(ref, -1, -3).reshape(-1, h, w)
    planes_x = np.moveaxis(x, -1, -3).reshape(-1, h, w)
    peak = float(ref.max() - ref.min()) or 1.0
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    size = min(7, h, w)
    vals = []
    for a, b in zip(planes_r, planes_x, strict=True):
        mu_a, mu_b = uniform_filter(a, size), uniform_filter(b, size)
        va = uniform_filter(a * a, size) - mu_a**2
        vb = uniform_filter(b * b, size) - mu_b**2
        cov = uniform_filter(a * b, size) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
        vals.append(float(s.mean()))
    return float(np.mean(vals))


def tiny_run(out: str, *, train_steps: int = 300, train_clips: int = 24, heldout_clips: int = 4,
             seed: int = 0) -> tuple[str, str]:
    """(workdir, held-out shards) of `configs/tiny.py:demo` trained `train_steps` steps on synthetic A-roll under
    `out` (see the module docstring); reused when `out` holds a finished run of the same settings. `out` must be
    empty, absent, or made by this function (it holds MARKER)."""
    from data_pipeline import prepare
    from data_pipeline.ingest.per_source import IngestConfig
    from data_pipeline.synthesize import synthesize

    setting = {"config": DEMO_CONFIG, "train_steps": train_steps, "train_clips": train_clips,
               "heldout_clips": heldout_clips, "seed": seed}
    work, heldout, stamp = f"{out}/run", f"{out}/shards/heldout", f"{out}/{MARKER}"
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == setting and os.path.isdir(heldout):
                print(f"bench.sampling: reusing the run trained under {out} ({train_steps} steps)", file=sys.stderr)
                return work, heldout
    elif os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"bench.sampling: --out={out} is not empty and was not made by bench.sampling; choose another")
    import shutil

    for sub in ("raw", "shards", "run"):
        shutil.rmtree(f"{out}/{sub}", ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(stamp, "w") as f:
        json.dump({"unfinished": True}, f)
    ingest = IngestConfig(clip_seconds=1.0, video_encoder="dct")
    for name, clips, s in (("train", train_clips, seed), ("heldout", max(1, -(-heldout_clips // 2)), seed + 1000)):
        synthesize(f"{out}/raw/{name}", clips=clips, seconds=SOURCE_SECONDS, seed=s, progress=False)
        prepare.run(f"{out}/raw/{name}", f"{out}/shards/{name}", ingest, progress=False)
    env = {**os.environ, "PYTHONPATH": common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", f"{out}/jax_cache")}
    cmd = [sys.executable, "-m", "mirage_jax.train", f"--config={DEMO_CONFIG}", f"--workdir={work}",
           f"--config.data.source={out}/shards/train", f"--config.train.steps={train_steps}",
           f"--config.checkpoint.save_every={train_steps}", f"--config.train.seed={seed}",
           f"--config.optim.warmup_steps={min(100, max(1, train_steps // 10))}"]
    r = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench.sampling: training failed (exit {r.returncode}): {' '.join(cmd)}\n"
                           + (r.stdout + r.stderr)[-3000:])
    with open(stamp, "w") as f:
        json.dump(setting, f)
    return work, heldout


def _sampler(run: Any, cond: dict[str, Any], shape: tuple[int, ...], settings: Any) -> Any:
    """A no-argument runner of the jitted sampler of `settings` (compiled once, here), returning latents."""
    import jax
    import jax.numpy as jnp

    from mirage_base.batch_keys import CONDITION_KEYS
    from mirage_jax.diffusion.cache import cached_euler_sample, make_plan
    from mirage_jax.diffusion.sampler import euler_sample, model_velocity_fn

    c = {k: jnp.asarray(v) for k, v in cond.items() if k in CONDITION_KEYS}
    fn, state = model_velocity_fn(run.model, c)
    noise = jax.random.normal(jax.random.key(settings.seed), shape, jnp.float32)
    plan = make_plan(settings.cache, settings.steps, settings.skip or None)
    kw = dict(threshold=run.diffusion_config.lq_threshold, cfg_text=settings.cfg_text, cfg_audio=settings.cfg_audio,
              schedule=settings.schedule)
    if plan is None:
        f = jax.jit(lambda x, st: euler_sample(fn, x, steps=settings.steps, state=st, **kw))
    else:
        f = jax.jit(lambda x, st: cached_euler_sample(fn, x, plan, state=st, **kw))
    f(noise, state).block_until_ready()  # compile outside the timing
    return lambda: f(noise, state)


def measure(workdir: str, data: str, *, train_data: str | None = None, steps: int = 64, rounds: int = 3,
            clips: int = 4, seeds: int = 1, cfg_audio: float = 3.0, cfg_text: float = 1.5, schedule: str = "cosine",
            threshold: float = 0.06, max_skips: int = 2, syncnet_weights: str | None = None,
            syncnet_cropped: bool = True, trained: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"setup", "schedule_skip", "modes": {mode: {"seconds", "median_s", "speedup", "psnr", "ssim", "forwards",
    "gap_closed", "sync_generated", "lse_c"}}, "host"} for the run `workdir` on the held-out shards `data`."""
    import dataclasses

    import numpy as np

    from mirage_jax.cache_schedule import calibrate
    from mirage_jax.diffusion.cache import make_plan
    from mirage_jax.eval.heldout import evaluate, read_heldout
    from mirage_jax.inference import load_run
    from mirage_jax.run_encoders import decode_video, load_encoders
    from mirage_jax.sampling import SamplingSettings

    run = load_run(workdir)
    encs = load_encoders(run.config.data, train_data, flag="--train_data")
    cond = read_heldout(data, clips, encs).batch
    shape = tuple(cond["video"].shape)
    base = SamplingSettings(steps=steps, cfg_audio=cfg_audio, cfg_text=cfg_text, schedule=schedule, seed=0,
                            batch_size=max(8, shape[0]))
    sched = calibrate(run, {k: v[:1] for k, v in cond.items()}, (1, *shape[1:]), base, threshold=threshold,
                      max_skips=max_skips)
    settings = {m: dataclasses.replace(base, cache=m, skip=sched.skip if "mag" in m else ()) for m in MODES}
    runners = {m: _sampler(run, cond, shape, s) for m, s in settings.items()}
    outputs = {m: np.asarray(r()) for m, r in runners.items()}
    load_before = common.load_average()
    times = common.alternate(runners, rounds)
    load_after = common.load_average()
    branches = 1 + (cfg_audio != 1.0) + (cfg_text != 1.0)
    t_none = common.median(times["none"])
    frames = cond["mouth"].shape[1] if "mouth" in cond else encs.clip_frames

    def video(lat: Any) -> Any:
        return np.stack([decode_video(lat[i], encs, frames) for i in range(lat.shape[0])])

    ref = video(outputs["none"])
    scorer = None
    if syncnet_weights:
        from mirage_jax.eval.sync import Scorer, default_mesh
        from mirage_jax.eval.syncnet import load_weights

        scorer = Scorer(load_weights(syncnet_weights, "--syncnet_weights"), mesh=default_mesh())
    modes: dict[str, Any] = {}
    for m in MODES:
        plan = make_plan(m, steps, sched.skip)
        x = video(outputs[m])
        rep = evaluate(run, encs, data, settings[m], clips=clips, seeds=seeds, progress=False, syncnet=scorer,
                       syncnet_cropped=syncnet_cropped)
        modes[m] = {"seconds": times[m], "median_s": common.median(times[m]),
                    "speedup": t_none / common.median(times[m]),
                    "psnr": psnr(ref, x), "ssim": ssim(ref, x),
                    "forwards": plan.forwards(branches) if plan else steps * branches,
                    "gap_closed": rep.get("gap_closed"), "sync_generated": rep.get("sync_generated"),
                    "lse_c": rep.get("lse_c_generated"), "skipped": rep.get("skipped")}
    return {
        "setup": {"steps": steps, "rounds": rounds, "cfg_audio": cfg_audio, "cfg_text": cfg_text,
                  "schedule": schedule, "latent_shape": list(shape), "clips": int(shape[0]), "seeds": seeds,
                  "model": workdir, "checkpoint_step": run.step, "data": data, "trained": trained,
                  "threshold": threshold, "max_skips": max_skips, "skipped_steps": int(sum(sched.skip)),
                  "syncnet": bool(syncnet_weights), "quality_on": "decoded video"},
        "schedule_skip": list(sched.skip),
        "modes": modes,
        "host": common.host_state(load_before, load_after),
    }


QUICK = {"steps": 16, "rounds": 1, "clips": 2, "train_steps": 4, "train_clips": 2}


def run_bench(*, out: str, quick: bool = False, workdir: str | None = None, data: str | None = None,
              train_data: str | None = None, train_steps: int = 300, train_clips: int = 24, seed: int = 0,
              **kw: Any) -> dict[str, Any]:
    """`measure` on `workdir` / `data`, or on the run `tiny_run` trains (or reuses) under `out`; `quick`: the
    QUICK sizes (a smoke run: the numbers mean nothing)."""
    if quick:
        kw = {**kw, "steps": QUICK["steps"], "rounds": QUICK["rounds"], "clips": QUICK["clips"]}
        train_steps, train_clips = QUICK["train_steps"], QUICK["train_clips"]
    if bool(workdir) != bool(data):
        raise SystemExit("bench.sampling: --workdir and --data go together (a trained run and its held-out shards)")
    trained = None
    if not workdir:
        workdir, data = tiny_run(out, train_steps=train_steps, train_clips=train_clips,
                                 heldout_clips=kw.get("clips", 4), seed=seed)
        trained = {"config": DEMO_CONFIG, "train_steps": train_steps, "train_clips": train_clips, "seed": seed,
                   "source_seconds": SOURCE_SECONDS}
    return measure(workdir, data, train_data=train_data, trained=trained, **kw)


def _num(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def report(r: dict[str, Any]) -> list[str]:
    """Markdown lines for bench/results.md."""
    s = r["setup"]
    t = s.get("trained")
    if t:
        length = f"{t['source_seconds']:g} s " if "source_seconds" in t else ""
        what = (f"`{t['config']}` trained {t['train_steps']} steps by the bench on {t['train_clips']} synthetic "
                f"{length}sources")
    else:
        what = f"`{s['model']}`"
    what += f" (step {s['checkpoint_step']})"
    none_gap = r["modes"]["none"].get("gap_closed")
    out = ["## Cached sampling (issue 33)", "",
           f"{what}, {s['clips']} held-out clips ({s['data']}), latents {s['latent_shape']}, {s['steps']} Euler "
           f"steps, {s['schedule']} guidance audio {s['cfg_audio']} / text {s['cfg_text']}; MagCache threshold "
           f"{s['threshold']}, at most {s['max_skips']} skips in a row: {s['skipped_steps']} of {s['steps']} steps "
           f"skipped; PSNR/SSIM on the decoded video against uncached; lip-sync gap closed (the exact metric) over "
           f"{s['seeds']} seed(s); LSE-C {'of the generated videos' if s['syncnet'] else 'n/a (no --syncnet_weights)'}"
           f"; {s['rounds']} alternating rounds.", "", common.host_line(r), "",
           "| mode | network passes | s (median) | speed-up | PSNR dB | SSIM | gap closed | vs none | LSE-C |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m, x in r["modes"].items():
        gap = x.get("gap_closed")
        delta = None if gap is None or none_gap is None else gap - none_gap
        out.append(f"| {m} | {x['forwards']} | {x['median_s']:.3f} | {x['speedup']:.2f}x | {x['psnr']:.1f} | "
                   f"{x['ssim']:.4f} | {_num(gap, '.3f')} | {_num(delta, '+.3f')} | {_num(x.get('lse_c'), '.3f')} |")
    skipped = {x.get("skipped") for x in r["modes"].values()} - {None}
    out += [""] + [f"Not computed: {w}" for w in sorted(skipped)] + ([""] if skipped else [])
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    F = flags.FLAGS
    r = run_bench(out=F.out, quick=F.quick, workdir=F.workdir, data=F.data, train_data=F.train_data,
                  train_steps=F.train_steps, train_clips=F.train_clips, seed=F.seed, steps=F.steps, rounds=F.rounds,
                  clips=F.clips, seeds=F.seeds, cfg_audio=F.cfg_audio, cfg_text=F.cfg_text,
                  schedule=F.cfg_schedule, threshold=F.cache_threshold, max_skips=F.cache_max_skips,
                  syncnet_weights=F.syncnet_weights, syncnet_cropped=F.syncnet_cropped)
    print(json.dumps(r) if F.json else "\n".join(report(r)))


if __name__ == "__main__":
    flags.DEFINE_bool("quick", False, "A smoke run (16 steps, 1 round, 2 clips, a model trained 4 steps): the "
                      "numbers mean nothing.")
    flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
    flags.DEFINE_string("out", "bench_sampling_out", "Where the bench's own run is trained (and reused).")
    flags.DEFINE_integer("train_steps", 300, "Training steps of the bench's own run (without --workdir).",
                         lower_bound=1)
    flags.DEFINE_integer("train_clips", 24, "Synthetic 2 s training sources of the bench's own run.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Data and training seed of the bench's own run (held out: seed + 1000).")
    flags.DEFINE_string("workdir", None, "A trained run to sample (e.g. demo_out/run) instead of the bench's own.")
    flags.DEFINE_string("data", None, "Its held-out shards (with --workdir; e.g. demo_out/shards/heldout).")
    flags.DEFINE_string("train_data", None, "Its training shards, when the run's saved data.source is unreadable.")
    flags.DEFINE_integer("steps", 64, "Euler steps.", lower_bound=2)
    flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.", lower_bound=1)
    flags.DEFINE_integer("clips", 4, "Held-out clips: the timed batch and the lip-sync evaluation.", lower_bound=1)
    flags.DEFINE_integer("seeds", 1, "Sampling seeds of the lip-sync evaluation.", lower_bound=1)
    flags.DEFINE_float("cfg_audio", 3.0, "Audio guidance scale.")
    flags.DEFINE_float("cfg_text", 1.5, "Text guidance scale.")
    flags.DEFINE_enum("cfg_schedule", "cosine", ["constant", "cosine"], "Guidance over noise levels.")
    flags.DEFINE_float("cache_threshold", 0.06, "MagCache accumulated-error threshold of the calibration.")
    flags.DEFINE_integer("cache_max_skips", 2, "MagCache's most consecutive skipped steps.")
    flags.DEFINE_string("syncnet_weights", None, "SyncNet weights (syncnet_v2.model): adds LSE-C (docs/eval.md).")
    flags.DEFINE_bool("syncnet_cropped", True, "Score the videos whole as face crops (the synthetic drawn faces); "
                      "--nosyncnet_cropped detects the face (real footage).")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)  # --help exits 0, --a-b is --a_b
