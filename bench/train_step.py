"""Train-step throughput: MirageDiT (audio stream off, so the networks are the same) vs a PyTorch step of
diffusers' MochiTransformer3DModel of equal dimensions and token counts (AdamW, fp32, CPU, same batch).

    python -m bench.train_step [--json] [--rounds=5] [--steps=3] [--profile] [--ablation]
    python -m bench.train_step --heads=8 --frames=16   # twice as wide (video_dim 256) and long (1056 tokens)
    python -m bench.train_step --gpu        # on a GPU: bf16, cuDNN attention / SDPA, MFU vs the bf16 peak

Both sides do the same work per step: forward on the same noisy latents, MSE against the same velocity
target, backward, AdamW update. Both get the same number of compute threads (`--threads`, stated in the
result). The JAX step is jitted with its state donated and is dispatched asynchronously, as the runtime's
train step and loop run it (`JAX_VARIANTS`; each round waits for its last step's loss); the PyTorch step
runs eagerly and reads its loss every step (free there: the value is already computed). The two are timed
alternately in one run (the machine is shared and noisy) and reported as samples/s medians and their ratio,
min / median / max per round, the load average before and after (a run with the load above the core count
is "not a claim"), plus achieved GFLOP/s of each on the analytic FLOP
count (`describe.count_flops`, identical networks so identical FLOPs). `--profile` adds where the time
goes: the PyTorch step's top operators (torch.profiler), XLA's cost analysis of the JAX step and XLA's own
per-operation times (jax.profiler).
`--gpu` is a code path for a GPU host (bf16 compute, `attention_backend='cudnn'` vs PyTorch SDPA under
bf16 autocast; MFU against `mirage_jax.aot.chips.PEAK_FLOPS`); no GPU numbers have been measured with it.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags

from bench import common

MOCHI = dict(patch_size=2, attention_head_dim=32, in_channels=12, text_embed_dim=128, time_embed_dim=64)


def _inputs(batch: int, frames: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((batch, 12, frames, 16, 16)).astype(np.float32),
        "target": rng.standard_normal((batch, 12, frames, 16, 16)).astype(np.float32),
        "text": rng.standard_normal((batch, 32, 128)).astype(np.float32),
        "mask": np.ones((batch, 32), bool),
        "t": np.full((batch,), 500.0, np.float32),
    }


def _runner_name(variant: str) -> str:
    """The default variant is the headline "jax" runner; the others are named after their change."""
    return "jax" if variant == DEFAULT_VARIANT else f"jax ({variant})"


JAX_VARIANTS = {
    # name: (attention backend, donate the state, block on every step's loss, dense layers' custom VJP);
    # ordered as changes applied
    "before": ("dot_product", False, True, False),  # jax.nn.dot_product_attention: autodiff keeps the softmax, as
    # the former `xla` backend did; no donation
    "attention VJP": ("xla", False, True, False),  # model/attention.softmax_attention: no (B,H,S,S) residual
    "donated state": ("xla", True, True, False),  # donate_argnums, as the runtime's train step does
    "async dispatch": ("xla", True, False, False),  # loss read once per round, as the train loop does
    "dense-layer VJP": ("xla", True, False, True),  # model/layers.linear: weight gradient dot_general(x, d_out);
    # off = nnx.Linear's lax.dot_general (autodiff's transpose rule). The default: the model as shipped
}
DEFAULT_VARIANT = "dense-layer VJP"


def jax_step(kw: dict, data: dict[str, np.ndarray], gpu: bool = False, variant: str = DEFAULT_VARIANT
             ) -> tuple[Callable[[], Any], Any]:
    """(one-step runner, the jitted step's compiled form) for MirageDiT without audio.

    `variant` (JAX_VARIANTS) picks the attention backend, whether the state is donated (as
    `train.step.make_train_step` does) and whether each step blocks on its loss. The default dispatches
    asynchronously, as the train loop does (metrics are read every `log_every` steps): the runner then
    returns the loss array and `common.alternate` waits for the last one of each round."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mirage_jax.config import ModelConfig
    from mirage_jax.interop.mochi import mochi_config_to_model
    from mirage_jax.model import MirageDiT

    backend, donate, sync, dense_vjp = JAX_VARIANTS[variant]
    extra = dict(compute_dtype="bfloat16", attention_backend="cudnn") if gpu else {"attention_backend": backend}
    cfg = ModelConfig(**mochi_config_to_model(kw), use_audio=False, pool_heads=8, **extra)
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    if not dense_vjp:  # the dense layers as nnx.Linear runs them by default (autodiff of lax.dot_general)
        for _, module in model.iter_modules():
            if isinstance(module, nnx.Linear):
                module.dot_general = jax.lax.dot_general
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    x = jnp.asarray(data["x"].transpose(0, 2, 3, 4, 1))
    target = jnp.asarray(data["target"].transpose(0, 2, 3, 4, 1))
    text, mask, t = jnp.asarray(data["text"]), jnp.asarray(data["mask"]), jnp.asarray(data["t"])

    def step(params, opt):
        def loss_fn(p):
            return jnp.mean((nnx.merge(graphdef, p)(x, t, text, mask) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    state = {"p": params, "o": opt}

    def run() -> Any:
        state["p"], state["o"], loss = step(state["p"], state["o"])
        return float(loss) if sync else loss

    return run, (step, state, cfg)


def lora_model(kw: dict, rank: int, scan_layers: bool = True) -> Any:
    """`jax_step`'s network (MirageDiT without audio, the xla attention) with LoRA adapters of `rank` on the default
    targets (`lora.adapter`, A seeded 1, B = 0). `scan_layers=False` runs the same stacked blocks in a Python loop."""
    from flax import nnx

    from mirage_jax.config import ModelConfig
    from mirage_jax.interop.mochi import mochi_config_to_model
    from mirage_jax.lora import adapter as lora_adapter
    from mirage_jax.model import MirageDiT
    from mirage_jax.run_config import LORA_TARGETS

    cfg = ModelConfig(**mochi_config_to_model(kw), use_audio=False, pool_heads=8, attention_backend="xla",
                      scan_layers=scan_layers)
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    lora_adapter.attach(model, rank=rank, scale=1.0, targets=LORA_TARGETS, dropout=0.0, seed=1)
    return model


def jax_lora_step(kw: dict, data: dict[str, np.ndarray], rank: int, model: Any = None
                  ) -> tuple[Callable[[], Any], dict[str, Any]]:
    """(one-step runner, its state) for the same network and loss as `jax_step`'s default, fine-tuned with LoRA
    adapters of `rank` (`lora_model`, or `model`: such a network with other weights): only the adapters are
    differentiated and in AdamW, the frozen base is a separate, not donated argument (as `train.step` runs a LoRA
    run). Dispatches asynchronously like the default. The state holds the adapters (`a`, after the steps run so
    far), AdamW's state (`o`) and the base (`base`), as plain nested dicts of arrays."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mirage_jax.lora import adapter as lora_adapter

    model = lora_model(kw, rank) if model is None else model
    graphdef, adapters, base = nnx.split(model, lora_adapter.TRAINABLE, lora_adapter.FROZEN)
    # plain dicts, as train.step passes them (nnx.State's Variables made outside the jit trace cannot enter
    # nnx.scan inside jax.grad: "Cannot extract graph node from different trace level")
    adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
    tx = optax.adamw(1e-4)
    x = jnp.asarray(data["x"].transpose(0, 2, 3, 4, 1))
    target = jnp.asarray(data["target"].transpose(0, 2, 3, 4, 1))
    text, mask, t = jnp.asarray(data["text"]), jnp.asarray(data["mask"]), jnp.asarray(data["t"])

    def step(adapters, opt, base):
        def loss_fn(a):
            return jnp.mean((nnx.merge(graphdef, lora_adapter.combine(base, a))(x, t, text, mask) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt = tx.update(grads, opt, adapters)
        return optax.apply_updates(adapters, updates), opt, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = {"a": adapters, "o": tx.init(adapters), "base": base}

    def run() -> Any:
        state["a"], state["o"], loss = step(state["a"], state["o"], state["base"])
        return loss

    return run, state


def torch_step(kw: dict, data: dict[str, np.ndarray], gpu: bool = False) -> tuple[Callable[[], float], Any]:
    """(one-step runner, the model) for diffusers' MochiTransformer3DModel."""
    import contextlib

    import torch
    from diffusers import MochiTransformer3DModel

    dev = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    model = MochiTransformer3DModel(**kw).train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, target = (torch.from_numpy(data[k]).to(dev) for k in ("x", "target"))
    text, mask, t = (torch.from_numpy(data[k]).to(dev) for k in ("text", "mask", "t"))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(x, text, t, mask).sample
        loss = torch.mean((out.float() - target) ** 2)
        loss.backward()
        opt.step()
        return float(loss)

    return run, model


def analytic_flops(kw: dict, batch: int, frames: int) -> float:
    """Train FLOPs of one step (describe.count_flops x batch): the same for both networks."""
    from mirage_jax.config import ModelConfig
    from mirage_jax.describe import count_flops
    from mirage_jax.interop.mochi import mochi_config_to_model

    cfg = ModelConfig(**mochi_config_to_model(kw), use_audio=False, pool_heads=8)
    shapes = {"latent_frames": frames, "latent_height": 16, "latent_width": 16, "audio_frames": 0, "text_len": 32,
              "ref_frames": 0}
    return float(count_flops(cfg, shapes) * batch)


def _profile(jax_run: Callable[[], Any], jax_parts: Any, torch_run: Callable[[], float]) -> dict[str, Any]:
    """Where the time goes: torch.profiler's top operators for one PyTorch step; XLA's cost analysis of the
    JAX step (FLOPs, bytes accessed), its fusion count and its per-operation times (`_jax_profile`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch_run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total} for e in events[:8]]
    step, state, _ = jax_parts
    from mirage_jax.aot.flops import compiled_cost

    compiled = step.lower(state["p"], state["o"]).compile()
    ca = compiled_cost(compiled)
    hlo = compiled.as_text()
    return {
        "torch_top_ops": top, "torch_op_calls": sum(e.count for e in events),
        "jax_cost_analysis": {k: float(ca[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in ca},
        "jax_fusions": sum(" fusion(" in line for line in hlo.splitlines()),
        **_jax_profile(jax_run, hlo),
    }


def busy_ns(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals (nested or overlapping events counted once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _jax_profile(jax_run: Callable[[], Any], hlo: str, steps: int = 3) -> dict[str, Any]:
    """XLA's own per-operation times for `steps` JAX steps (jax.profiler trace of the CPU runtime's thunks,
    summed over its compute threads, per step): the top kinds (fusion names without their number, e.g.
    `ynn_fusion` = a YNNPACK matmul with its fused epilogue, `copy` = a layout transpose or buffer copy,
    `wrapped_broadcast` = a materialised broadcast) and the top single operations with their HLO shape; and
    `jax_thread_busy`: the fraction of the traced steps' wall time each compute thread spent inside any traced
    event (the union of its event intervals: operations, YNNPACK's worker tasks and the thunk executor's own
    spans, so an upper bound on the time it computed; 1.0 = never outside an event)."""
    import re
    import tempfile
    import time

    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            out = None
            t0 = time.perf_counter()
            for _ in range(steps):
                out = jax_run()
            jax.block_until_ready(out)
            wall_ns = (time.perf_counter() - t0) * 1e9
        files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb")]
        data = jax.profiler.ProfileData.from_file(files[0])
    ops: dict[str, float] = {}
    busy: list[float] = []
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's compute threads
                continue
            busy.append(busy_ns([(ev.start_ns, ev.start_ns + ev.duration_ns) for ev in line.events]) / wall_ns)
            for ev in line.events:
                if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    ops[ev.name] = ops.get(ev.name, 0.0) + ev.duration_ns / 1e6 / steps
    kinds: dict[str, float] = {}
    for name, ms in ops.items():
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    total = sum(ops.values()) or 1.0

    def shape(name: str) -> str:
        m = re.search(r"%" + re.escape(name) + r" = (\S+)", hlo)
        return m.group(1).split("{")[0] if m else "?"

    top_kinds = sorted(kinds.items(), key=lambda kv: -kv[1])[:8]
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return {
        "jax_op_ms_per_step": total,
        "jax_thread_busy": sorted(busy, reverse=True),
        "jax_top_kinds": [{"kind": k, "ms": ms, "share": ms / total} for k, ms in top_kinds],
        "jax_top_ops": [{"op": k, "shape": shape(k), "ms": ms, "share": ms / total} for k, ms in top_ops],
    }


def measure(batch: int = 2, layers: int = 4, heads: int = 4, frames: int = 8, rounds: int = 5, steps: int = 3,
            *, profile: bool = False, gpu: bool = False, threads: int | None = None, ablation: bool = False,
            lora: int = 0) -> dict[str, Any]:
    """Samples/s of both steps, alternated; `ratio` = jax / torch (> 1: the JAX step is faster).

    `ablation=True` (CPU only) also times every `JAX_VARIANTS` step in the same alternating rounds, in the
    order the changes were applied, so what each change bought is measured in one run: `ablation` lists
    each variant's samples/s (median), step spread and ratio to the same run's PyTorch step.

    Both sides get `threads` compute threads (default: the CPUs this process may use): torch.set_num_threads,
    and NPROC for XLA's intra-op pool when jax has not started yet (`common.set_threads`); the counts each side
    actually ran with are in `threads`. The load average before and after the timed rounds is in `host`
    (`common.host_state`: not a claim when it exceeded the core count). Per-round times are in
    `jax_step_s` / `torch_step_s` and summarised (min / median / max) in `jax_step` / `torch_step`; `round_ratio`
    is the spread of torch time / jax time over the rounds (each round times the two back to back).
    `lora` > 0 (CPU) also times `jax_lora_step` of that rank in the same rounds: `lora` holds its samples/s and
    its ratio to the full fine-tuning JAX step (> 1: LoRA is faster)."""
    import warnings

    threads = int(threads or common.cores())
    thread_info = common.set_threads(threads)
    warnings.filterwarnings("ignore")
    kw = dict(MOCHI, num_layers=layers, num_attention_heads=heads, pooled_projection_dim=64)
    data = _inputs(batch, frames)
    variants = list(JAX_VARIANTS) if ablation and not gpu else [DEFAULT_VARIANT]
    runners: dict[str, Callable[[], Any]] = {}
    for variant in variants:
        run, parts = jax_step(kw, data, gpu, variant)
        runners[_runner_name(variant)] = run
        if variant == DEFAULT_VARIANT:
            jax_run, jax_parts = run, parts
    if lora > 0 and not gpu:
        runners["jax_lora"] = jax_lora_step(kw, data, lora)[0]
    torch_run, _ = torch_step(kw, data, gpu)
    runners["torch"] = torch_run
    for r in runners.values():  # compile / warm up
        for _ in range(2):
            out = r()
        getattr(out, "block_until_ready", lambda: None)()
    load_before = common.load_average()
    times = common.alternate(runners, rounds, steps)
    host = common.host_state(load_before, common.load_average())
    thread_info["xla"] = None if gpu else common.xla_threads()
    jax_sps = batch / common.median(times["jax"])
    torch_sps = batch / common.median(times["torch"])
    tokens = frames * 64 + 32
    flops = analytic_flops(kw, batch, frames)
    res: dict[str, Any] = {
        "jax_samples_per_s": jax_sps, "torch_samples_per_s": torch_sps, "ratio": jax_sps / torch_sps,
        "jax_gflops_per_s": flops * jax_sps / batch / 1e9, "torch_gflops_per_s": flops * torch_sps / batch / 1e9,
        "step_flops_analytic": flops,
        "jax_step_s": times["jax"], "torch_step_s": times["torch"],
        "jax_step": common.spread(times["jax"]), "torch_step": common.spread(times["torch"]),
        "round_ratio": common.spread([t / j for j, t in zip(times["jax"], times["torch"], strict=True)]),
        "host": host, "threads": thread_info,
        "setup": {"batch": batch, "layers": layers, "heads": heads, "head_dim": 32, "tokens_per_sample": tokens,
                  "dtype": "bfloat16 compute" if gpu else "float32", "optimizer": "AdamW",
                  "device": "gpu" if gpu else "cpu", "rounds": rounds, "steps_per_round": steps},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    if "jax_lora" in times:
        lora_sps = batch / common.median(times["jax_lora"])
        res["lora"] = {"rank": lora, "samples_per_s": lora_sps, "step": common.spread(times["jax_lora"]),
                       "ratio_vs_full": lora_sps / jax_sps}
    if len(variants) > 1:
        res["ablation"] = []
        for variant in variants:
            t = times[_runner_name(variant)]
            backend, donate, sync, dense_vjp = JAX_VARIANTS[variant]
            sps = batch / common.median(t)
            res["ablation"].append({
                "variant": variant, "attention_backend": backend, "donated_state": donate, "sync_every_step": sync,
                "dense_layer_vjp": dense_vjp,
                "samples_per_s": sps, "step_s": t, "step": common.spread(t), "ratio_vs_torch": sps / torch_sps})
    if gpu:
        import jax

        from mirage_jax.aot.chips import peak_flops

        peak = peak_flops(jax.devices()[0].device_kind)
        if peak:
            res["jax_mfu"] = flops * jax_sps / batch / peak
            res["torch_mfu"] = flops * torch_sps / batch / peak
    if profile:
        res["profile"] = _profile(jax_run, jax_parts, torch_run)
    return res


def lora_report(r: dict[str, Any]) -> list[str]:
    """Markdown lines for a `measure(lora=RANK)` result's LoRA timing (`python -m bench.train_step --lora=RANK`):
    the full JAX step, the LoRA step and PyTorch's full step from the same alternating rounds, and LoRA / full."""
    lo = r["lora"]
    return ["| step | samples/s | median step s |", "|---|---|---|",
            f"| JAX full fine-tuning | {r['jax_samples_per_s']:.2f} | {r['jax_step']['median']:.4f} |",
            f"| JAX LoRA rank {lo['rank']} | {lo['samples_per_s']:.2f} | {lo['step']['median']:.4f} |",
            f"| PyTorch full fine-tuning | {r['torch_samples_per_s']:.2f} | {r['torch_step']['median']:.4f} |", "",
            f"LoRA / full fine-tuning (samples/s): {lo['ratio_vs_full']:.2f}x; JAX / PyTorch in the same rounds: "
            f"{r['ratio']:.2f}.", ""]


def main(argv: list[str]) -> None:
    del argv
    F = flags.FLAGS
    res = measure(F.batch, F.layers, F.heads, F.frames, F.rounds, F.steps, profile=F.profile, gpu=F.gpu,
                  threads=F.threads or None, ablation=F.ablation, lora=F.lora)
    if F.json:
        print(json.dumps(res))
    else:
        h, th = res["host"], res["threads"]
        print(("a claim for this host: " if h["claim"] else "NOT A CLAIM (every number below): ") + h["why"])
        print(f"MirageDiT (JAX)  {res['jax_samples_per_s']:.2f} samples/s")
        print(f"Mochi (PyTorch)  {res['torch_samples_per_s']:.2f} samples/s")
        print(f"ratio JAX/PyTorch {res['ratio']:.2f}x (per round min {res['round_ratio']['min']:.2f}, max "
              f"{res['round_ratio']['max']:.2f}); threads torch {th['torch']}, xla {th['xla']}  ({res['setup']})")
        for row in res.get("ablation", []):
            print(f"  JAX {row['variant']:16s} {row['samples_per_s']:.2f} samples/s, JAX/PyTorch "
                  f"{row['ratio_vs_torch']:.2f} (attention {row['attention_backend']}, donated "
                  f"{row['donated_state']}, sync every step {row['sync_every_step']}, dense-layer VJP "
                  f"{row['dense_layer_vjp']})")
        if "lora" in res:
            lo = res["lora"]
            print(f"LoRA rank {lo['rank']} (JAX)  {lo['samples_per_s']:.2f} samples/s, LoRA / full fine-tuning "
                  f"{lo['ratio_vs_full']:.2f}x")
        if "jax_mfu" in res:
            print(f"MFU: JAX {res['jax_mfu']:.1%}, PyTorch {res['torch_mfu']:.1%}")
        if "profile" in res:
            print(json.dumps(res["profile"], indent=1))


if __name__ == "__main__":
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.", lower_bound=1)
    flags.DEFINE_integer("steps", 3, "Steps per timing round per framework.", lower_bound=1)
    flags.DEFINE_integer("batch", 2, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("layers", 4, "Blocks.", lower_bound=1)
    flags.DEFINE_integer("heads", 4, "Attention heads (head_dim 32).", lower_bound=1)
    flags.DEFINE_integer("frames", 8, "Latent frames (16x16 latents, patch 2 -> 64 tokens per frame).", lower_bound=1)
    flags.DEFINE_bool("profile", False, "Also report where each step's time goes.")
    flags.DEFINE_bool("ablation", False, "Also time each JAX change (JAX_VARIANTS) in the same rounds (CPU).")
    flags.DEFINE_integer("lora", 0, "Also time LoRA fine-tuning of this rank in the same rounds (CPU; 0: off).",
                         lower_bound=0)
    flags.DEFINE_bool("gpu", False, "Run both on the GPU in bf16 (cuDNN attention) and report MFU.")
    flags.DEFINE_integer("threads", 0, "Compute threads for each side (0: the CPUs this process may use).")
    from mirage_base.cli import dashed_flags_parser

    app.run(main, flags_parser=dashed_flags_parser)  # --help exits 0, --a-b is --a_b
