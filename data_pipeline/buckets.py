"""Shape buckets: one prepared dataset of several clip lengths and frame sizes.

    python -m data_pipeline.prepare --input=raw --output=prepared --clip-seconds=1,2 --size=64x96,96x64

Every (clip length, frame size) pair is a bucket named `<seconds>s_<W>x<H>` (`4s_720x1280`). Each source goes
to the size whose aspect ratio is nearest its own display aspect (|ln(w/h) - ln(W/H)| smallest; a tie goes to
the size listed first), scaled to cover it and cropped as with a single `--size`; it feeds every duration
bucket of that size (a 3 s source gives 1 s clips at 0, 1, 2 s and one 2 s clip). A bucket is a complete
single-shape prepare output in the sub-directory `OUTPUT/<name>/` (its own shards, manifest.json and up-to-date
check), so a record's bucket is the directory of its shard. `OUTPUT/manifest.json` (format
`mirage_jax.aroll.buckets.v1`, written last, atomically) lists the buckets: `name`, `path`, `seconds`, `size`,
`clip_frames`, latent `latent_frames`/`latent_height`/`latent_width`, `audio_frames`, `num_records`,
`fingerprint` (the bucket's `sources.fingerprint`), and the sources each size was given.

With one duration and one size prepare writes today's single-shape dataset (no buckets): same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from data_pipeline import encoders
from data_pipeline.dataset import manifest as mf
from data_pipeline.ingest import sources
from data_pipeline.ingest.per_source import IngestConfig, list_sources
from mirage_base.errors import InputError
from mirage_base.time_map import of_manifest

FORMAT = mf.BUCKETS_FORMAT


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """One (clip length, frame size (W, H)) pair."""

    seconds: float
    size: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.seconds:g}s_{self.size[0]}x{self.size[1]}"


def parse_seconds(values: Sequence[str] | str) -> list[float]:
    """'1,2' or ['1', '2'] -> [1.0, 2.0]: positive, distinct; InputError naming --clip-seconds otherwise."""
    items = [v for v in (values.split(",") if isinstance(values, str) else values) if str(v).strip()]
    try:
        out = [float(v) for v in items]
    except ValueError as e:
        raise InputError(f"--clip-seconds={','.join(map(str, items))}: expected seconds, e.g. 4,8 ({e})") from e
    if not out or any(not math.isfinite(s) or s <= 0 for s in out) or len(set(out)) != len(out):
        raise InputError(f"--clip-seconds={','.join(map(str, items))}: expected distinct positive seconds, e.g. 4,8")
    return out


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H); both even and >= 16."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise InputError(f"--size={text!r}: expected WxH, e.g. 64x64") from e
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise InputError(f"--size={text!r}: width and height must be even and at least 16")
    return w, h


def parse_sizes(text: str | None) -> list[tuple[int, int]] | None:
    """'64x96,96x64' -> [(64, 96), (96, 64)] (each as `parse_size`), None for no --size."""
    if not text:
        return None
    out = [parse_size(t.strip()) for t in text.split(",") if t.strip()]
    if len(set(out)) != len(out):
        raise InputError(f"--size={text}: a size is listed twice")
    return out


def nearest_size(display: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The size in `sizes` whose aspect is nearest `display`'s: min |ln(w/h) - ln(W/H)|, first listed on a tie."""
    a = math.log(display[0] / display[1])
    return min(sizes, key=lambda s: abs(a - math.log(s[0] / s[1])))


def assign_sizes(files: Sequence[str], sizes: Sequence[tuple[int, int]],
                 threads: int = 8) -> tuple[dict[tuple[int, int], list[str]], dict[str, str]]:
    """{size: its sources} by nearest aspect (display size from each source's first frame, in threads), and
    {path: reason} for sources whose header cannot be read."""
    displays, bad = sources.display_sizes(files, threads)
    out: dict[tuple[int, int], list[str]] = {s: [] for s in sizes}
    for f, display in displays.items():
        out[nearest_size(display, sizes)].append(f)
    return out, bad


def bucket_entry(spec: BucketSpec, path: str, m: dict[str, Any]) -> dict[str, Any]:
    """The top-level manifest's entry for the bucket prepared in `path` (its manifest `m`)."""
    tm = of_manifest(m)
    latents = tm.latent_count(int(m["clip_frames"]))
    _, h, w, _ = m["keys"]["video"]["shape"]
    return {
        "name": spec.name,
        "path": path,
        "seconds": spec.seconds,
        "size": list(spec.size),
        "clip_frames": int(m["clip_frames"]),
        "latent_frames": latents,
        "latent_height": h,
        "latent_width": w,
        "audio_frames": tm.frames_for_latents(latents),
        "num_records": int(m["num_records"]),
        "fingerprint": m["sources"]["fingerprint"],
    }


def is_bucketed(m: dict[str, Any]) -> bool:
    return m.get("format") == FORMAT


read = mf.read_buckets_manifest  # the top-level manifest of a bucketed dataset, or None


def fingerprint(entries: Sequence[dict[str, Any]]) -> str:
    """The dataset's identity over its buckets (names and their fingerprints)."""
    rows = [[e["name"], e["fingerprint"]] for e in entries]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def run(input_pattern: str, output: str, cfg: IngestConfig, seconds: Sequence[float],
        sizes: Sequence[tuple[int, int]] | None, **run_kw: Any) -> dict[str, Any]:
    """Prepare every bucket (`prepare.run` into OUTPUT/<name>, over the sources of its size), then write the
    top-level manifest.json; returns it. A bucket without clips is left out with a note; none at all raises
    `prepare.NoClipsError`. `run_kw` goes to `prepare.run` (runner, records_per_shard, force, ...)."""
    from data_pipeline import prepare

    files = list_sources(input_pattern)
    root = sources.input_root(input_pattern, files)
    if sizes:
        spatial = encoders.spatial_factor(cfg.build_encoders()[0])
        for w, h in sizes:
            if w % spatial or h % spatial:
                raise InputError(f"--size={w}x{h}: width and height must be multiples of the video encoder's "
                                 f"spatial factor {spatial}")
        by_size, bad = assign_sizes(files, sizes)
    else:  # the sources' own size, which must be one (as for a single bucket)
        spatial = encoders.spatial_factor(cfg.build_encoders()[0])
        try:
            found, bad = sources.check_sizes(files, spatial)
        except ValueError as e:
            raise InputError(f"prepare: {e}") from None
        by_size = {s: [f for f in files if f in found] for s in sorted(set(found.values()))}
    entries, notes, failed = [], [], [f"{f}: {why}" for f, why in sorted(bad.items())]
    for size, group in by_size.items():
        for s in seconds:
            spec = BucketSpec(float(s), size)
            if not group:
                notes.append(f"bucket {spec.name}: no source has an aspect nearest {size[0]}x{size[1]}; left out")
                continue
            sub = dataclasses.replace(cfg, clip_seconds=float(s), size=size)
            out = f"{output.rstrip('/')}/{spec.name}"
            try:
                m = prepare.run(input_pattern, out, sub, files=group, root=root, **run_kw)
            except prepare.NoClipsError as e:
                notes.append(f"bucket {spec.name}: {e}; left out")
                continue
            entries.append(bucket_entry(spec, spec.name, m))
            failed += m["sources"]["failed"]
            notes += [f"[{spec.name}] {n}" for n in m["sources"]["notes"]]
    if not entries:
        raise prepare.NoClipsError(f"prepare: no bucket of {output} kept a clip ({'; '.join(notes)[:400]})")
    top = {
        "format": FORMAT,
        "buckets": entries,
        "num_records": sum(e["num_records"] for e in entries),
        "fingerprint": fingerprint(entries),
        "sources": {
            "count": len(files),
            "by_size": {f"{k[0]}x{k[1]}": len(v) for k, v in by_size.items()},
            "failed": sorted(set(failed))[:1000],
            "notes": sorted(notes)[:1000],
        },
        "options": {**cfg.to_json(), "clip_seconds": list(seconds),
                    "size": None if not sizes else [list(s) for s in sizes]},
    }
    previous = mf.read_buckets_manifest(output)
    mf.write_manifest(output, top)  # the commit: then what the earlier layout left is removed
    mf.remove_replaced_buckets(output, previous, {e["path"] for e in entries})
    mf.clean_stale(output, set())  # a one-shape output's shards (and temporary files) at the top
    return top


def summary(top: dict[str, Any], output: str) -> str:
    """prepare's closing report for a bucketed dataset: one line per bucket, then failures and notes."""
    lines = [f"{output}: {top['num_records']} records in {len(top['buckets'])} bucket(s)"]
    lines += [f"  bucket {e['name']}: {e['num_records']} records, {e['clip_frames']} frames, latent "
              f"{e['latent_frames']}x{e['latent_height']}x{e['latent_width']}, {e['audio_frames']} audio frames"
              for e in top["buckets"]]
    lines += [f"  FAILED {line}" for line in top["sources"]["failed"]]
    lines += [f"  note: {line}" for line in top["sources"]["notes"]]
    return "\n".join(lines)
