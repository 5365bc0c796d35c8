"""Ingest: synthesize -> prepare -> load returns exactly what the encoders give for the decoded mp4s;
reruns change nothing; crashes and damaged shards behave as docs/data_pipeline.md says."""

import hashlib
import json
import os
import shutil

import av
import numpy as np
import pytest

from data_pipeline import encoders
from data_pipeline.dataset import manifest
from data_pipeline.dataset.records import decode_record
from data_pipeline.ingest import tfio_backend
from data_pipeline.ingest.per_source import IngestConfig
from data_pipeline.loader.examples import CorruptRecordError
from data_pipeline.loader.grain_loader import make_loader
from data_pipeline.prepare import run
from data_pipeline.synthesize import synthesize
from data_pipeline.synthetic import speech

pytestmark = pytest.mark.skipif(
    not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)"
)
CFG = IngestConfig(clip_seconds=2.0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    synthesize(str(out), clips=3, seconds=3.0, seed=3, size=(64, 64), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared"))
    run(raw, out, CFG, records_per_shard=2, progress=False)
    return out


def _files(d):
    return {
        n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))
    }


def _shard(d, i=0):
    """The path of the i-th shard manifest.json lists (names carry the run's fingerprint: manifest.shard_name)."""
    return os.path.join(d, manifest.read_manifest(d)["shards"][i]["path"])


def _reference(mp4, start, length, ref_frame):
    """What the records must hold, computed straight from PyAV and the encoders (no data_pipeline.ingest.media)."""
    with av.open(mp4) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(mp4) as c:
        rs = av.AudioResampler(format="flt", layout="mono", rate=16000)
        audio = np.concatenate(
            [o.to_ndarray().reshape(-1) for f in c.decode(audio=0) for o in rs.resample(f)]
        )
    side = json.load(open(mp4[:-4] + ".json"))
    v, a, t = (
        encoders.get_video_encoder("s2d"),
        encoders.get_audio_encoder("logmel"),
        encoders.get_text_encoder("hash"),
    )
    text, mask = t.encode(side["caption"])
    return {
        "video": v.encode(frames[start : start + length]),
        "audio": a.encode(audio[start * 640 : (start + length) * 640]),
        "text": text,
        "text_mask": mask.astype(bool),
        "ref": v.encode(frames[ref_frame][None]),
        "mouth": np.asarray(side["mouth"][start : start + length], np.float32),
    }


def test_round_trip_synthesize_prepare_load_is_exact(raw, prepared):
    m = manifest.read_manifest(prepared)
    assert m["num_records"] == 3 and [s["num_records"] for s in m["shards"]] == [2, 1]
    assert m["keys"]["video"] == {"shape": [50, 8, 8, 192], "dtype": "float32"}
    assert m["encoders"]["video"]["name"] == "s2d" and m["encoders"]["audio"]["params"]["n_mels"] == 80
    ds = make_loader(
        prepared, global_batch_size=1, shuffle=False, num_epochs=1, process_index=0, process_count=1
    )
    batches = list(iter(ds))
    assert len(batches) == 3
    # records come out in shard order (sorted clip ids): clip_00000, clip_00001, clip_00002
    for i, b in enumerate(batches):
        mp4 = os.path.join(raw, f"clip_{i:05d}.mp4")
        ref_time = float(b["ref_time"][0])
        assert b["ref_mask"][0] and (ref_time < 0 or ref_time >= 50) and ref_time == int(ref_time)
        want = _reference(mp4, 0, 50, int(ref_time))
        for k, v in want.items():
            np.testing.assert_array_equal(b[k][0], v, err_msg=f"clip {i} key {k}")
        assert b["video_mask"].all() and b["audio_mask"].all() and b["mouth_valid"].all()
        # and the video latents decode back to the decoded mp4's pixels exactly
        v = encoders.get_video_encoder("s2d")
        with av.open(mp4) as c:
            first = next(c.decode(video=0)).to_ndarray(format="rgb24")
        np.testing.assert_array_equal(v.to_uint8(v.decode(b["video"][0]))[0], first)


def test_rerun_changes_nothing_and_force_rewrites_identical_bytes(raw, prepared, tmp_path):
    before = _files(prepared)
    mtimes = {n: os.stat(os.path.join(prepared, n)).st_mtime_ns for n in before}
    killed = os.path.join(prepared, ".tmp-data-00000-of-00001-0123abcd.array_record.dead")  # a kill -9's leftover
    open(killed, "wb").write(b"half a shard")
    run(raw, prepared, CFG, records_per_shard=2, progress=False)
    assert {n: os.stat(os.path.join(prepared, n)).st_mtime_ns for n in before} == mtimes  # nothing done
    assert not os.path.exists(killed)  # but the temporary file is removed (it stayed)
    run(raw, prepared, CFG, records_per_shard=2, progress=False, force=True)
    assert _files(prepared) == before
    other = str(tmp_path / "again")  # a fresh directory gives the same bytes too
    run(raw, other, CFG, records_per_shard=2, progress=False)
    assert _files(other) == before


def test_an_output_of_format_v1_stays_up_to_date_and_force_rewrites_it_as_v2(raw, prepared, tmp_path, monkeypatch):
    """Upgrading does not rewrite a dataset a trainer may be reading: a v1 output (as the code before format v2
    wrote it: plain records in ArrayRecord's own zstd chunks, v1 in the manifest and in the run's fingerprint) is
    up to date for the same inputs and options; --force rewrites it, as the same bytes as a v2 run's."""
    from array_record.python.array_record_module import ArrayRecordReader

    from data_pipeline.dataset import records

    old = str(tmp_path / "v1")
    with monkeypatch.context() as m:
        m.setattr(manifest, "FORMAT", "mirage_jax.aroll.v1")
        m.setattr(manifest, "WRITER_OPTIONS", "group_size:1")
        m.setattr(records, "compress", lambda data: data)
        run(raw, old, CFG, records_per_shard=2, progress=False)
    reader = ArrayRecordReader(_shard(old))
    assert "zstd:3" in reader.writer_options_string() and reader.read([0])[0][:4] != b"\x28\xb5\x2f\xfd"
    assert manifest.read_manifest(old)["format"] == "mirage_jax.aroll.v1"
    mtimes = {n: os.stat(os.path.join(old, n)).st_mtime_ns for n in os.listdir(old)}
    run(raw, old, CFG, records_per_shard=2, progress=False)
    assert {n: os.stat(os.path.join(old, n)).st_mtime_ns for n in os.listdir(old)} == mtimes  # nothing done
    run(raw, old, CFG, records_per_shard=2, progress=False, force=True)
    assert _files(old) == _files(prepared)


def test_crash_leftovers_are_never_read_and_are_cleaned(raw, prepared, tmp_path):
    out = str(tmp_path / "crashed")
    shutil.copytree(prepared, out)
    open(os.path.join(out, ".tmp-data-00000-of-00002.array_record.dead"), "wb").write(b"half a shard")
    shutil.copy(_shard(out, 1), os.path.join(out, "data-00009-of-00010.array_record"))
    ds = make_loader(
        os.path.join(out, "*.array_record"),
        global_batch_size=1,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
    )
    assert len(ds.shards.paths) == 2 and len(list(iter(ds))) == 3  # the unlisted copy is ignored
    os.remove(os.path.join(out, manifest.MANIFEST))  # a crash before the manifest: nothing is loadable
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        make_loader(out, global_batch_size=1, process_index=0, process_count=1)
    run(raw, out, CFG, records_per_shard=2, progress=False)
    assert _files(out) == _files(prepared)  # stale files gone, same bytes


def test_truncated_shard_is_refused_naming_it(prepared, tmp_path):
    out = str(tmp_path / "trunc")
    shutil.copytree(prepared, out)
    shard = _shard(out)
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    for verify in ("size", "sha256"):
        with pytest.raises(ValueError, match=r"data-00000-of-00002-[0-9a-f]{8}\.array_record.*truncated"):
            make_loader(out, global_batch_size=1, verify=verify, process_index=0, process_count=1)


def test_damaged_local_shard_stops_training_before_any_state_naming_shard_and_record(prepared, tmp_path):
    """The train CLI on a local dataset with a damaged shard: one DATA ERROR line naming the shard and its first
    unreadable record, exit 2, no traceback, nothing written in the workdir (the check runs before the state is
    built or restored). A truncated shard is named the same way."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "damaged")
    shutil.copytree(prepared, out)
    shard = _shard(out)
    data = bytearray(open(shard, "rb").read())
    mid = len(data) // 2  # inside the second record's chunk, as in the test below
    data[mid : mid + 64] = bytes(64)
    open(shard, "wb").write(bytes(data))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}

    def train():
        return subprocess.run(
            [sys.executable, "-m", "mirage_jax.train", "--config=configs/tiny.py:fast",
             f"--workdir={tmp_path / 'run'}", f"--config.data.source={out}"],
            cwd=root, env=env, capture_output=True, text=True, timeout=300)

    r = train()
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert err[-1].startswith("DATA ERROR: ") and shard in err[-1] and "record 1 of 2 is unreadable" in err[-1], err
    assert not (tmp_path / "run" / "checkpoints").exists()
    open(shard, "wb").write(bytes(data[: len(data) // 2]))
    r = train()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("DATA ERROR: ") and "truncated" in last and shard in last, last


def test_corrupted_record_is_skipped_within_budget_then_named(prepared, tmp_path):
    out = str(tmp_path / "corrupt")
    shutil.copytree(prepared, out)
    shard = _shard(out)
    data = bytearray(open(shard, "rb").read())
    mid = len(data) // 2  # inside the second record's compressed chunk; same size, different bytes
    data[mid : mid + 64] = bytes(64)
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="sha256.*corrupted"):
        make_loader(out, global_batch_size=1, process_index=0, process_count=1)
    ok = make_loader(
        out,
        global_batch_size=1,
        shuffle=False,
        num_epochs=1,
        verify="size",
        corrupt_budget=1,
        process_index=0,
        process_count=1,
    )
    assert len(list(iter(ok))) == 3  # 2 good records + 1 from the next epoch (the corrupt one skipped)
    strict = make_loader(
        out,
        global_batch_size=1,
        shuffle=False,
        verify="size",
        corrupt_budget=0,
        process_index=0,
        process_count=1,
    )
    with pytest.raises(CorruptRecordError, match=r"data-00000-of-00002-[0-9a-f]{8}\.array_record record 1\b"):
        list(iter(strict))


def test_tfio_audio_backend_matches_pyav(raw, prepared, tmp_path):
    ok, why = tfio_backend.available()
    if not ok:
        pytest.skip(f"tensorflow-io backend not available: {why}")
    out = str(tmp_path / "tfio")
    run(raw, out, IngestConfig(clip_seconds=2.0, audio_backend="tfio"), records_per_shard=2, progress=False)
    for i in range(2):
        from array_record.python.array_record_module import ArrayRecordReader

        a, b = ArrayRecordReader(_shard(prepared, i)), ArrayRecordReader(_shard(out, i))
        for ra, rb in zip(a.read_all(), b.read_all(), strict=True):
            ta, tb = decode_record(ra)[0], decode_record(rb)[0]
            np.testing.assert_array_equal(ta["video"], tb["video"])
            # different resamplers and 16-bit WAV exchange: same features up to small differences
            assert np.corrcoef(ta["audio"].ravel(), tb["audio"].ravel())[0, 1] > 0.99


def test_full_disk_is_one_line_and_leaves_no_temporary_files(raw, tmp_path, monkeypatch, caplog):
    """ENOSPC while a shard is written (simulated: the ArrayRecord writer fails after one record): one line
    naming the output and the cause, Beam's traceback log suppressed, no temp shard and no manifest left."""
    import errno

    from data_pipeline.prepare import OutputWriteError

    real = manifest.ArrayRecordWriter

    class FullDisk:
        def __init__(self, path, options):
            self.w, self.n = real(path, options), 0

        def write(self, r):
            if self.n == 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.w.write(r)
            self.n += 1

        def close(self):
            self.w.close()

    monkeypatch.setattr(manifest, "ArrayRecordWriter", FullDisk)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="No space"):  # the writer alone removes its partial temp shard
        manifest.write_shard([b"a", b"b"], str(tmp_path), "x.array_record")
    assert [p.name for p in tmp_path.iterdir()] == []
    with pytest.raises(OutputWriteError) as e:
        run(raw, str(out), CFG, records_per_shard=2, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "No space left on device (ENOSPC)" in msg
    assert e.value.exit_code == 4
    assert sorted(os.listdir(out)) == [] and not any(r.exc_info for r in caplog.records)


def test_a_failed_run_leaves_an_earlier_output_whole(raw, prepared, tmp_path, monkeypatch):
    """An earlier complete output, then a run with other options into the same directory that fails on its
    second shard (simulated ENOSPC): every file of the earlier output keeps its bytes (it verifies and loads),
    and the failed run leaves nothing behind. It used to rename its first shard over the earlier output's
    data-00000-of-00002 (same name, other bytes) before failing, so the old manifest listed a shard it no longer
    described."""
    import errno

    from data_pipeline.prepare import OutputWriteError

    earlier = str(tmp_path / "earlier")
    shutil.copytree(prepared, earlier)
    real, opened = manifest.ArrayRecordWriter, []

    def second_fails(path, options):
        opened.append(path)
        if len(opened) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, options)

    monkeypatch.setattr(manifest, "ArrayRecordWriter", second_fails)
    with pytest.raises(OutputWriteError, match="No space left"):  # 1 s clips: 9 records, 2 shards (5 + 4)
        run(raw, earlier, IngestConfig(clip_seconds=1.0), records_per_shard=5, progress=False)
    assert len(opened) == 2
    assert _files(earlier) == _files(prepared)
    m = manifest.read_manifest(earlier)
    assert all(manifest.verify_shard(earlier, s, "sha256") is None for s in m["shards"])


def test_a_ctrl_c_after_the_manifest_is_committed_keeps_the_run(raw, prepared, tmp_path, monkeypatch):
    """A Ctrl-C / SIGTERM that reaches prepare after its Manifest step has written manifest.json (on a Dask worker
    that is a moment before the launcher hears of it; simulated here by the step raising KeyboardInterrupt right
    after writing it): the run is complete, so it is kept and reported as such, and the earlier output's files
    are gone. It was reported as interrupted ('no new manifest.json was written', exit 130/143) while the earlier
    output had already been replaced."""
    from data_pipeline import prepare

    out = str(tmp_path / "late")
    shutil.copytree(prepared, out)
    real = prepare._finish

    def finish_then_ctrl_c(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_finish", finish_then_ctrl_c)
    m = run(raw, out, IngestConfig(clip_seconds=1.0), records_per_shard=5, progress=False)
    assert m["num_records"] == 9 and m == manifest.read_manifest(out)
    assert sorted(os.listdir(out)) == sorted([manifest.MANIFEST, *(s["path"] for s in m["shards"])])
    assert all(manifest.verify_shard(out, s, "sha256") is None for s in m["shards"])


def test_switching_between_one_shape_and_buckets_leaves_only_the_new_layout(raw, tmp_path):
    """One output directory prepared as one shape, then as buckets of 1 s and 2 s clips, then of 1 s only, then
    as one shape again: after each, the directory holds exactly what its manifest.json describes (the earlier
    layout's top-level shards, or bucket directories, were left behind and piled up)."""
    from data_pipeline import buckets

    out = tmp_path / "o"

    def layout():
        return sorted(p.name for p in out.iterdir())

    one = run(raw, str(out), CFG, records_per_shard=2, progress=False)
    assert layout() == sorted([manifest.MANIFEST, *(s["path"] for s in one["shards"])])
    two = buckets.run(raw, str(out), CFG, [1.0, 2.0], None, records_per_shard=2, progress=False)
    names = [b["path"] for b in two["buckets"]]
    assert len(names) == 2 and layout() == sorted([manifest.MANIFEST, *names])
    first = buckets.run(raw, str(out), CFG, [1.0], None, records_per_shard=2, progress=False)
    assert [b["path"] for b in first["buckets"]] == names[:1] and layout() == sorted([manifest.MANIFEST, names[0]])
    again = run(raw, str(out), CFG, records_per_shard=2, progress=False)
    assert layout() == sorted([manifest.MANIFEST, *(s["path"] for s in again["shards"])])


def test_a_real_file_size_limit_is_one_line_exit_4(raw, prepared, tmp_path):
    """The storage's own refusal, not a simulated one: `ulimit -f` (RLIMIT_FSIZE) below one shard's size makes
    ArrayRecord's C++ writer fail with RuntimeError("write() failed: File too large") and no errno; it was three
    tracebacks and exit 1. Now one line naming the output and EFBIG, exit 4; an earlier output stays whole."""
    import resource
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "limited"
    shutil.copytree(prepared, out)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", f"--input={raw}", f"--output={out}",
                        "--clip-seconds=1"], cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root},
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: prepare: writing {out} failed: File too large (EFBIG"), last
    assert _files(out) == _files(prepared)


def test_an_output_that_cannot_be_a_directory_or_hold_the_manifest_is_one_line(raw, tmp_path, caplog):
    """--output under a regular file (ENOTDIR at mkdir), /proc (it exists, but a file cannot be created in it:
    a traceback after all the work) and an output whose manifest.json is a directory (a
    rename onto it fails in the Manifest step): OutputWriteError naming the output (exit 4), no traceback
    logged, no temporary file; they were a NotADirectoryError / IsADirectoryError traceback and exit 1."""
    from data_pipeline.prepare import OutputWriteError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputWriteError, match=r"^prepare: --output=.*afile/out: cannot create it \(Not a directory"):
        run(raw, str(tmp_path / "afile" / "out"), CFG, records_per_shard=2, progress=False)
    with pytest.raises(OutputWriteError, match=r"afile: cannot create it \(it exists and is not a directory\)"):
        run(raw, str(tmp_path / "afile"), CFG, records_per_shard=2, progress=False)  # it said 'File exists'
    if os.path.isdir("/proc/self"):  # a directory that exists but takes no files: refused before any decoding
        with pytest.raises(OutputWriteError, match=r"^prepare: --output=/proc: cannot write in it \("):
            run(raw, "/proc", CFG, records_per_shard=2, progress=False)
    out = tmp_path / "o"
    (out / "manifest.json").mkdir(parents=True)
    with pytest.raises(OutputWriteError) as e:
        run(raw, str(out), CFG, records_per_shard=2, progress=False)
    assert "\n" not in str(e.value) and f"writing {out} failed" in str(e.value) and "manifest.json" in str(e.value)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")] and (out / "manifest.json").is_dir()
    assert not any(r.exc_info for r in caplog.records)


def test_prepare_without_clips_writes_no_manifest(raw, prepared, tmp_path):
    """Every source shorter than one clip: NoClipsError, and no 0-record manifest.json left behind (a fresh
    output stays empty; an earlier complete output keeps its manifest and shards untouched)."""
    from data_pipeline.prepare import NoClipsError

    fresh = tmp_path / "fresh"
    with pytest.raises(NoClipsError, match="no clips from 3 source"):
        run(raw, str(fresh), IngestConfig(clip_seconds=10.0), records_per_shard=2, progress=False)
    assert os.listdir(fresh) == []
    earlier = str(tmp_path / "earlier")
    shutil.copytree(prepared, earlier)
    with pytest.raises(NoClipsError):
        run(raw, earlier, IngestConfig(clip_seconds=10.0), records_per_shard=2, progress=False)
    assert _files(earlier) == _files(prepared)


def test_listing_skips_hidden_files_and_enters_a_symlinked_loop_once(tmp_path):
    """What os.walk(followlinks=False) and `find -L` agree on, built on disk: a directory with a hidden
    resource fork (`._a.mp4`), a subdirectory, and a symlink back to the root (`sub/loop -> ..`), which made the
    walk descend until ELOOP (a traceback); a symlink to a listed file (it was prepared twice). The same tree
    through a `**` glob."""
    from data_pipeline.ingest.per_source import list_sources

    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "._a.mp4").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.MOV").write_bytes(b"")
    (tmp_path / "sub" / "loop").symlink_to("..")
    (tmp_path / "sub" / "same.mp4").symlink_to("../a.mp4")  # the same footage again: listed once
    want = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
                  if not f.startswith(".") and f != "same.mp4")
    assert list_sources(str(tmp_path)) == want == [str(tmp_path / "a.mp4"), str(tmp_path / "sub" / "b.MOV")]
    # a glob's `**` (epath refused it with NotImplementedError): any depth, hidden entries skipped as above
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.mp4").write_bytes(b"")
    deep = [f for f in want if f.endswith(".MOV")]
    assert list_sources(str(tmp_path / "**" / "*.MOV")) == deep
    assert list_sources(str(tmp_path / "**")) == want
    # a symlinked file is matched by a glob too (fsspec calls it a link, not a file: it was dropped in silence),
    # and an existing file whose name holds glob characters is itself (it was 'no video files found')
    (tmp_path / "sub" / "far.mp4").symlink_to(tmp_path / "sub" / "b.MOV")
    assert list_sources(str(tmp_path / "sub" / "*.mp4")) == [str(tmp_path / "sub" / n) for n in ("far.mp4", "same.mp4")]
    (tmp_path / "z [1].mp4").write_bytes(b"")
    assert list_sources(str(tmp_path / "z [1].mp4")) == [str(tmp_path / "z [1].mp4")]
