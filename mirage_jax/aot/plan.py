"""Scale planning: compile the real train step for a TPU topology on a CPU host, before renting the pod.

    python -m mirage_jax.aot --config=configs/mirage_10b.py --topology=v5p-256 [--config.mesh.ici.sequence=4] [--json]
    python -m mirage_jax.aot --config=... --topology=... --search [--search_remat=...]   # mirage_jax/aot/search.py

libtpu can compile for a TPU slice it is not running on (`jax.experimental.topologies`): the mesh is built
over the topology's abstract devices, and the runtime's own jitted step (`train.step.make_train_step`, with
`StateLayout`'s state shardings and `train.data`'s batch shardings) is lowered with abstract arguments and
compiled. Nothing is allocated. The report gives, per device: memory (arguments, outputs, temporaries,
total vs the chip's HBM), compiled FLOPs vs the analytic count of `mirage_jax.describe`, and the step time
predicted at a stated MFU. An out-of-memory layout fails at compile time on the pod too; here it becomes a
"does not fit" report (exit status 2) instead of minutes of pod time. docs/scaling.md has the measured
layouts for the report's 10B model.

Shape buckets: a config listing `data.buckets` (configs/mirage_10b.py:seconds=4,8) is compiled once per bucket at
the global batch training gives it (`train.shape_buckets.make_bucket`); the report's top level is the worst
bucket's (`bucket` names it, so `fits` and the exit status are the worst bucket's) and `buckets` lists every
bucket's report. A config without buckets gives the report as before.

Modules of the `mirage_jax.aot` package: `chips` (HBM and bf16 peak per chip), `topology` (slice names ->
libtpu's abstract devices), `flops` (XLA's FLOP count corrected for scanned loops and splash attention: why it
needs a correction is there), this module (compile, memory and FLOPs report, CLI; `python -m mirage_jax.aot`
runs `run_cli` through aot/__main__.py), `search` (`--search`) and `layout` (a layout on a config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mirage_base.errors import ExitCode, MirageError
from mirage_jax.aot.chips import GiB
from mirage_jax.aot.collectives import collective_summary
from mirage_jax.aot.flops import compiled_cost, correct_compiled_flops, flop_parts
from mirage_jax.aot.topology import TopologyError, parse_topology, topology_devices

if TYPE_CHECKING:
    import ml_collections

    from mirage_jax.train.setup import RunSetup

DEFAULT_MFU = 0.40  # between maxdiffusion's Wan 2.1 (~30%) and MaxText's LLMs (50-65%): docs/scaling.md
DEFAULT_MIN_HEADROOM = 0.10  # keep >= 10% of HBM free (runtime reservations, fragmentation, XLA drift)


class UncompilableError(MirageError, RuntimeError):
    """The step cannot be compiled for a mesh at all (not a memory problem); the message names the field."""


# -- compile ----------------------------------------------------------------------------------------


def abstract_batch(setup: RunSetup, global_batch: int,
                   shapes: Mapping[str, tuple[tuple[int, ...], Any]] | None = None) -> dict[str, Any]:
    """ShapeDtypeStructs of one global batch with the runtime's batch shardings (of `shapes`, `data.batch_shapes`
    of one bucket, when given; else the run's)."""
    import jax

    shapes = setup.batch_shapes if shapes is None else shapes
    return {k: jax.ShapeDtypeStruct((global_batch, *shape), dtype, sharding=setup.batch_shardings[k])
            for k, (shape, dtype) in shapes.items()}


# The TPU compiler's out-of-memory messages, as libtpu 0.0.42.1 words them:
#   "... required for HLO temporaries (535.02G) exceeds available HBM (15.75G)."   (seen for HBM)
#   "Ran out of memory in memory space smem. Used 1.10M of 1.00M smem."            (seen for SMEM; same form
#   with "hbm" is matched too). Anything else is reported with its text and no numbers.
_OOM = (re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.IGNORECASE),
        re.compile(r"\(([\d.]+)([KMGT]?)\)\s+exceeds available HBM\s+\(([\d.]+)([KMGT]?)\)", re.IGNORECASE))


def _bytes(num: str, unit: str) -> int:
    return int(float(num) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit.upper()])


def plan(cfg: ml_collections.ConfigDict, topology: str, *, mfu: float = DEFAULT_MFU,
         min_headroom: float = DEFAULT_MIN_HEADROOM, hlo_path: str | None = None,
         devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """Compile the train step of `cfg` for `topology`; the report as a JSON-ready dict (see module doc).

    A config that lists shape buckets (`data.buckets`) is compiled once per bucket, at the bucket's global batch
    (`train.shape_buckets.config_buckets`, the rule training uses): the report is then the worst bucket's (the
    first that does not compile, else the least headroom) with `bucket` naming it and `buckets` holding every
    bucket's own report, so `fits` is the worst bucket's. `devices` (tests): compile over these devices instead
    of libtpu's for the topology, whose chip still gives the HBM and peak."""
    from mirage_jax.train.setup import RunSetup
    from mirage_jax.train.shape_buckets import batch_shapes, batch_unit, config_buckets

    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"--mfu={mfu}: a fraction in (0, 1]")
    if not 0.0 <= min_headroom < 1.0:
        raise ValueError(f"--min_headroom={min_headroom}: a fraction in [0, 1)")
    topo = parse_topology(topology)
    devices = topology_devices(topo) if devices is None else list(devices)
    setup = RunSetup(cfg, devices)  # the runtime's own derivations, over the topology's devices
    tc = setup.run_cfg.train
    buckets = config_buckets(setup.run_cfg, batch_unit(setup.mesh, setup.batch_axes, tc.grad_accum))
    kw = dict(mfu=mfu, min_headroom=min_headroom)
    if not buckets:
        return _plan_one(setup, topology, topo, devices, tc.global_batch_size, setup.run_cfg.shapes, hlo_path, **kw)
    reports = []
    for bk in buckets:
        r = _plan_one(setup, topology, topo, devices, bk.batch, bk.shapes, hlo_path and f"{hlo_path}.{bk.name}",
                      batch_shapes=batch_shapes(setup.run_cfg, bk), **kw)
        reports.append({"bucket": bk.name, **r})
    return {**worst_bucket(reports), "buckets": reports}


def worst_bucket(reports: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The bucket report that decides the fit: the first that does not compile, else the first that does not fit,
    else the least headroom."""
    return min(reports, key=lambda r: (bool(r["compiled"]), bool(r["fits"]), r.get("headroom_fraction") or -1.0))


def _plan_one(setup: RunSetup, topology: str, topo: Any, devices: Sequence[Any], gb: int, shapes_cfg: Any,
              hlo_path: str | None, *, mfu: float, min_headroom: float,
              batch_shapes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report of one compile of `setup`'s train step at global batch `gb` of per-sample `shapes_cfg`."""
    import jax

    from mirage_jax.describe import count_params, count_tokens
    from mirage_jax.model.attention import splash_block
    from mirage_jax.model.dit import recomputes_attention

    n = len(devices)
    per_chip = n // topo.chips
    hbm = topo.chip.hbm_bytes // per_chip
    # Headroom is measured against the smaller of the nominal HBM and what the compiler allows (v6e: 31.25 GiB).
    usable = min(topo.chip.hbm_bytes, topo.chip.usable_hbm_bytes or topo.chip.hbm_bytes) // per_chip
    peak = topo.chip.peak_bf16_flops / per_chip
    mcfg, accum = setup.mcfg, setup.run_cfg.train.grad_accum
    shapes = dataclasses.asdict(shapes_cfg)
    tokens = count_tokens(mcfg, shapes)
    parts = flop_parts(mcfg, shapes)
    analytic = 3 * parts.total * gb
    report: dict[str, Any] = {
        "topology": topology, "topology_name": topo.name, "device_kind": getattr(devices[0], "device_kind", ""),
        "devices": n, "chips": topo.chips, "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "global_batch_size": gb, "grad_accum": accum, "remat_policy": mcfg.remat_policy,
        "splash_fused_bwd": mcfg.splash_fused_bwd,
        "attention_backend": mcfg.attention_backend, "scan_layers": mcfg.scan_layers,
        "params": count_params(mcfg)["total"], "tokens_per_sample": tokens["total"],
        "hbm_per_device_bytes": hbm, "usable_hbm_per_device_bytes": usable, "min_headroom": min_headroom,
        "analytic_flops": analytic, "peak_flops_per_device": peak, "mfu_assumed": mfu,
        "predicted_step_time_s": analytic / (n * peak * mfu),
        "param_fallbacks": len(setup.layout.fallbacks),
        "state_bytes": setup.layout.state_bytes(),  # global: trained params, optimizer, EMA, a LoRA run's base
    }
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(setup.mesh):
            lowered = setup.step_fn.lower(setup.layout.abstract_with_shardings(),
                                          abstract_batch(setup, gb, batch_shapes))
            compiled = lowered.compile()
    except NotImplementedError as e:
        if "Mosaic" not in str(e):
            raise
        raise UncompilableError(
            f"model.attention_backend={mcfg.attention_backend!r}: a Pallas (Mosaic) kernel is called on sharded "
            "arrays without jax.shard_map, which XLA cannot partition; the train step cannot compile for a "
            "multi-device mesh (docs/scaling.md, 'Findings')") from e
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError / XlaRuntimeError by version
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        m = next((m for m in (p.search(msg) for p in _OOM) if m), None)
        used = _bytes(m.group(1), m.group(2)) if m else None
        report.update({
            "compiled": False, "fits": False, "compile_time_s": time.perf_counter() - t0,
            "memory_per_device_bytes": used, "headroom_fraction": (1.0 - used / usable) if used else None,
            "compiler_hbm_bytes": _bytes(m.group(3), m.group(4)) if m else None,
            "compiled_flops": None, "compiled_flops_corrected": None,
            "error": next((ln for ln in msg.splitlines() if "RESOURCE_EXHAUSTED" in ln), msg.strip()[:500])[:2000],
        })
        return report
    report["compile_time_s"] = time.perf_counter() - t0
    hlo = compiled.as_text()
    report["collectives"] = collective_summary(hlo)
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    ma = compiled.memory_analysis()
    mem = {
        "arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes),
        "generated_code": int(ma.generated_code_size_in_bytes),
    }
    # The donated state's outputs reuse its argument buffers (aliased): count them once.
    total = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["generated_code"]
    headroom = 1.0 - total / usable
    raw = compiled_cost(compiled).get("flops", 0.0) * n  # cost analysis is of the per-device (partitioned) program
    splash = mcfg.attention_backend == "splash"
    block = splash_block(tokens["total"])
    corrected = correct_compiled_flops(
        raw, parts, global_batch=gb, grad_accum=accum, num_layers=mcfg.num_layers, splash=splash,
        remat=recomputes_attention(mcfg.remat_policy), padded_tokens=-(-tokens["total"] // block) * block,
        attn_dim=mcfg.attn_dim, fused_bwd=mcfg.splash_fused_bwd)
    report.update({
        "compiled": True, "memory": mem, "memory_per_device_bytes": total, "headroom_fraction": headroom,
        "fits": headroom >= min_headroom, "compiled_flops": raw, "compiled_flops_corrected": corrected,
        "compiled_over_analytic": corrected / analytic if analytic else None,
        # analytic / executed: the MFU this step reaches even at 100% of peak (remat recompute costs the rest)
        "mfu_ceiling": analytic / corrected if corrected else None,
    })
    return report


def format_report(r: Mapping[str, Any]) -> str:
    """The human-readable table of `plan`'s report: of each bucket, then one line per bucket and the fit (the worst
    bucket's), when the config lists shape buckets."""
    if "buckets" not in r:
        return _format_one(r)
    parts = [f"== bucket {b['bucket']}: global batch {b['global_batch_size']}, {b['tokens_per_sample']:,} tokens/sample"
             f"\n{_format_one(b)}" for b in r["buckets"]]
    rows = [f"  {b['bucket']}: batch {b['global_batch_size']}, {b['global_batch_size'] * b['tokens_per_sample']:,} "
            "tokens, " + (f"{b['memory_per_device_bytes'] / GiB:.2f} GiB per device (headroom "
                          f"{100 * b['headroom_fraction']:.1f}%), MFU ceiling {b['mfu_ceiling']:.2f}, step "
                          f"{b['predicted_step_time_s']:.2f} s at {100 * b['mfu_assumed']:.0f}% MFU"
                          if b["compiled"] else "does not compile (out of memory)")
            for b in r["buckets"]]
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    return "\n\n".join(parts) + f"\n\n{len(rows)} shape buckets:\n" + "\n".join(rows) + (
        f"\nfit (the worst bucket, {r['bucket']}): {verdict}")


def _format_one(r: Mapping[str, Any]) -> str:
    """The table of one compile's report."""
    g = lambda b: f"{b / GiB:8.2f} GiB" if b is not None else "       n/a"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['topology']} ({r['topology_name']}, {r['device_kind']}): {r['devices']} devices on {r['chips']} chips; "
        f"mesh {mesh}",
        f"model {r['params']:,} params, {r['tokens_per_sample']:,} tokens/sample; global batch "
        f"{r['global_batch_size']} in {r['grad_accum']} micro-batch(es); remat={r['remat_policy']}, "
        f"attention={r['attention_backend']}"
        f"{' (fused backward)' if r.get('splash_fused_bwd') and r['attention_backend'] == 'splash' else ''}",
    ]
    if not r["compiled"]:
        lines.append(f"DOES NOT FIT: the TPU compiler ran out of memory: {r.get('error', '')}")
        if r.get("compiler_hbm_bytes"):
            lines.append(f"  needs {g(r['memory_per_device_bytes'])}; the compiler allows "
                         f"{g(r['compiler_hbm_bytes'])} per device")
        return "\n".join(lines)
    m = r["memory"]
    lines += [
        "train state (global): " + ", ".join(f"{k} {g(v).strip()}" for k, v in r.get("state_bytes", {}).items()
                                             if k != "frozen_base" or v),
        "memory per device:",
        f"  arguments    {g(m['arguments'])}   (train state + batch shard)",
        f"  outputs      {g(m['outputs'])}   ({g(m['aliased']).strip()} aliased with donated arguments)",
        f"  temporaries  {g(m['temporaries'])}",
        f"  code         {g(m['generated_code'])}",
        f"  total        {g(r['memory_per_device_bytes'])} of {g(r['usable_hbm_per_device_bytes'])} usable "
        f"({g(r['hbm_per_device_bytes']).strip()} HBM): headroom "
        f"{100 * r['headroom_fraction']:.1f}% -> {'FITS' if r['fits'] else 'DOES NOT FIT'} "
        f"(needs >= {100 * r['min_headroom']:.0f}%)",
        f"FLOPs per step: analytic {r['analytic_flops']:.4e} (fwd+bwd, MFU numerator); XLA counted "
        f"{r['compiled_flops']:.4e}, corrected for loop trip counts"
        f"{' and splash attention' if r['attention_backend'] == 'splash' else ''} {r['compiled_flops_corrected']:.4e} "
        f"({r['compiled_over_analytic']:.2f}x analytic)",
        f"MFU ceiling (analytic / executed FLOPs): {100 * r['mfu_ceiling']:.0f}%",
        f"step time at {100 * r['mfu_assumed']:.0f}% MFU of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s/device: "
        f"{r['predicted_step_time_s']:.2f} s ({r['global_batch_size'] / r['predicted_step_time_s']:.2f} samples/s)",
        f"compile time {r['compile_time_s']:.0f} s",
    ]
    if r.get("collectives"):
        lines.append("collectives (ops in the program; a loop body counts once), largest of each: " + "; ".join(
            f"{k} {c['ops']} ops, {c['largest']} {c['largest_bytes'] / 2**20:.1f} MiB"
            for k, c in sorted(r["collectives"].items())))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.search:
        _search(f, (MirageError,))
        return
    report = plan(f.config, f.topology, mfu=f.mfu, min_headroom=f.min_headroom, hlo_path=f.hlo_out)
    print(json.dumps(report) if f.json else format_report(report), flush=True)
    if not report["fits"]:
        sys.exit(2)


def _bool(text: str, flag: str) -> bool:
    if text.strip().lower() not in ("true", "false"):
        raise ValueError(f"--{flag}={text}: a comma-separated list of true/false")
    return text.strip().lower() == "true"


def _search(f: Any, errors: tuple[type[Exception], ...]) -> None:
    """`--search`: the sweep of `mirage_jax.aot.search` over the flags' lists; table (or JSON rows) to stdout."""
    from mirage_jax.aot import search as aot_search

    try:
        n = len(topology_devices(parse_topology(f.topology)))
        def ints(name: str) -> list[int]:
            try:
                return [int(x) for x in getattr(f, name)]
            except ValueError:
                raise ValueError(f"--{name}={','.join(getattr(f, name))}: a comma-separated list of integers") from None

        seqs = ints("search_sequence") or [int(f.config.mesh.ici.sequence)]
        fused = [_bool(x, "search_fused_bwd") for x in f.search_fused_bwd]
        points = aot_search.candidates(f.config, n, f.search_remat, seqs, ints("search_micro"), ints("search_accum"),
                                       fused)
    except (TopologyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if not points:
        print(f"error: --search_sequence={','.join(map(str, seqs))}: no size divides the {n} devices of "
              f"{f.topology} (x mesh.ici.tensor)", file=sys.stderr, flush=True)
        sys.exit(1)
    rows = aot_search.search(f.config, f.topology, plan, points, errors,
                             log=lambda m: print(m, file=sys.stderr, flush=True), mfu=f.mfu,
                             min_headroom=f.min_headroom)
    print(json.dumps(rows) if f.json else aot_search.format_table(rows, f.topology), flush=True)


def run_cli() -> None:
    """`python -m mirage_jax.aot`: define the flags and run `main` (exit codes in the module docstring)."""
    # Compile for the topology only: never claim a local accelerator (on a TPU VM, training may own it).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import flags
    from ml_collections import config_flags

    from mirage_base.cli import run

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mirage_10b.py[:layout=v6e256].",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice: Cloud name (v5p-256, v6e-256) or libtpu name (v5p:4x4x8).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.DEFINE_float("mfu", DEFAULT_MFU, "Model FLOPs utilization assumed for the predicted step time.")
    flags.DEFINE_float("min_headroom", DEFAULT_MIN_HEADROOM, "Fraction of HBM that must stay free to 'fit'.")
    flags.DEFINE_string("hlo_out", None, "Write the compiled (optimized, per-device) HLO text to this file.")
    flags.DEFINE_bool("search", False, "Compile every point of the --search_* lists; print the Pareto table of "
                      "memory per device vs MFU ceiling (mirage_jax/aot/search.py).")
    flags.DEFINE_list("search_remat", ["full", "save_splash", "save_splash_qkv"], "--search: remat policies.")
    flags.DEFINE_list("search_sequence", [], "--search: sequence axis sizes (default: the config's).")
    flags.DEFINE_list("search_micro", ["1"], "--search: samples per batch device per micro-batch.")
    flags.DEFINE_list("search_accum", ["1"], "--search: gradient-accumulation micro-batches.")
    flags.DEFINE_list("search_fused_bwd", [], "--search: splash's fused backward kernel, e.g. false,true "
                      "(default: the config's model.splash_fused_bwd).")
    flags.mark_flags_as_required(["config", "topology"])
    # every user error (config, topology, mesh, layout, uncompilable) is exit 1: 2 means "does not fit"
    run(main, "aot", also={MirageError: (ExitCode.FAILURE, "error")})


