"""prepare --curate on footage whose truth is known by construction (tests/curation_footage.py: real faces from
scikit-image's photographs, animated with PyAV): each stage's decision (cut frames, face count, face box,
crop position, camera pan), the manifest's `curation`, the contact sheet, a failing source kept out by name,
the same bytes on the Dask runner, and the sync stage's wiring (random SyncNet weights: the values mean
nothing, the plumbing is what is tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from data_pipeline import encoders
from data_pipeline.curate.plan import CurateConfig
from data_pipeline.curate.report import LABEL_H, PER_ROW, THUMB_H, TILE_W
from data_pipeline.dataset.records import decode_record
from data_pipeline.ingest import media
from data_pipeline.ingest.per_source import IngestConfig
from data_pipeline.prepare import run
from mirage_base.errors import InputError
from tests import curation_footage as cf

SIZE = (96, 128)  # portrait training size: sources 320x180 are scaled to 228x128 and cropped 96 wide
SCALED_W = 228
CFG = IngestConfig(clip_seconds=1.0, size=SIZE, crop="face")
CURATE = CurateConfig(max_pan=0.1)  # the test pan is 0.156 frame widths/s; the speaker's face moves 0.078


def _audio_only(path: str) -> str:
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000, layout="mono")
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        fr.sample_rate, fr.pts = 16000, 0
        c.mux(s.encode(fr))
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    d = tmp_path_factory.mktemp("curation_raw")
    paths = cf.build(str(d))
    paths["novideo"] = _audio_only(str(d / "novideo.mp4"))
    return str(d), paths


@pytest.fixture(scope="module")
def curated(footage, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("curated"))
    m = run(footage[0], out, CFG, progress=False, curate=CURATE)
    return out, m


def _records(out: str, m: dict) -> dict[str, dict[str, np.ndarray]]:
    from array_record.python.array_record_module import ArrayRecordReader

    recs = {}
    for s in m["shards"]:
        r = ArrayRecordReader(os.path.join(out, s["path"]))
        for b in r.read_all():
            t, meta = decode_record(b)
            recs[meta["clip_id"]] = t
        r.close()
    return recs


def _drops(m: dict, source: str) -> list[tuple[float, float, str, str]]:
    return [(d["start_s"], d["end_s"], d["stage"], d["reason"]) for d in m["curation"]["dropped"]
            if d["source"] == source]


def test_shots_cut_where_the_footage_cuts_and_no_clip_spans_one(curated):
    out, m = curated
    cur = m["curation"]
    assert cur["shots"]["cut.mp4"] == [k / 25 for k in cf.CUTS]
    assert all(cur["shots"][s] == [] for s in ("speaker.mp4", "twoshot.mp4", "broll.mp4"))
    ids = sorted(c for c in _records(out, m) if c.startswith("cut.mp4@"))
    assert ids == ["cut.mp4@0000000", "cut.mp4@0000025", "cut.mp4@0000075", "cut.mp4@0000100"]  # inside shots
    drops = _drops(m, "cut.mp4")
    assert [d[:3] for d in drops] == [(2.0, 2.4, "shots"), (2.4, 3.0, "shots")]
    assert "shorter than the minimum clip" in drops[1][3] and drops[1][3].startswith("shot of 0.60 s")


def test_faces_keep_one_speaker_and_drop_the_rest_with_reasons(curated):
    out, m = curated
    assert _drops(m, "twoshot.mp4") == [(0.0, 1.0, "faces", "2 faces (one speaker wanted)")]
    assert _drops(m, "broll.mp4") == [(0.0, 1.0, "faces", "no face"), (1.0, 2.0, "faces", "no face")]
    (leaves,) = _drops(m, "leaves.mp4")
    assert leaves[2] == "faces" and leaves[3].startswith("face seen only in frames") and "comes and goes" in leaves[3]
    assert _drops(m, "speaker.mp4") == []
    lines = [json.loads(x) for x in open(os.path.join(out, "curation_clips.jsonl"))]
    for ln in lines:
        if ln["clip"].startswith("speaker.mp4@"):
            k = int(round(ln["start_s"] * 25)) + 12  # the clip's middle frame
            x1, y1, x2, y2 = ln["face_box"]
            assert abs((x1 + x2) / 2 - (cf.speaker_x(k) + cf.FACE_CX)) < 4
            assert abs((y1 + y2) / 2 - (20 + cf.FACE_CY)) < 4
            assert abs((x2 - x1) - cf.FACE_SIDE) < 0.25 * cf.FACE_SIDE
    counts = m["curation"]["counts"]
    assert counts["faces"]["dropped"] == 4  # twoshot, broll x2, leaves
    assert m["curation"]["stages"]["sync"] == "off: no --syncnet-weights"


def test_a_face_gone_longer_than_the_tracker_bridges_comes_and_goes_not_no_face():
    """A 50-frame clip whose one face is seen in frames 0-9 and 40-49 (gone for 30 > the 25 frames faces.link
    bridges: two tracks, each in 2 of 10 sampled frames, neither 'present'). It was dropped as `no face` even with
    --min-visible=0; it is one face that comes and goes (4 of 10 sampled frames). A lone false detection in
    face-free b-roll stays `no face`."""
    from data_pipeline.curate import speaker
    from data_pipeline.curate.plan import Clip

    box = np.array([[40.0, 20.0, 100.0, 80.0, 12.0]])
    dets = {k: box if k < 10 or k >= 40 else np.zeros((0, 5)) for k in range(0, 50, 5)}
    found = speaker.tracks(dets, [(0, 50)], every=5)
    assert len(found) == 2
    for cfg in (CurateConfig(), CurateConfig(min_visible=0.0)):
        why = speaker.judge(Clip(0, 50, None), found, 5, 180, cfg)
        assert why == "face visible in 4 of 10 sampled frames, in 2 pieces more than 25 frames apart: it comes and goes"
    stray = {k: box if k == 20 else np.zeros((0, 5)) for k in range(0, 50, 5)}
    stray_tracks = speaker.tracks(stray, [(0, 50)], every=5)
    assert speaker.judge(Clip(0, 50, None), stray_tracks, 5, 180, CurateConfig()) == "no face"


def test_a_false_face_on_the_speaker_is_not_a_second_person(footage, tmp_path):
    """Truth by construction: astronaut.png whole is one person (kept), the two-shot is two (dropped). The Haar
    cascade also fires on her suit at this scale, in most sampled frames: counted as a face (other_support=0,
    the rule before) it drops her clip as "2 faces"; by its support (faces.detect_scored) it is not a person."""
    import shutil

    d = tmp_path / "src"
    d.mkdir()
    cf.astronaut_whole(str(d / "astronaut.mp4"))
    shutil.copy(footage[1]["twoshot"], d / "twoshot.mp4")
    cfg = IngestConfig(clip_seconds=1.0, size=SIZE)

    def drops(other_support: float) -> tuple[dict, list]:
        out = tmp_path / f"o{other_support}"
        m = run(str(d), str(out), cfg, progress=False,
                curate=CurateConfig(stages=("faces",), other_support=other_support))
        lines = {ln["clip"]: ln for ln in map(json.loads, open(out / "curation_clips.jsonl"))}
        return lines, [(x["source"], x["reason"]) for x in m["curation"]["dropped"]]

    lines, dropped = drops(CurateConfig().other_support)
    assert dropped == [("twoshot.mp4", "2 faces (one speaker wanted)")]
    assert lines["astronaut.mp4@0000000"]["weak_faces"] == 1  # the suit's "face" was there, and set aside
    x1, y1, x2, y2 = lines["astronaut.mp4@0000000"]["face_box"]
    assert 150 < (x1 + x2) / 2 < 200 and 60 < (y1 + y2) / 2 < 110  # her face (390/512 of x 224, y 113), not the suit
    from data_pipeline.prepare import NoClipsError

    with pytest.raises(NoClipsError, match="curation dropped 2 clip"):  # both clips, so no dataset: the report
        drops(0.0)
    before = [json.loads(x) for x in open(tmp_path / "o0.0" / "curation_clips-no-clips.jsonl")]
    assert [(x["clip"], x["reason"]) for x in before] == [("astronaut.mp4@0000000", "2 faces (one speaker wanted)"),
                                                          ("twoshot.mp4@0000000", "2 faces (one speaker wanted)")]


def test_face_crop_follows_the_face_smoothly(curated, footage):
    """Where each record's frame sits in the scaled source frame is found by exact search (the s2d encoder is
    lossless), and compared with where the face is by construction."""
    out, m = curated
    recs = _records(out, m)
    venc = encoders.from_manifest(m, "video")
    info = media.probe(footage[1]["speaker"])
    from data_pipeline.ingest import geometry

    scaled = dict(media.iter_frames(info, geometry.Geometry((SCALED_W, 128), None)))
    for start in (0, 25, 50):
        frames = venc.to_uint8(venc.decode(recs[f"speaker.mp4@{start:07d}"]["video"]))
        xs = []
        for i, fr in enumerate(frames):
            full = scaled[start + i].astype(np.int32)
            err = [np.abs(full[:, x:x + SIZE[0]] - fr).sum() for x in range(SCALED_W - SIZE[0] + 1)]
            assert min(err) == 0
            xs.append(int(np.argmin(err)))
        xs = np.asarray(xs)
        face = (cf.speaker_x(start + np.arange(25)) + cf.FACE_CX) * SCALED_W / cf.W
        assert np.abs(xs + SIZE[0] / 2 - face)[5:-5].max() <= 4  # centred on the face (ends: smoothing lag)
        assert np.abs(np.diff(xs)).max() <= 1  # no jitter: the window glides


def test_motion_drops_the_camera_pan_only(curated):
    out, m = curated
    (pan,) = _drops(m, "pan.mp4")
    assert pan[2] == "motion" and pan[3].startswith("camera pan 0.15")  # 2 px/frame x 25 / 320 = 0.156
    lines = {ln["clip"]: ln for ln in map(json.loads, open(os.path.join(out, "curation_clips.jsonl")))}
    assert all(lines[f"speaker.mp4@{s:07d}"]["pan_wps"] < 0.02 for s in (0, 25, 50))


def test_manifest_curation_and_contact_sheet(curated):
    import cv2

    out, m = curated
    cur = m["curation"]
    assert m["num_records"] == cur["kept_clips"] == 8  # speaker 3, cut 4, mute 1
    assert cur["thresholds"]["max_pan"] == 0.1 and cur["stages"]["shots"] == "on"
    assert any(f.startswith(os.path.join(os.path.dirname(f), "novideo.mp4") + ": curate:probe")
               for f in m["sources"]["failed"])
    assert m["stats"]["failed_sources"] == 1
    sheet = cv2.imread(os.path.join(out, cur["contact_sheet"]))
    tiles = sum(1 for ln in open(os.path.join(out, "curation_clips.jsonl"))) + 1  # + the failed source
    rows = -(-tiles // PER_ROW)
    assert sheet.shape == (rows * (THUMB_H + LABEL_H), PER_ROW * TILE_W, 3)
    red = [(sheet[r * (THUMB_H + LABEL_H) + 1, c * TILE_W + 1] == [0, 0, 200]).all()
           for r in range(rows) for c in range(PER_ROW)]
    assert sum(red) == len(cur["dropped"]) + 1  # a red frame per dropped clip or span, and the failed source


def test_curation_decodes_each_source_once(footage, tmp_path, monkeypatch):
    """The shots, faces and motion stages share one decode of the source (curate.decode): in a whole
    `prepare --curate` run (local runner, in this process) the frames media.iter_frames yields for the source
    are curation's one pass + ingest's one pass. Before the shared pass each of the three stages decoded it
    itself (4 passes)."""
    yielded: dict[str, int] = {}
    passes: list[str] = []
    real = media.iter_frames

    def counting(info, geometry=None):
        passes.append(info.path)
        for k, rgb in real(info, geometry):
            yielded[info.path] = yielded.get(info.path, 0) + 1
            yield k, rgb

    monkeypatch.setattr(media, "iter_frames", counting)
    src = footage[1]["speaker"]
    m = run(src, str(tmp_path / "o"), CFG, progress=False, curate=CURATE)
    assert m["num_records"] == 3
    n = media.probe(src).num_frames
    assert yielded == {src: 2 * n}, (yielded, n)
    assert passes == [src, src]  # curation's pass, ingest's pass


def test_dask_workers_curate_to_the_local_runners_bytes(footage, curated, tmp_path):
    """prepare --curate on Beam's DaskRunner with 2 worker processes (data_pipeline.engine): the shards, manifest,
    contact sheet and per-clip values are the local runner's, byte for byte (the failing novideo.mp4 included)."""
    import hashlib

    def files(d):
        return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}

    out = str(tmp_path / "dask")
    run(footage[0], out, CFG, progress=False, curate=CURATE, runner="dask", workers=2)
    got, want = files(out), files(curated[0])
    assert {"manifest.json", "curation.png", "curation_clips.jsonl"} <= set(want)
    assert got == want


def test_missing_syncnet_weights_stop_prepare_before_decoding(footage, tmp_path):
    with pytest.raises(InputError, match=r"^--syncnet-weights=/nope/w.model: no such file"):
        run(footage[0], str(tmp_path / "o"), CFG, progress=False,
            curate=CurateConfig(syncnet_weights="/nope/w.model"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match=r"^--syncnet-weights=.*: a directory, not a file"):  # was 'no such file'
        run(footage[0], str(tmp_path / "o"), CFG, progress=False, curate=CurateConfig(syncnet_weights=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", f"--input={footage[0]}",
                        f"--output={tmp_path}/o", "--curate", "--syncnet-weights=/nope/w.model"],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("prepare: --syncnet-weights=/nope/w.model: no such file")
    assert len([ln for ln in r.stderr.splitlines() if "Traceback" in ln]) == 0
    # a file that is not SyncNet's state dict: refused by the scorer's own reader (`mirage_jax.eval.sync
    # --check_weights`, a child process) before any decoding; it used to run every stage and fail each source
    # at sync. tests/test_syncnet.py covers the reader's messages
    notes = tmp_path / "notes.model"
    notes.write_text("not weights")
    with pytest.raises(InputError, match=r"^--syncnet-weights=.*notes.model: not a PyTorch state dict"):
        run(footage[0], str(tmp_path / "o"), CFG, progress=False, curate=CurateConfig(syncnet_weights=str(notes)))
    assert not (tmp_path / "o").exists()


def test_unknown_stage_and_crop_without_curation_are_refused(footage, tmp_path):
    from data_pipeline.curate.plan import parse_stages

    with pytest.raises(InputError, match="unknown stage"):
        parse_stages("shots,lips")
    with pytest.raises(InputError, match="needs 'faces'"):
        parse_stages("crop")
    with pytest.raises(InputError, match="--crop=face: the face crop is a curation stage"):
        run(footage[0], str(tmp_path / "o"), CFG, progress=False)


@pytest.mark.slow
def test_sync_stage_scores_shifts_and_names_a_source_without_audio(footage, tmp_path):
    """Random SyncNet weights (saved to safetensors) through the real scorer command: offsets and confidences
    recorded per clip, the audio of each kept clip read -offset frames later, the mute source kept out by name."""
    from safetensors.numpy import save_file

    from mirage_jax.eval.syncnet import expected_shapes

    rng = np.random.default_rng(0)
    w = {k: (rng.uniform(0.5, 2.0, s) if k.endswith("running_var") else 0.05 * rng.standard_normal(s))
         .astype(np.float32) for k, s in expected_shapes().items()}
    save_file(w, str(tmp_path / "syncnet.safetensors"))
    out = str(tmp_path / "out")
    cur = CurateConfig(stages=("faces", "crop", "sync"), syncnet_weights=str(tmp_path / "syncnet.safetensors"),
                       min_confidence=0.0, max_offset=15)
    m = run(os.path.join(footage[0], "[ms]*.mp4"), out, CFG, progress=False, curate=cur)
    assert m["curation"]["stages"]["sync"] == "on"
    assert [f.split(": ", 1)[1] for f in m["sources"]["failed"]] == [
        "curate:sync: no audio stream: SyncNet scores speech against the face"]
    lines = [json.loads(x) for x in open(os.path.join(out, "curation_clips.jsonl"))]
    assert len(lines) == 3 and all(isinstance(ln["sync_offset"], int) and "sync_conf" in ln for ln in lines)
    info = media.probe(footage[1]["speaker"])
    raw, off = media.decode_audio_16k(footage[1]["speaker"], info.t0)
    audio = media.align_audio(raw, off, info.num_frames)
    aenc = encoders.from_manifest(m, "audio")
    recs = _records(out, m)
    for ln in lines:
        s = int(round(ln["start_s"] * 25)) - ln["sync_offset"]
        wave = np.zeros(25 * media.HOP, np.float32)
        lo, hi = max(0, s), min(info.num_frames, s + 25)
        wave[(lo - s) * media.HOP:(hi - s) * media.HOP] = audio[lo * media.HOP:hi * media.HOP]
        np.testing.assert_allclose(recs[ln["clip"]]["audio"], aenc.encode(wave, num_frames=25), atol=1e-5)


def test_curation_that_keeps_nothing_says_where_to_look_and_keeps_an_earlier_output(footage, tmp_path):
    """A curated run that keeps no clip writes its report under the no-clips names and leaves an earlier complete
    output (manifest, shards, report) byte for byte as it was; rerunning the first (up to date) removes the
    no-clips report (it stayed); a later plain run into the same directory removes every curation report its
    manifest does not describe."""
    from data_pipeline.curate.report import NO_CLIPS_NAMES
    from data_pipeline.prepare import NoClipsError

    out = tmp_path / "o"
    speaker = footage[1]["speaker"]
    assert run(speaker, str(out), CFG, progress=False, curate=CURATE)["num_records"] == 3
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"manifest.json", "curation.png", "curation_clips.jsonl"} <= set(before)
    with pytest.raises(NoClipsError, match=r"curation dropped 2 clip\(s\) or span\(s\): see .*curation-no-clips.png"):
        run(os.path.join(footage[0], "broll.mp4"), str(out), IngestConfig(clip_seconds=1.0, size=SIZE),
            progress=False, curate=CurateConfig(stages=("faces",)))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before) | set(NO_CLIPS_NAMES.values())
    assert {n: after[n] for n in before} == before  # the earlier output, report included, is untouched
    assert b"no face" in after[NO_CLIPS_NAMES["curation_clips.jsonl"]]
    run(speaker, str(out), CFG, progress=False, curate=CURATE)  # the first run's again: up to date, and the
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no-clips report it does not describe goes
    m = run(speaker, str(out), IngestConfig(clip_seconds=1.0, size=SIZE), progress=False)
    assert "curation" not in m
    assert not {"curation.png", "curation_clips.jsonl", *NO_CLIPS_NAMES.values()} & set(os.listdir(out))


def test_contact_sheet_labels_wrap_on_words_and_fit_the_tile():
    """Reasons were cut every 25 characters (mid-word, the 25th character past the tile edge in this
    proportional font); now each line is measured with OpenCV and words are kept whole."""
    import cv2

    from data_pipeline.curate.report import REASON_LINES, TEXT_W, label_lines

    def width(t: str) -> int:
        return cv2.getTextSize(t, cv2.FONT_HERSHEY_PLAIN, 0.75, 1)[0][0]

    for reason in ["shot tail of 1.36 s is shorter than the minimum clip (2.00 s)",
                   "near-static: mean frame difference 0.000 < 0.25", "2 faces (one speaker wanted)"]:
        lines = label_lines(reason, REASON_LINES)
        assert " ".join(lines) == reason and all(width(x) <= TEXT_W for x in lines), lines
    long = "curate:probe: PyAV cannot read it ([Errno 1094995529] Invalid data found when processing input)"
    lines = label_lines(long, REASON_LINES)
    assert len(lines) == REASON_LINES and lines[-1].endswith("...") and all(width(x) <= TEXT_W for x in lines)
    assert long.startswith(" ".join(lines)[:-3].rstrip())
    path = "a/very/long/folder/name/that/never/breaks/on/a/space/talk.mp4"
    lines = label_lines(path, 5)
    assert "".join(lines) == path and len(lines) > 1 and all(width(x) <= TEXT_W for x in lines)


# curation x shape buckets: two clip lengths x a portrait and a landscape size
BUCKET_SECONDS, PORTRAIT, LANDSCAPE = (0.4, 0.8), (48, 64), (64, 48)


def _portrait_speaker(path: str, frames: int = 100) -> str:
    """A portrait (180 x 320) speaker: the astronaut's head moving down 1 px a frame from y = 40 over rotated brick."""
    im = cf.images()
    wall = np.ascontiguousarray(np.rot90(im["brick"])[:320])
    rng = np.random.default_rng(2)
    media.write_mp4(path, np.stack([cf.paste(wall, im["head"], 18, 40 + k // 2) for k in range(frames)]),
                    (0.1 * rng.standard_normal(frames * media.HOP)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def curated_buckets(footage, tmp_path_factory):
    """`prepare --curate --clip-seconds=0.4,0.8 --size=48x64,64x48` (buckets.run with what the CLI passes) over
    the speaker, the cut, the two-shot (landscape) and a portrait speaker."""
    import shutil

    from data_pipeline import buckets

    d = tmp_path_factory.mktemp("bucket_raw")
    for n in ("speaker", "cut", "twoshot"):
        shutil.copy(footage[1][n], d / f"{n}.mp4")
    _portrait_speaker(str(d / "portrait.mp4"))
    out = str(tmp_path_factory.mktemp("curated_buckets"))
    top = buckets.run(str(d), out, IngestConfig(crop="face"), BUCKET_SECONDS, [PORTRAIT, LANDSCAPE],
                      progress=False, curate=CURATE)
    return out, top


def test_curation_in_every_shape_bucket_respects_cuts_and_crops_on_the_face(curated_buckets):
    """Each bucket is curated: no clip spans footage's cuts, the two-shot is dropped, the records are exactly the
    kept clips, and the face crop sits on the face by construction (landscape: the speaker's x; portrait: y)."""
    from data_pipeline.ingest import geometry

    out, top = curated_buckets
    names = {f"{s:g}s_{w}x{h}" for s in BUCKET_SECONDS for w, h in (PORTRAIT, LANDSCAPE)}
    assert {b["name"] for b in top["buckets"]} == names
    for b in top["buckets"]:
        sub = os.path.join(out, b["path"])
        m = json.load(open(os.path.join(sub, "manifest.json")))
        frames = round(b["seconds"] * 25)
        assert m["curation"]["stages"]["crop"] == "on" and b["clip_frames"] == frames
        lines = [json.loads(x) for x in open(os.path.join(sub, "curation_clips.jsonl"))]
        kept = sorted(ln["clip"] for ln in lines if ln["kept"])
        assert sorted(_records(sub, m)) == kept and kept
        landscape = tuple(b["size"]) == LANDSCAPE
        assert {ln["clip"].split("@")[0] for ln in lines if ln["kept"]} == (
            {"speaker.mp4", "cut.mp4"} if landscape else {"portrait.mp4"})
        for k0 in (int(c.split("@")[1]) for c in kept if c.startswith("cut.mp4@")):
            assert not any(k0 < cut < k0 + frames for cut in cf.CUTS), (b["name"], k0)
        assert any(int(c.split("@")[1]) >= cf.CUTS[1] for c in kept if c.startswith("cut.mp4@")) == landscape
        if landscape:
            assert {d["reason"] for d in m["curation"]["dropped"] if d["source"] == "twoshot.mp4"
                    and d["stage"] != "shots"} == {"2 faces (one speaker wanted)"}  # (its 25 frames' tail: shots)
        src_size = (cf.W, cf.H) if landscape else (180, 320)
        sw, sh = geometry.cover_size(src_size, tuple(b["size"]))
        moved = set()
        for ln in lines:
            if not ln["kept"] or ln["clip"].split("@")[0] not in ("speaker.mp4", "portrait.mp4"):
                continue
            k = int(ln["clip"].split("@")[1]) + frames // 2  # the clip's middle frame
            if landscape:  # the window's x follows the face's centre, clamped to the frame
                face, span, lim = (cf.speaker_x(k) + cf.FACE_CX) * sw / cf.W, b["size"][0], sw - b["size"][0]
                got = ln["crop_xy"][0]
            else:
                face, span, lim = (40 + k // 2 + cf.FACE_CY) * sh / 320, b["size"][1], sh - b["size"][1]
                got = ln["crop_xy"][1]
            assert abs(got - min(max(face - span / 2, 0), lim)) <= 2, (b["name"], ln)
            moved.add(got)
        assert max(moved) - min(moved) >= 4, (b["name"], moved)  # the window moved with the face


@pytest.mark.slow
def test_training_reads_a_curated_bucketed_dataset(curated_buckets, tmp_path):
    """The tiny model trains 2 steps on the curated buckets of both sizes (one compiled step each)."""
    from mirage_jax.train.loop import Trainer
    from train_cli import fast_config, read_metrics

    out, top = curated_buckets
    batch = {b["name"]: (8 if b["seconds"] == 0.4 and b["num_records"] >= 8 else 0) for b in top["buckets"]}
    assert sum(1 for v in batch.values() if v) == 2, top["buckets"]  # 0.4 s at both sizes
    cfg = fast_config(data__source=out, data__worker_count=0, train__steps=2, checkpoint__save_every=2,
                      metrics__tensorboard=False, data__bucket_batch=",".join(f"{k}={v}" for k, v in batch.items()))
    Trainer(cfg, str(tmp_path / "w")).run()
    rows = [r for r in read_metrics(str(tmp_path / "w")) if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert {r["bucket"] for r in rows} <= {k for k, v in batch.items() if v}
