"""What curation did, for people: manifest.json's `curation`, a contact sheet PNG and every clip's measured
values (curation_clips.jsonl) next to the manifest.

`thumbnails` (the last curation step in the pipeline) takes the middle frame of every clip and dropped span of
a source; `summaries` turns a curated batch's SourcePlans into `Summary` elements (what the report needs: no
crop track, no detections), which travel in prepare's one element stream to its manifest step (no side input);
`curation`, `clips_jsonl` and `contact_sheet` build the outputs there from every source's Summary and every
isolation.Failure of the run (a failed source, in any stage, is a failed tile and is left out of the counts:
none of its clips is in the output), sorted, so the same inputs give the same bytes on any runner.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.curate import STAGES
from data_pipeline.curate.plan import CurateConfig, SourcePlan
from data_pipeline.ingest import media, sources
from data_pipeline.ingest.isolation import Failure

THUMB_H = 72
TILE_W = 160
LABEL_H = 54  # the title and up to 3 lines of reason, 12 px each
REASON_LINES = 3
TEXT_W = TILE_W - 8  # pixels a label line may use (4 px margin, the 2 px border)
PER_ROW = 8
MAX_PER_SOURCE = 48  # thumbnails per source (the sheet is for looking; curation_clips.jsonl lists every clip)
SHEET_NAME = "curation.png"
CLIPS_NAME = "curation_clips.jsonl"
# a run that keeps no clip writes no manifest: its report goes under these names, so that an earlier complete
# output's manifest.json, shards and report stay as they were (and a rerun that finds them up to date names them)
NO_CLIPS_NAMES = {SHEET_NAME: "curation-no-clips.png", CLIPS_NAME: "curation_clips-no-clips.jsonl"}


def report_names(complete: bool) -> tuple[str, str]:
    """(contact sheet, clip list) file names of a run's curation report: the canonical names for a run that
    writes a manifest (`complete`), NO_CLIPS_NAMES for one that keeps no clip."""
    names = (SHEET_NAME, CLIPS_NAME)
    return names if complete else tuple(NO_CLIPS_NAMES[n] for n in names)  # type: ignore[return-value]


def stale_names(curated: bool) -> list[str]:
    """Report files a complete run must remove from its output directory: the no-clips report of an earlier
    failed run, and without curation (`curated` False) an earlier curated run's report, which the new
    manifest.json does not describe."""
    return [*NO_CLIPS_NAMES.values(), *(() if curated else (SHEET_NAME, CLIPS_NAME))]


def thumbnails(plan: SourcePlan, cfg: CurateConfig) -> None:
    """Middle frame of the first MAX_PER_SOURCE clips and dropped spans (in time order), THUMB_H pixels high
    (seeking: a few frames per source)."""
    import cv2

    info = media.probe(plan.path)
    seeker = media.FrameSeeker(info, None)
    try:
        spans = sorted([(c.start, c.stop) for c in plan.clips] + [(s[0], s[1]) for s in plan.spans])
        for a, b in spans[:MAX_PER_SOURCE]:
            rgb = seeker.get(min((a + b) // 2, plan.num_frames - 1))
            h, w = rgb.shape[:2]
            plan.thumbs[a] = cv2.resize(rgb, (max(1, round(w * THUMB_H / h)), THUMB_H), interpolation=cv2.INTER_AREA)
    finally:
        seeker.close()


class Summary(NamedTuple):
    """One curated source's report (`summary`), an element of prepare's stream: its path as listed and the
    fields."""

    path: str
    fields: dict[str, Any]


def summaries(batch: list[SourcePlan | Failure]) -> Iterator[Summary]:
    """A Summary per SourcePlan of a curated batch (a Failure reaches the report by itself)."""
    for item in batch:
        if isinstance(item, SourcePlan):
            yield Summary(item.path, summary(item))


def summary(plan: SourcePlan) -> dict[str, Any]:
    """The report's view of one source's plan (picklable, small)."""
    fps = media.FPS
    items = [{"kind": "clip", "start": c.start, "stop": c.stop, "reason": c.drop, "stage": c.stage,
              "values": c.values} for c in plan.clips]
    items += [{"kind": "span", "start": a, "stop": b, "reason": why, "stage": st, "values": {}}
              for a, b, why, st in plan.spans]
    return {
        "source": plan.source_id,
        "path": plan.path,
        "cuts_s": [round(k / fps, 3) for k in plan.cuts],
        "items": sorted(items, key=lambda d: d["start"]),
        "ran": list(plan.ran),
        "thumbs": dict(plan.thumbs),
    }


def stage_status(cfg: CurateConfig, sized: bool) -> dict[str, str]:
    """'on' or 'off: why' per stage."""
    out = {}
    for s in STAGES:
        if s not in cfg.stages:
            out[s] = "off: not selected (--curate)"
        elif s == "sync" and not cfg.syncnet_weights:
            out[s] = "off: no --syncnet-weights"
        elif s == "crop" and not sized:
            out[s] = "off: needs --size (the crop's size) and --crop=face (the default with --curate and --size)"
        else:
            out[s] = "on"
    return out


def _kept(sums: Sequence[Summary], failures: Sequence[Failure]) -> list[dict[str, Any]]:
    """The summaries' fields of the sources no stage failed on, by source id."""
    failed = {f.source for f in failures}
    return sorted((s.fields for s in sums if s.path not in failed), key=lambda f: f["source"])


def curation(sums: Sequence[Summary], failures: Sequence[Failure], root: str, cfg: CurateConfig,
             sized: bool) -> dict[str, Any]:
    """manifest.json's `curation`: stages (on/off), thresholds, shots {source: [cut s]}, dropped spans
    [{source, start_s, end_s, reason, stage}], per-stage counts (clips in, dropped), kept clips, failed (every
    source kept out, as in `sources.failed`), and the names of the contact sheet and of the per-clip values
    file (clips_jsonl). `root`: the input root the source ids are relative to."""
    fps = media.FPS
    summaries = _kept(sums, failures)
    status = stage_status(cfg, sized)
    order = [st for st in STAGES if status[st] == "on"]
    counts: dict[str, dict[str, int]] = {st: {"in": 0, "dropped": 0} for st in order}
    dropped, kept = [], 0
    for sm in summaries:
        for it in sm["items"]:
            if it["reason"] is not None:
                dropped.append({"source": sm["source"], "start_s": round(it["start"] / fps, 3),
                                "end_s": round(it["stop"] / fps, 3), "reason": it["reason"], "stage": it["stage"]})
            if it["kind"] == "span":  # short shots and shot tails: counted as the shots stage's dropped spans
                counts["shots"]["dropped_spans"] = counts["shots"].get("dropped_spans", 0) + 1
                continue
            kept += it["reason"] is None
            at = order.index(it["stage"]) if it["stage"] in order else len(order)
            for st in order[: at + 1]:
                counts[st]["in"] += 1
            if it["stage"] in counts:
                counts[it["stage"]]["dropped"] += 1
    return {
        "stages": status,
        "thresholds": {k: v for k, v in cfg.to_json().items() if k not in ("stages", "syncnet_weights")},
        "shots": {sm["source"]: sm["cuts_s"] for sm in summaries if "shots" in sm["ran"]},
        "dropped": sorted(dropped, key=lambda d: (d["source"], d["start_s"])),
        "counts": counts,
        "kept_clips": kept,
        "failed": sorted({f.line() for f in failures}),
        "contact_sheet": SHEET_NAME,
        "clips": CLIPS_NAME,
    }


def clips_jsonl(sums: Sequence[Summary], failures: Sequence[Failure]) -> bytes:
    """One JSON line per clip and dropped span of every curated source, sorted: `clip` (`<source>@<start
    frame>`, the record's clip id when kept), `start_s`, `end_s`, `kept`, `reason`, `stage` and the values the
    stages measured (face_box, crop_xy, sync_offset, sync_conf, pan_wps)."""
    import json

    lines = []
    for sm in _kept(sums, failures):
        for it in sm["items"]:
            lines.append(json.dumps({
                "clip": f"{sm['source']}@{it['start']:07d}", "start_s": round(it["start"] / media.FPS, 3),
                "end_s": round(it["stop"] / media.FPS, 3), "kept": it["reason"] is None, "reason": it["reason"],
                "stage": it["stage"], **it["values"]}, sort_keys=True))
    return "".join(line + "\n" for line in lines).encode()


def _tile(thumb: np.ndarray | None, title: str, reason: str | None) -> np.ndarray:
    import cv2

    tile = np.full((THUMB_H + LABEL_H, TILE_W, 3), 255, np.uint8)
    if thumb is not None:
        t = thumb[:, : TILE_W - 4]
        x0 = (TILE_W - t.shape[1]) // 2
        tile[:THUMB_H, x0:x0 + t.shape[1]] = t
    colour = (0, 150, 0) if reason is None else (200, 0, 0)
    cv2.rectangle(tile, (0, 0), (TILE_W - 1, THUMB_H + LABEL_H - 1), colour, 2)
    why = ["KEPT"] if reason is None else label_lines(reason, REASON_LINES)
    for i, line in enumerate([_tail_that_fits(title), *why]):
        cv2.putText(tile, line, (4, THUMB_H + 11 + 12 * i), *_FONT[:2], colour if i else (0, 0, 0), _FONT[2],
                    cv2.LINE_AA)
    return tile


_FONT = (1, 0.75, 1)  # cv2.FONT_HERSHEY_PLAIN, scale, thickness (a proportional font: lines are measured)


def _width(text: str) -> int:
    import cv2

    return cv2.getTextSize(text, *_FONT)[0][0]


def _tail_that_fits(text: str) -> str:
    """`text`, or "..." + its longest tail that fits TEXT_W (a source's name ends in what tells clips apart)."""
    if _width(text) <= TEXT_W:
        return text
    tail = text
    while tail and _width("..." + tail) > TEXT_W:
        tail = tail[1:]
    return "..." + tail


def label_lines(text: str, max_lines: int) -> list[str]:
    """`text` word-wrapped into at most `max_lines` lines of at most TEXT_W pixels in the sheet's font (a word
    wider than a line is split); when it does not fit, the last line ends with "..."."""
    lines: list[str] = []
    for word in text.split():
        if lines and _width(lines[-1] + " " + word) <= TEXT_W:
            lines[-1] += " " + word
            continue
        while _width(word) > TEXT_W:  # a long word (a path): as many characters a line as fit
            n = max(1, max(k for k in range(1, len(word) + 1) if _width(word[:k]) <= TEXT_W))
            lines.append(word[:n])
            word = word[n:]
        lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _width(last + "...") > TEXT_W:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def contact_sheet(sums: Sequence[Summary], failures: Sequence[Failure], root: str) -> bytes:
    """PNG bytes: one tile per clip and dropped span (middle frame; `<source>@<start frame>`; KEPT in green or
    the drop reason in red), sources in order, PER_ROW tiles a row; failed sources get a tile naming the stage;
    past MAX_PER_SOURCE items a source ends with one tile counting the rest."""
    import cv2

    tiles = []
    first_failure: dict[str, Failure] = {}
    for f in sorted(failures):
        first_failure.setdefault(sources.source_id(f.source, root), f)
    entries = [(sid, None, f) for sid, f in first_failure.items()]
    entries += [(sm["source"], sm, None) for sm in _kept(sums, failures)]
    for sid, sm, f in sorted(entries, key=lambda e: e[0]):
        if f is not None:
            tiles.append(_tile(None, sid, f"{f.stage}: {f.reason}"))
            continue
        for it in sm["items"][:MAX_PER_SOURCE]:
            tiles.append(_tile(sm["thumbs"].get(it["start"]), f"{sm['source']}@{it['start']:07d}", it["reason"]))
        if len(sm["items"]) > MAX_PER_SOURCE:
            more = sm["items"][MAX_PER_SOURCE:]
            tiles.append(_tile(None, sm["source"], f"+{len(more)} more ({sum(i['reason'] is None for i in more)} "
                                                   "kept): curation_clips.jsonl"))
    if not tiles:
        tiles = [_tile(None, "no sources", "nothing curated")]
    rows = [tiles[i:i + PER_ROW] for i in range(0, len(tiles), PER_ROW)]
    blank = np.full_like(tiles[0], 255)
    sheet = np.concatenate([np.concatenate(r + [blank] * (PER_ROW - len(r)), axis=1) for r in rows], axis=0)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(sheet[..., ::-1]))
    if not ok:
        raise RuntimeError("OpenCV could not encode the contact sheet PNG")
    return png.tobytes()
