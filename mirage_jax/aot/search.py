"""Layout search: compile the train step for every remat policy x sequence axis x batch / accumulation, and
print the Pareto front of memory per device against the MFU ceiling.

    python -m mirage_jax.aot --config=configs/mirage_10b.py --topology=v5p-256 --search \
        [--search_remat=full,save_splash,save_splash_qkv] [--search_sequence=2,4] \
        [--search_micro=1] [--search_accum=1,2] [--search_fused_bwd=false,true]

`--search_remat` takes any `model.remat_policy` (model/dit.py REMAT), the host-offload ones included
(`offload_mlp`, `offload_dense`: a policy decides both what is kept and where, so offload is not an axis of its
own); e.g. `--search_remat=save_splash,save_splash_down,save_splash_mlp,offload_dense --search_fused_bwd=true`.

The idea is MaxText's estimator: rather than guess a remat policy and a layout, compile the candidates
(`aot.plan`, nothing is allocated) and keep the ones no other candidate beats on both axes. Each point is
`aot.plan`'s report of the config with `model.remat_policy`, `mesh.ici.sequence` and a global batch of
`micro` samples per batch device x `accum` micro-batches (`train.global_batch_size`, `train.grad_accum`),
and splash's backward kernel (`model.splash_fused_bwd`, the config's unless `--search_fused_bwd` lists both);
fsdp takes the rest of the slice (`mesh.ici.fsdp=-1`). The MFU ceiling is analytic / executed FLOPs
(`aot.flops.correct_compiled_flops`); memory is the compiled per-device total. A point that does not compile
(out of memory, a layout the mesh checks refuse) is listed with its reason and is never on the front.
Each 10B compile takes minutes and several GB of host RAM: the sweep is sequential. A config with shape buckets
(`data.buckets`) is compiled per bucket at every point; the point's row is its worst bucket's (`aot.plan`), and
the buckets' batches follow `train.tokens_per_batch` (or `data.bucket_batch`) when set, not the point's batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from mirage_jax.aot.layout import apply_layout
from mirage_jax.run_config import RunConfig

GiB = 1024**3


def pareto(points: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the points that fit and that no other fitting point dominates: another point with memory
    <= and MFU ceiling >=, one of them strictly. Keys: `fits`, `memory_per_device_bytes`, `mfu_ceiling`."""
    ok = [i for i, p in enumerate(points) if p.get("fits") and p.get("mfu_ceiling") is not None]
    front = []
    for i in ok:
        mi, ci = points[i]["memory_per_device_bytes"], points[i]["mfu_ceiling"]
        if not any(points[j]["memory_per_device_bytes"] <= mi and points[j]["mfu_ceiling"] >= ci
                   and (points[j]["memory_per_device_bytes"] < mi or points[j]["mfu_ceiling"] > ci)
                   for j in ok if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i]["memory_per_device_bytes"])


def candidates(cfg: ml_collections.ConfigDict, devices: int, remat: Sequence[str], sequence: Sequence[int],
               micro: Sequence[int], accum: Sequence[int], fused_bwd: Sequence[bool] = ()) -> list[dict[str, Any]]:
    """The sweep's settings: one dict per point, {"remat", "fused_bwd", "sequence", "micro", "accum",
    "global_batch"}; `fused_bwd` empty: the config's `model.splash_fused_bwd`.

    Batch devices = devices / (sequence x tensor); a sequence size that does not divide the slice is
    skipped (the mesh could not be built)."""
    run = RunConfig.from_config(cfg)  # ConfigError naming a bad field
    tensor = run.mesh.ici.get("tensor", 1)
    out = []
    fused_bwd = fused_bwd or (run.model.splash_fused_bwd,)
    for r, f, s, m, a in itertools.product(remat, fused_bwd, sequence, micro, accum):
        if devices % (s * tensor):
            continue
        out.append({"remat": r, "fused_bwd": f, "sequence": s, "micro": m, "accum": a,
                    "global_batch": m * a * devices // (s * tensor)})
    return out


def configure(cfg: ml_collections.ConfigDict, point: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `cfg` laid out as the point says (`layout.apply_layout`: remat policy, splash backward,
    sequence axis with fsdp the rest and the state over both, batch); the config's tensor axis is kept."""
    return apply_layout(cfg.copy_and_resolve_references(), sequence=point["sequence"],
                        global_batch=point["global_batch"], grad_accum=point["accum"], remat=point["remat"],
                        fused_bwd=point["fused_bwd"], tensor=int(cfg.mesh.ici.tensor))


def _bwd(point: Mapping[str, Any]) -> str:
    """How a row names splash's fused backward kernel (nothing for the separate dq/dkv kernels)."""
    return " + fused bwd" if point.get("fused_bwd") else ""


def search(cfg: Any, topology: str, plan: Callable[..., dict[str, Any]], points: Sequence[Mapping[str, Any]],
           errors: tuple[type[Exception], ...] = (), log: Callable[[str], None] = print,
           **plan_kw: Any) -> list[dict[str, Any]]:
    """`plan` (aot.plan) for every point; a point whose config or layout is refused (`errors`) is kept as a
    row with its one-line reason. Returns the reports, each with the point's settings under "point"."""
    rows = []
    for k, p in enumerate(points):
        log(f"[search {k + 1}/{len(points)}] remat={p['remat']}{_bwd(p)} sequence={p['sequence']} "
            f"batch={p['global_batch']} ({p['accum']} micro-batches)")
        try:
            r = plan(configure(cfg, p), topology, **plan_kw)
        except errors as e:
            r = {"compiled": False, "fits": False, "error": str(e).splitlines()[0][:300]}
        r["point"] = dict(p)
        rows.append(r)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], topology: str) -> str:
    """Every point (Pareto-optimal ones marked *), then the front alone, sorted by memory."""
    front = set(pareto(rows))
    head = ("| | remat | sequence | fsdp | batch (accum) | memory / device | headroom | MFU ceiling | "
            "step s @ assumed MFU |")
    lines = [f"Layout search on {topology}: {len(rows)} points, {len(front)} on the Pareto front "
             "(memory per device vs MFU ceiling, among those that fit).", "", head, "|---" * 9 + "|"]
    order = sorted(range(len(rows)), key=lambda i: (rows[i].get("memory_per_device_bytes") or float("inf")))
    for i in order:
        r, p = rows[i], rows[i]["point"]
        batch = f"{p['global_batch']} ({p['accum']})"
        if not r.get("compiled"):
            used = r.get("memory_per_device_bytes")
            why = r.get("error", "did not compile")
            lines.append(f"| | {p['remat']}{_bwd(p)} | {p['sequence']} | | {batch} | "
                         f"{f'{used / GiB:.2f} GiB' if used else 'n/a'} | does not fit | | {why[:120]} |")
            continue
        lines.append(
            f"| {'*' if i in front else ''} | {p['remat']}{_bwd(p)} | {p['sequence']} | {r['mesh'].get('fsdp', '')} | "
            f"{batch} | {r['memory_per_device_bytes'] / GiB:.2f} GiB | {100 * r['headroom_fraction']:.1f}%"
            f"{'' if r['fits'] else ' (too little)'} | {r['mfu_ceiling']:.3f} | {r['predicted_step_time_s']:.3g} |")
    if front:
        best = max(front, key=lambda i: rows[i]["mfu_ceiling"])
        r, p = rows[best], rows[best]["point"]
        lines += ["", f"Highest MFU ceiling that fits: {r['mfu_ceiling']:.3f} with remat={p['remat']}{_bwd(p)}, "
                      f"sequence={p['sequence']}, global batch {p['global_batch']} in {p['accum']} micro-batch(es), "
                      f"{r['memory_per_device_bytes'] / GiB:.2f} GiB per device ({100 * r['headroom_fraction']:.1f}% "
                      "free)."]
    else:
        lines += ["", "No point fits."]
    return "\n".join(lines)
