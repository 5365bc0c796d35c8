"""Real-world footage kinds through data_pipeline (issue 18), each with a PyAV-written source.

Expected values are closed forms (which source frame is on screen at k/25 s, where a rotated corner
lands, a tone's frequency and onset) or PyAV decoding the file directly, never data_pipeline's own maths.
"""

import os
from fractions import Fraction

import av
import media_inputs as mi
import numpy as np
import pytest

from data_pipeline import encoders
from data_pipeline.dataset import manifest
from data_pipeline.ingest import geometry, media, sources
from data_pipeline.ingest.per_source import IngestConfig, ingest_source
from data_pipeline.prepare import run, summary
from mirage_base.errors import InputError

CFG = IngestConfig(clip_seconds=0.4)  # 10 frames


def _prepare(src, out, cfg=CFG, **kw):
    """prepare's manifest and its records [(tensors, metadata)]."""
    run(src, out, cfg, records_per_shard=64, progress=False, **kw)
    return _records(out)


def _records(out):
    from array_record.python.array_record_module import ArrayRecordReader

    from data_pipeline.dataset.records import decode_record

    m = manifest.read_manifest(out)
    recs = []
    for s in m["shards"]:
        recs += [decode_record(r) for r in ArrayRecordReader(os.path.join(out, s["path"])).read_all()]
    return m, recs


def _pixels(tensors):
    v = encoders.get_video_encoder("s2d")
    return v.to_uint8(v.decode(tensors["video"]))


# ---- display rotation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rotation, corner", [(-90, (slice(0, 8), slice(-8, None))), (90, (slice(-8, None), slice(0, 8)))]
)
def test_rotation_is_honoured_and_probe_reports_the_display_size(tmp_path, rotation, corner):
    # stored 64x48 with a white square at its top-left; display matrix = `rotation` degrees counter-clockwise:
    # -90 (a phone held upright) turns it clockwise, so the square is top-right of a 48x64 picture; 90: bottom-left
    fr = np.zeros((10, 48, 64, 3), np.uint8)
    fr[:, :8, :8] = 255
    path = mi.write(str(tmp_path / "phone.mp4"), fr, rotation=rotation)
    with av.open(path) as c:
        assert next(c.decode(video=0)).rotation == rotation  # the input is what the issue describes
    info = media.probe(path)
    assert (info.width, info.height) == (48, 64)
    k, rgb = next(media.iter_frames(info))
    assert rgb.shape == (64, 48, 3) and rgb[corner].min() > 240 and rgb.mean() < 30
    m, recs = _prepare(path, str(tmp_path / "out"))
    assert m["encoders"]["video"]["params"] and m["keys"]["video"]["shape"][1:3] == [8, 6]
    assert _pixels(recs[0][0])[0][corner].min() > 240


def _ffmpeg_matrix(clockwise_degrees, hflip=False):
    """libavutil/display.c transcribed: av_display_rotation_set(m, angle) then av_display_matrix_flip(m, hflip, 0)."""
    r = -np.radians(clockwise_degrees)
    c, s = np.cos(r), np.sin(r)
    m = [int(c * 65536), int(-s * 65536), 0, int(s * 65536), int(c * 65536), 0, 0, 0, 1 << 30]
    flip = (-1 if hflip else 1, 1, 1)
    return [v * flip[i % 3] for i, v in enumerate(m)]


def _as_displayed(img, matrix):
    """What a player shows for stored `img` [H, W, C] under display `matrix`, from the matrix's definition alone
    (libavutil/display.h, ISO/IEC 14496-12 8.3.2.3): a stored point (x, y) is shown at (x, y, 1) M, up to the
    translation that puts the picture at the origin. Each pixel centre is mapped; no rot90 or flips involved."""
    h, w = img.shape[:2]
    m = np.asarray(matrix, np.float64).reshape(3, 3)[:2, :2] / 65536.0
    ys, xs = np.mgrid[0:h, 0:w]
    pts = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1) @ m
    pts -= np.floor(pts.min(axis=0) + 1e-6)
    cols, rows = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    out = np.zeros((rows.max() + 1, cols.max() + 1, img.shape[2]), img.dtype)
    out[rows, cols] = img.reshape(-1, img.shape[2])
    return out


@pytest.mark.parametrize("name, clockwise, hflip, shown", [
    ("plain", 0, False, None), ("180", 180, False, "turned 180 degrees counter-clockwise"),
    ("mirror", 0, True, "mirrored left-right"),
    ("mirror+90", 90, True, "turned 270 degrees counter-clockwise then mirrored left-right"),
    ("mirror+270", 270, True, "turned 90 degrees counter-clockwise then mirrored left-right"),
])
def test_display_matrix_mirror_and_rotation_shown_as_a_player_shows_them(tmp_path, name, clockwise, hflip, shown):
    # stored 64x48, asymmetric: a white square top-left, a grey bar along the top to its right, a dark-grey square
    # bottom-left; a front camera's mirror has a negative determinant (PyAV's frame.rotation reads it as -180)
    fr = np.zeros((10, 48, 64, 3), np.uint8)
    fr[:, :8, :8], fr[:, :4, 24:56], fr[:, 36:, :12] = 255, 128, 64
    matrix = _ffmpeg_matrix(clockwise, hflip)
    path = mi.write(str(tmp_path / f"{name}.mp4"), fr, display_matrix=matrix)
    want = _as_displayed(fr[0], matrix)
    info = media.probe(path)
    assert (info.height, info.width) == want.shape[:2]
    _, rgb = next(media.iter_frames(info))
    assert rgb.shape == want.shape and np.abs(rgb.astype(int) - want).max() < 40, name
    assert np.abs(rgb.astype(int) - want).mean() < 2, name
    notes = [n for n in info.notes if n.startswith("display matrix")]
    assert notes == ([] if shown is None else [f"display matrix: {shown}: stored 64x48, shown {info.width}x"
                                               f"{info.height}"])
    if name in ("mirror", "mirror+90"):  # prepared records and the manifest's notes say the same
        m, recs = _prepare(path, str(tmp_path / "out"))
        enc = _pixels(recs[0][0])[0].astype(int)  # s2d 8x8 blocks: compare block means
        hh, ww = want.shape[0] // 8, want.shape[1] // 8
        blocks = want.reshape(hh, 8, ww, 8, 3).mean(axis=(1, 3))
        got = enc[: hh * 8, : ww * 8].reshape(hh, 8, ww, 8, 3).mean(axis=(1, 3))
        assert np.abs(got - blocks).max() < 12
        assert shown in str(m)


# ---- target geometry ----------------------------------------------------------------------------------


def test_mixed_sizes_are_refused_without_size_and_fitted_with_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wide = np.zeros((10, 64, 96, 3), np.uint8)
    wide[:, :, :16], wide[:, :, 16:80], wide[:, :, 80:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    mi.write(str(src / "a.mp4"), mi.coded_frames(10, 64, 64))
    mi.write(str(src / "b.mp4"), wide)
    with pytest.raises(ValueError, match=r"64x64: 1 source.*96x64: 1 source.*--size=WxH"):
        _prepare(str(src), str(tmp_path / "no_size"))
    m, recs = _prepare(str(src), str(tmp_path / "sized"), IngestConfig(clip_seconds=0.4, size=(64, 64)))
    assert m["keys"]["video"]["shape"] == [10, 8, 8, 192] and None not in m["keys"]["ref"]["shape"]
    b = next(t for t, meta in recs if meta["source"].endswith("b.mp4"))
    with av.open(str(src / "b.mp4")) as c:  # cover = no scaling here; the centre crop is columns 16..80
        want = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])[:, :, 16:80]
    np.testing.assert_array_equal(_pixels(b), want)


def test_cover_crop_to_portrait_and_a_registered_crop_policy(tmp_path):
    fr = np.zeros((10, 96, 128, 3), np.uint8)
    fr[:, :, 100:] = 255  # a bright band on the right: the "face" a custom policy centres on
    path = mi.write(str(tmp_path / "land.mp4"), fr)
    info = media.probe(path)
    g = geometry.plan((128, 96), 0, (48, 64))  # s = max(48/128, 64/96) = 2/3 -> 85x64, centre x = 18
    assert g == geometry.Geometry((85, 64), (18, 0, 48, 64))
    assert next(media.iter_frames(info, g))[1].shape == (64, 48, 3)
    geometry.register_crop("right", lambda first, target: (first.shape[1] - target[0], 0))
    m, recs = _prepare(path, str(tmp_path / "out"), IngestConfig(clip_seconds=0.4, size=(48, 64), crop="right"))
    assert m["keys"]["video"]["shape"] == [10, 8, 6, 192]
    px = _pixels(recs[0][0])[0]
    assert px[:, -10:].mean() > 240 and px[:, :8].mean() < 10  # band at 100/128 * 85 = 66 -> column 29 of 48
    with pytest.raises(ValueError, match="--crop: unknown crop policy 'nope'; registered: .*'center'.*, or face"):
        _prepare(path, str(tmp_path / "nope"), IngestConfig(clip_seconds=0.4, size=(48, 64), crop="nope"))


def test_odd_dimensions_refused_by_name_without_size_and_fitted_with_it(tmp_path):
    path = mi.write(str(tmp_path / "odd.mkv"), mi.coded_frames(10, 641, 359), pix_fmt="yuv444p")
    with pytest.raises(InputError, match=r"641x359.*spatial factor 8.*--size=WxH"):  # one line in the CLI
        _prepare(path, str(tmp_path / "a"))
    m, _ = _prepare(path, str(tmp_path / "b"), IngestConfig(clip_seconds=0.4, size=(64, 32)))
    assert m["keys"]["video"]["shape"] == [10, 4, 8, 192]
    with pytest.raises(ValueError, match=r"--size=60x32.*multiples of .* spatial factor 8"):
        _prepare(path, str(tmp_path / "c"), IngestConfig(clip_seconds=0.4, size=(60, 32)))


# ---- clip ids and collisions ----------------------------------------------------------------------------


def test_same_stem_sources_all_kept_and_shared_sidecar_refused_before_decoding(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("talk.mov", "talk.mp4", "other.mp4"):
        mi.write(str(src / name), mi.coded_frames(10), fmt="mov" if name.endswith(".mov") else None)
    m, recs = _prepare(str(src), str(tmp_path / "a"))
    assert sorted(meta["clip_id"] for _, meta in recs) == ["other.mp4@0000000", "talk.mov@0000000", "talk.mp4@0000000"]
    (src / "talk.json").write_text('{"caption": "whose?"}')  # one caption for two sources
    probed = []
    real_probe = media.probe
    monkeypatch.setattr(media, "probe", lambda p: probed.append(p) or real_probe(p))
    m, recs = _prepare(str(src), str(tmp_path / "b"))
    assert [meta["clip_id"] for _, meta in recs] == ["other.mp4@0000000"]  # the good source is kept
    failed = "\n".join(m["sources"]["failed"])
    for a, b in (("talk.mov", "talk.mp4"), ("talk.mp4", "talk.mov")):
        assert f"{src / a}: sources: its sidecar {src / 'talk.json'} is also {src / b}'s" in failed
    assert not any("talk" in p for p in probed)  # set aside before any decoding
    assert "FAILED " + str(src / "talk.mov") in summary(m, "out")
    (src / "talk.mov.json").write_text('{"caption": "the mov"}')  # a sidecar of its own resolves it
    assert sources.find_collisions(sorted(map(str, src.glob("*.m*"))), str(src)) == {}


def test_id_collisions_name_both_paths():
    files = ["gs://b/x/talk.mp4", "gs://b/y/talk.mp4"]
    assert sources.source_id(files[0], "gs://b") == "x/talk.mp4"
    bad = sources.id_collisions(files, "")  # no common root: basenames collide
    assert set(bad) == set(files) and "gs://b/y/talk.mp4" in bad[files[0]] and "gs://b/x/talk.mp4" in bad[files[1]]
    assert sources.input_root("gs://b/*/*.mp4", files) == "gs://b"  # a glob: no listing call


# ---- bounded memory ----------------------------------------------------------------------------------


def test_held_frames_do_not_grow_with_duration_and_records_are_unchanged(tmp_path):
    cfg = IngestConfig(clip_seconds=1.0)
    encs = cfg.build_encoders()
    budget = 40 * 16 * 16 * 3  # 40 frames of 16x16
    peaks, seeks = {}, {}
    for secs in (10, 160):
        path = mi.write(str(tmp_path / f"s{secs}.mp4"), mi.coded_frames(secs * 25), options={"g": "50"})
        for hb in (budget, 1 << 40):
            peak, stats = [0], {}
            recs = sorted(
                (r.clip_id, r.data)
                for r in ingest_source(path, cfg, encs, str(tmp_path), stats=stats, held_bytes=hb, held_peak=peak)
            )
            peaks[secs, hb], seeks[secs, hb] = peak[0], stats.get("ref_seeks", 0)
            assert len(recs) == secs
            if hb == budget:
                bounded = recs
            else:
                assert recs == bounded  # same bytes as holding everything
    assert abs(peaks[10, budget] - peaks[160, budget]) <= 2 and peaks[160, budget] <= 41
    assert peaks[160, 1 << 40] > 10 * peaks[160, budget]  # the unbounded path really grows
    assert seeks[160, budget] > 0 and seeks[10, 1 << 40] == 0


# ---- kinds: handled or refused by name; the good part of a mixed input is kept ------------------------


def test_mixed_bag_bad_sources_named_good_ones_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    n = 10
    tone = mi.tone(n / 25, 16000)
    mi.write(str(src / "good.mp4"), mi.coded_frames(n), audio=tone)
    comb = np.zeros((n, 16, 16, 3), np.uint8)
    comb[:, 0::2], comb[:, 1::2] = 200, 40  # two fields that disagree: combing unless deinterlaced
    mi.write(str(src / "interlaced.mp4"), comb, options={"x264-params": "interlaced=1:tff=1"}, audio=tone)
    mi.write(str(src / "tenbit.mp4"), mi.coded_frames(n), pix_fmt="yuv420p10le", audio=tone)
    mi.write(str(src / "negative.mp4"), mi.coded_frames(n + 5), pts=list(range(-5, n)), audio=tone)
    mi.write(
        str(src / "streams.mkv"), np.full((n, 16, 16, 3), 60, np.uint8), extra_video=mi.coded_frames(n),
        default_video=1, audio=tone, extra_audio=tone * 0.1,
    )
    mi.write(str(src / "silent.mp4"), mi.coded_frames(n), audio=np.zeros(6400, np.float32))
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    # a download cut short, its index (faststart) up front: what could be read is kept, with a note
    whole = mi.write(str(tmp_path / "whole.mp4"), mi.coded_frames(4 * n), container_options={"movflags": "faststart"})
    data = open(whole, "rb").read()
    (src / "cut_short.mp4").write_bytes(data[: len(data) * 9 // 10])  # ~29 of 40 frames readable
    m, recs = _prepare(str(src), str(tmp_path / "out"))
    failed = dict(line.split(": ", 1) for line in m["sources"]["failed"])
    assert set(failed) == {str(src / "broken.mp4")} and "PyAV cannot read it" in failed[str(src / "broken.mp4")]
    kept = {os.path.basename(meta["source"]): t for t, meta in recs}
    assert sorted(kept) == ["cut_short.mp4", "good.mp4", "interlaced.mp4", "negative.mp4", "silent.mp4",
                            "streams.mkv", "tenbit.mp4"]
    for name, first in (("good.mp4", 0), ("streams.mkv", 0), ("negative.mp4", 5)):
        idx = [mi.frame_index(f) for f in _pixels(kept[name])]
        assert idx == list(range(first, first + n)), (name, idx)  # negative: frames before t=0 are not shown
    for name, stream in (("tenbit.mp4", 0), ("streams.mkv", 1)):  # exactly PyAV's own decode of that stream
        with av.open(str(src / name)) as c:
            want = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[stream])])
        np.testing.assert_array_equal(_pixels(kept[name]), want)
    with av.open(str(src / "interlaced.mp4")) as c:
        raw = next(c.decode(video=0))
        assert raw.interlaced_frame and abs(int(raw.to_ndarray(format="rgb24")[1, 5, 0]) - 40) <= 2
    np.testing.assert_allclose(_pixels(kept["interlaced.mp4"]), 200, atol=2)  # the top field everywhere
    notes = "\n".join(m["sources"]["notes"])
    assert f"{src / 'streams.mkv'}: 2 video streams: using stream #1 (the default stream)" in notes
    assert f"{src / 'streams.mkv'}: 2 audio streams: using stream #2" in notes
    assert f"{src / 'silent.mp4'}: 1 clip(s) have silent audio" in notes and "good.mp4: 1 clip(s)" not in notes
    # silent audio: silent.mp4's clip and cut_short.mp4's two (no audio stream: its audio is silence)
    assert (m["stats"]["warned:silent_audio"], m["stats"]["failed_sources"], m["stats"]["sources"]) == (3, 1, 8)
    early = [x for x in m["sources"]["notes"] if "the file ends early" in x]  # it used to pass in silence
    assert len(early) == 1, early
    assert early[0].startswith(f"{src / 'cut_short.mp4'}: the file ends early: its index "
                                                   f"lists {4 * n} video frames, ")
    text = summary(m, "out")
    assert "FAILED " + str(src / "broken.mp4") in text and "note: " + str(src / "silent.mp4") in text
    assert f"{src / 'interlaced.mp4'}: interlaced: each frame keeps its top field" in notes
    # with the silence filter on, the silent clip is dropped, not warned about
    m2, _ = _prepare(str(src), str(tmp_path / "out2"), IngestConfig(clip_seconds=0.4, filters=("silence",)))
    assert m2["stats"]["dropped:filter:silence"] == 3 and "warned:silent_audio" not in m2["stats"]


# ---- what already worked stays tested: frame timing and audio resampling ------------------------------


def _on_screen(times, k):
    """Index of the source frame on screen at k / 25 s (closed form from the written timestamps)."""
    return max(j for j, t in enumerate(times) if t <= k / 25 + 1e-9)


@pytest.mark.parametrize(
    "rate, pts, tb",
    [
        (Fraction(30000, 1001), None, None),  # NTSC 29.97
        (25, [0, 30, 75, 95, 140, 200, 215, 300, 333, 390, 400, 470], Fraction(1, 1000)),  # variable rate
    ],
    ids=["29.97fps", "vfr"],
)
def test_video_resampled_by_time_to_25fps(tmp_path, rate, pts, tb):
    n = 45 if pts is None else len(pts)
    path = mi.write(str(tmp_path / "v.mp4"), mi.coded_frames(n), rate=rate, pts=pts, time_base=tb)
    times = [i / float(rate) for i in range(n)] if pts is None else [p * float(tb) for p in pts]
    got = [mi.frame_index(f) for _, f in media.iter_frames(media.probe(path))]
    assert got == [_on_screen(times, k) for k in range(len(got))]
    assert len(got) >= int(times[-1] * 25)


def _peak_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * 16000 / len(x)


@pytest.mark.parametrize(
    "rate, layout, codec, fmt",
    [(44100, "mono", "aac", None), (48000, "stereo", "aac", None), (8000, "mono", "aac", None),
     (48000, "stereo", "libopus", "webm")],
)
def test_audio_resampled_to_16k_mono(tmp_path, rate, layout, codec, fmt):
    a = mi.tone(1.0, rate, freq=440.0, amp=0.5)
    audio = np.stack([a, a]) if layout == "stereo" else a
    video = {"codec": "libvpx"} if fmt == "webm" else {}
    path = mi.write(
        str(tmp_path / f"a.{fmt or 'mp4'}"), mi.coded_frames(25), audio=audio, audio_rate=rate, layout=layout,
        audio_codec=codec, **video,
    )
    info = media.probe(path)
    wave, off = media.decode_audio_16k(path, info.t0)
    x = media.align_audio(wave, off, info.num_frames)
    assert x.ndim == 1 and len(x) == info.num_frames * media.HOP == 16000
    mid = x[2000:14000]
    assert abs(_peak_hz(mid) - 440.0) < 3
    # FFmpeg's default downmix: mono = (L + R) / sqrt(2), so two equal channels of amplitude 0.5 give 0.707
    amp = 0.5 * (np.sqrt(2) if layout == "stereo" else 1.0)
    assert abs(np.sqrt(np.mean(mid**2)) - amp / np.sqrt(2)) < 0.03


@pytest.mark.parametrize("audio_start, video_start", [(0.4, 0), (0.0, 8)], ids=["late_audio", "late_video"])
def test_late_starts_keep_the_video_clock(tmp_path, audio_start, video_start):
    # a tone that begins 0.6 s into the audio track; video frame 0 is at video_start / 25 s
    a = mi.tone(1.6, 16000, start=0.6)
    path = mi.write(str(tmp_path / "late.mp4"), mi.coded_frames(40), pts=list(range(video_start, video_start + 40)),
                    audio=a, audio_start=audio_start)
    info = media.probe(path)
    wave, off = media.decode_audio_16k(path, info.t0)
    x = media.align_audio(wave, off, info.num_frames)
    onset = np.argmax(np.abs(x) > 0.05) / 16000
    assert abs(onset - (audio_start + 0.6 - video_start / 25)) < 0.005
    # pad=False: the same samples, only as long as the 1.6 s of audio last on the video clock (AAC pads the
    # last frame: up to 1024 samples more); late_video's audio ends 8 frames before the picture does
    y = media.align_audio(wave, off, info.num_frames, pad=False)
    np.testing.assert_array_equal(y, x[:len(y)])
    assert 0 <= len(y) / 16000 - min(1.6, audio_start + 1.6 - video_start / 25) <= 1024 / 16000 + 1e-9, len(y)


@pytest.mark.slow
@pytest.mark.parametrize(
    "codec, pix_fmt, options, ext",
    [
        ("libx264", "yuv422p", {}, "mkv"),
        ("libx264", "yuv444p", {}, "mp4"),
        ("libx264", "yuvj420p", {}, "mp4"),
        ("libx264", "yuv420p10le", {"x264-params": "transfer=smpte2084:colorprim=bt2020:colormatrix=bt2020nc"}, "mp4"),
        ("libx264", "yuv422p10le", {}, "mkv"),
        ("ffv1", "bgr0", {}, "mkv"),
        ("ffv1", "gray", {}, "mkv"),
        ("mpeg4", "yuv420p", {"qscale": "2"}, "avi"),
        ("libvpx-vp9", "yuv420p", {}, "webm"),
    ],
)
def test_pixel_format_sweep_matches_pyav_decode(tmp_path, codec, pix_fmt, options, ext):
    path = mi.write(str(tmp_path / f"s.{ext}"), mi.coded_frames(10, 32, 16), codec=codec, pix_fmt=pix_fmt,
                    options=options)  # fmt: skip
    m, recs = _prepare(path, str(tmp_path / "out"))
    with av.open(path) as c:
        want = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    np.testing.assert_array_equal(_pixels(recs[0][0]), want)
    if "smpte2084" in options.get("x264-params", ""):
        assert any("HDR" in n and "without tone mapping" in n for n in m["sources"]["notes"])


def test_seeking_gives_the_streamed_pixels(tmp_path):
    """media.FrameSeeker (used past the held-frame budget) against iter_frames, frame by frame, in random order,
    on sources that exercise every conversion step: interlaced, rotated + scaled + cropped, 29.97 fps."""
    comb = mi.coded_frames(60, 32, 24).copy()
    comb[:, 1::2] //= 2
    cases = [
        (mi.write(str(tmp_path / "i.mp4"), comb, options={"x264-params": "interlaced=1:tff=1", "g": "12"}), None),
        (mi.write(str(tmp_path / "r.mp4"), mi.coded_frames(60, 40, 24), rotation=-90, options={"g": "10"}), (16, 24)),
        (mi.write(str(tmp_path / "n.mp4"), mi.coded_frames(60), rate=Fraction(30000, 1001), options={"g": "7"}), None),
    ]
    for path, size in cases:
        info = media.probe(path)
        g = geometry.plan((info.width, info.height), info.rotation, size)
        streamed = dict(media.iter_frames(info, g))
        seeker = media.FrameSeeker(info, g)
        try:
            for k in np.random.default_rng(0).permutation(len(streamed)):
                np.testing.assert_array_equal(seeker.get(int(k)), streamed[int(k)], err_msg=f"{path} frame {k}")
        finally:
            seeker.close()
        assert seeker.seeks > 1
