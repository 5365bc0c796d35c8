"""Cached sampling (issue 33): each cache mode against none at 64 steps with audio + text guidance, in one run.

    python -m bench.sampling [--quick] [--json] [--workdir=RUN --data=HELDOUT] [--steps=64] [--rounds=3]

Without `--workdir`, the bench trains configs/tiny.py (batch 2; `--quick`: 2 blocks, 4 latent frames) for
`--train_steps` steps on one synthetic batch (the
runtime's real step, `common.RealStep`) and samples that model; quality is then measured on the latents (no
decoder, no lip-sync). With `--workdir` (e.g. the demo's run) and `--data` (its held-out shards), it samples the
run's model on held-out conditioning, measures PSNR/SSIM on the decoded video, and the held-out lip-sync gap
closed of every mode (`mirage_jax.eval.heldout.evaluate`, the exact metric).

Per mode: a MagCache schedule is calibrated first (`cache_schedule.calibrate`, one uncached sample), then every
mode's jitted sampler is timed alternately with the uncached one (`common.alternate`: shared, noisy hosts), the
load average is read around the timing, and a result taken above the core count is "not a claim".
PSNR = 10 log10(L^2 / MSE) with L the uncached output's range; SSIM (Wang et al. 2004, C1 = (0.01 L)^2,
C2 = (0.03 L)^2) with a uniform window of min(7, H, W) pixels over each (frame, channel) plane, averaged.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags

from bench import common

MODES = ("none", "cfg", "mag", "cfg+mag")
QUICK = {"model.num_layers": 2, "shapes.latent_frames": 4, "shapes.audio_frames": 4}


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


def _tiny_run(train_steps: int, overrides: dict[str, Any] | None) -> tuple[Any, dict[str, Any], float]:
    """(LoadedRun, conditioning batch as numpy, final loss) of configs/tiny.py (batch 2, `overrides`) trained
    `train_steps` steps on one synthetic batch."""
    import tempfile

    import jax
    import numpy as np
    from etils import epath
    from flax import nnx

    from mirage_base.batch_keys import CONDITION_KEYS
    from mirage_jax.inference import LoadedRun

    cfg = common.tiny_config({"train.global_batch_size": 2, **(overrides or {})})
    step = common.RealStep(cfg)
    loss = float("nan")
    for _ in range(train_steps):
        loss = step.run()
    model = nnx.merge(step.setup.layout.graphdef, step.state.params)
    run = LoadedRun(model=model, config=step.setup.run_cfg, step=train_steps,
                    step_dir=epath.Path(tempfile.mkdtemp(prefix="bench_sampling_")) / "checkpoints" / str(train_steps),
                    weights="params")
    cond = {k: np.asarray(jax.device_get(v)) for k, v in step.batch.items() if k in CONDITION_KEYS or k == "video"}
    return run, cond, loss


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


def measure(*, steps: int = 64, rounds: int = 3, train_steps: int = 30, cfg_audio: float = 3.0, cfg_text: float = 1.5,
            threshold: float = 0.06, max_skips: int = 2, workdir: str | None = None, data: str | None = None,
            clips: int = 4, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"modes": {mode: {"seconds", "speedup", "psnr", "ssim", "forwards", "gap_closed"?}}, "setup", "host", ...}."""
    import dataclasses

    import numpy as np

    from mirage_jax.cache_schedule import calibrate
    from mirage_jax.diffusion.cache import make_plan
    from mirage_jax.sampling import SamplingSettings

    encs = None
    if workdir:
        from mirage_jax.eval.heldout import read_heldout
        from mirage_jax.inference import load_run
        from mirage_jax.run_encoders import load_encoders

        run = load_run(workdir)
        encs = load_encoders(run.config.data, None)
        if not data:
            raise ValueError("--workdir needs --data (the run's held-out shards)")
        cond = read_heldout(data, clips, encs).batch
        loss = None
    else:
        run, cond, loss = _tiny_run(train_steps, overrides)
    shape = tuple(cond["video"].shape)
    base = SamplingSettings(steps=steps, cfg_audio=cfg_audio, cfg_text=cfg_text, schedule="cosine", seed=0)
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
    ref = outputs["none"]
    modes: dict[str, Any] = {}
    for m in MODES:
        plan = make_plan(m, steps, sched.skip)
        x = outputs[m]
        if encs is not None:  # quality on the decoded video
            from mirage_jax.run_encoders import decode_video

            frames = cond["mouth"].shape[1] if "mouth" in cond else encs.clip_frames
            ref_v = np.stack([decode_video(ref[i], encs, frames) for i in range(ref.shape[0])])
            x = np.stack([decode_video(outputs[m][i], encs, frames) for i in range(ref.shape[0])])
        else:
            ref_v = ref
        modes[m] = {"seconds": times[m], "median_s": common.median(times[m]),
                    "speedup": t_none / common.median(times[m]),
                    "psnr": psnr(ref_v, x), "ssim": ssim(ref_v, x),
                    "forwards": plan.forwards(branches) if plan else steps * branches}
    if workdir and data:
        from mirage_jax.eval.heldout import evaluate

        for m in MODES:
            rep = evaluate(run, encs, data, settings[m], clips=clips, seeds=1, progress=False)
            modes[m]["gap_closed"] = rep.get("gap_closed")
    return {
        "setup": {"steps": steps, "rounds": rounds, "cfg_audio": cfg_audio, "cfg_text": cfg_text,
                  "schedule": "cosine", "latent_shape": list(shape),
                  "model": workdir or f"configs/tiny.py, {run.model_config.num_layers} blocks",
                  "train_steps": None if workdir else train_steps, "final_loss": loss, "threshold": threshold,
                  "max_skips": max_skips, "skipped_steps": int(sum(sched.skip)),
                  "quality_on": "decoded video" if workdir else "latents"},
        "schedule_skip": list(sched.skip),
        "modes": modes,
        "host": common.host_state(load_before, load_after),
    }


def report(r: dict[str, Any]) -> list[str]:
    """Markdown lines for bench/results.md."""
    s = r["setup"]
    out = ["## Cached sampling (issue 33)", "",
           f"{s['model']} ({'trained ' + str(s['train_steps']) + ' steps' if s['train_steps'] else 'checkpoint'}), "
           f"latents {s['latent_shape']}, {s['steps']} Euler steps, cosine guidance audio {s['cfg_audio']} / text "
           f"{s['cfg_text']}; MagCache threshold {s['threshold']}, at most {s['max_skips']} skips in a row: "
           f"{s['skipped_steps']} of {s['steps']} steps skipped; quality on the {s['quality_on']} against uncached; "
           f"{s['rounds']} alternating rounds.", "", common.host_line(r), "",
           "| mode | network passes | s (median) | speed-up | PSNR dB | SSIM | gap closed |",
           "|---|---|---|---|---|---|---|"]
    for m, x in r["modes"].items():
        gap = x.get("gap_closed")
        out.append(f"| {m} | {x['forwards']} | {x['median_s']:.3f} | {x['speedup']:.2f}x | {x['psnr']:.1f} | "
                   f"{x['ssim']:.4f} | {'-' if gap is None else f'{gap:.3f}'} |")
    out.append("")
    return out


def main(argv: list[str]) -> None:
    del argv
    F = flags.FLAGS
    if F.quick:
        r = measure(steps=16, rounds=1, train_steps=2, workdir=F.workdir, data=F.data, clips=2, overrides=QUICK)
    else:
        r = measure(steps=F.steps, rounds=F.rounds, train_steps=F.train_steps, workdir=F.workdir, data=F.data,
                    clips=F.clips)
    if F.json:
        print(json.dumps(r))
    else:
        print("\n".join(report(r)))


if __name__ == "__main__":
    flags.DEFINE_bool("quick", False, "16 steps, 1 round, 2 training steps: a smoke run (numbers not meaningful).")
    flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
    flags.DEFINE_integer("steps", 64, "Euler steps.")
    flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
    flags.DEFINE_integer("train_steps", 30, "Training steps of the bench's own tiny model (without --workdir).")
    flags.DEFINE_string("workdir", None, "A trained run to sample (e.g. the demo's) instead of the bench's own.")
    flags.DEFINE_string("data", None, "The run's held-out shards (with --workdir): video quality and lip-sync.")
    flags.DEFINE_integer("clips", 4, "Held-out clips (with --workdir).")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)  # --help exits 0, --a-b is --a_b
