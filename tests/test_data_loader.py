"""The Grain loader: per-process slices partition the data, resume is exact, crop/pad and masks are right,
and the trainer's synthetic source (`train.data.SyntheticSource`) has the loader's exact keys, shapes and dtypes."""

import hashlib
import json
import logging
import os
import time
from collections import Counter
from typing import Any

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from data_pipeline.dataset import manifest
from data_pipeline.dataset.records import decode_record
from data_pipeline.loader import grain_loader as loader_mod
from data_pipeline.loader.grain_loader import make_loader
from data_pipeline.synthetic import speech

pytestmark = pytest.mark.skipif(
    not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)"
)


def checkpoint_args(iterator: grain.DatasetIterator, restore: bool = False) -> Any:
    """Grain's Orbax item for a loader iterator (`grain.checkpoint.CheckpointSave`/`CheckpointRestore`)."""
    return grain.checkpoint.CheckpointRestore(iterator) if restore else grain.checkpoint.CheckpointSave(iterator)


def save_state(iterator: grain.DatasetIterator, path: str) -> None:
    """The iterator's JSON state to a file (what a trainer without Orbax would do)."""
    epath.Path(path).write_text(json.dumps(iterator.get_state(), sort_keys=True))


def restore_state(iterator: grain.DatasetIterator, path: str) -> None:
    """Set the iterator to the JSON state written by `save_state`."""
    iterator.set_state(json.loads(epath.Path(path).read_text()))



@pytest.fixture(scope="module")
def prepared(prepared_shards):
    """3 sources x 3 s cut into 1 s clips: 9 records of 25 frames in 3 shards (tests/conftest.py)."""
    return prepared_shards


def _records(out):
    m = manifest.read_manifest(out)
    recs = []
    for s in m["shards"]:
        recs += [decode_record(r)[0] for r in ArrayRecordReader(os.path.join(out, s["path"])).read_all()]
    return recs


def _ids(batch):
    return [hashlib.sha1(v.tobytes()).hexdigest()[:12] for v in batch["video"]]


def test_process_slices_are_disjoint_and_cover_every_record(prepared):
    n = manifest.read_manifest(prepared)["num_records"]
    assert n == 9
    everyone = {hashlib.sha1(r["video"].tobytes()).hexdigest()[:12] for r in _records(prepared)}
    per_process = []
    for p in range(2):
        ds = make_loader(
            prepared,
            global_batch_size=2,
            clip_frames=25,
            seed=5,
            num_epochs=2,
            process_index=p,
            process_count=2,
        )
        per_process.append([i for b in iter(ds) for i in _ids(b)])
    assert len(per_process[0]) == len(per_process[1]) == 9  # 2 epochs x 9 records // global batch 2 = 9 steps
    first_epoch = [per_process[0][:5], per_process[1][:4]]  # global positions 0..8 = one pass over the data
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert set(first_epoch[0]) | set(first_epoch[1]) == everyone
    assert Counter(per_process[0] + per_process[1]) == Counter({i: 2 for i in everyone})


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_mid_epoch_gives_the_same_batches(prepared, workers, tmp_path):
    ds = make_loader(
        prepared,
        global_batch_size=2,
        clip_frames=20,
        seed=1,
        worker_count=workers,
        process_index=0,
        process_count=1,
    )
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    save_state(it, str(tmp_path / "state.json"))
    expected = [next(it) for _ in range(5)]  # crosses the epoch boundary (9 records)
    it.close()
    for resume in ("set_state", "file"):
        it2 = iter(ds)
        if resume == "set_state":
            it2.set_state(state)
        else:
            restore_state(it2, str(tmp_path / "state.json"))
        for want in expected:
            got = next(it2)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        it2.close()


def test_grain_orbax_checkpoint_handler_round_trip(prepared, tmp_path):
    from etils import epath

    ds = make_loader(prepared, global_batch_size=1, seed=2, process_index=0, process_count=1)
    it = iter(ds)
    next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=checkpoint_args(it))
    want = next(it)
    it2 = handler.restore(epath.Path(tmp_path), args=checkpoint_args(iter(ds), restore=True))
    np.testing.assert_array_equal(next(it2)["video"], want["video"])


def test_crop_and_pad_follow_the_records(prepared):
    recs = _records(prepared)
    ds = make_loader(
        prepared,
        global_batch_size=1,
        clip_frames=10,
        seed=3,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
    )
    for rec, b in zip(recs, iter(ds), strict=True):
        video = rec["video"]
        offs = [o for o in range(video.shape[0] - 9) if np.array_equal(video[o : o + 10], b["video"][0])]
        assert len(offs) == 1
        o = offs[0]
        np.testing.assert_array_equal(b["audio"][0], rec["audio"][o : o + 10])
        np.testing.assert_array_equal(b["mouth"][0], rec["mouth"][o : o + 10])
        assert b["ref_time"][0] == rec["ref_time"][0] - o and b["video_mask"].all()
    padded = next(
        iter(
            make_loader(
                prepared, global_batch_size=1, clip_frames=40, shuffle=False, process_index=0, process_count=1
            )
        )
    )
    assert padded["video_mask"][0].tolist() == [True] * 25 + [False] * 15
    assert padded["audio_mask"][0].tolist() == [True] * 25 + [False] * 15
    np.testing.assert_array_equal(padded["video"][0, :25], recs[0]["video"])
    assert not padded["video"][0, 25:].any() and not padded["audio"][0, 25:].any()


def test_synthetic_source_matches_loader_keys_shapes_dtypes(prepared):
    """The trainer's two sources give the same batch: `data.source='synthetic'` and the Grain loader over the
    shards, for a config that fits the shards' manifest (`data_fit.check` is the independent gate)."""
    from configs.tiny import get_config
    from mirage_jax.run_config import RunConfig
    from mirage_jax.train import data_fit
    from mirage_jax.train.data import RowRange, SyntheticSource, batch_shapes
    from mirage_jax.train.grain_source import GrainSource

    cfg = get_config()
    cfg.shapes.latent_frames = cfg.shapes.audio_frames = 25
    cfg.data.source = prepared
    run = RunConfig.from_config(cfg)
    data_fit.check(run)
    real = next(GrainSource(iter(
        make_loader(prepared, global_batch_size=3, clip_frames=25, process_index=0, process_count=1))))
    fake_it = SyntheticSource(batch_shapes(run), RowRange(0, 3, 3), seed=0)
    fake = next(fake_it)
    assert {k: (v.shape, v.dtype) for k, v in fake.items()} == {
        k: (v.shape, v.dtype) for k, v in real.items()
    }
    state = fake_it.get_state()
    want = next(fake_it)
    fake_it.set_state(state)
    np.testing.assert_array_equal(next(fake_it)["video"], want["video"])


def test_errors_name_the_flag(prepared):
    with pytest.raises(ValueError, match="global_batch_size=3 is not divisible by process_count=2"):
        make_loader(prepared, global_batch_size=3, process_index=0, process_count=2)


def test_watchdog_warns_about_a_slow_batch(caplog):
    class Slow(grain.DatasetIterator):
        def __next__(self):
            time.sleep(0.4)
            return {"x": np.zeros(1)}

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

    it = loader_mod.LoaderIterator(Slow(), max_batches=None, slow_batch_warn_s=0.1)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader.grain_loader"):
        next(it)
    assert any("no batch for" in r.message for r in caplog.records)
    assert it.last_wait_s >= 0.4


def test_batches_assemble_into_a_global_jax_array(prepared):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    n = len(jax.devices())
    mesh = Mesh(np.asarray(jax.devices()).reshape(n), ("data",))
    batch = next(
        iter(make_loader(prepared, global_batch_size=n, clip_frames=25))
    )  # process index/count from jax
    for v in batch.values():
        arr = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), v)
        assert arr.shape == v.shape and arr.shape[0] == n


def test_auto_verify_hashes_local_shards_and_checks_sizes_on_gcs():
    """'auto' must not download every shard per host on gs://, and must keep the sha256 check on local disk."""
    from data_pipeline.loader.shards import verify_level

    assert verify_level("/data/prepared", "auto") == "sha256"
    assert verify_level("gs://bkt/prepared", "auto") == "size"
    assert verify_level("gs://bkt/prepared", "sha256") == "sha256"  # an explicit choice is kept


def test_worker_loader_leaves_no_leaked_shared_memory_or_semaphores(prepared):
    """A worker loader read to its end, and the trainer's Grain source closed mid-stream (tests/grain_worker_exit.py,
    a fresh interpreter): no resource_tracker 'leaked shared_memory / semaphore objects' warning and no Grain
    finalizer error at shutdown (both came from worker pipelines left for the garbage collector at exit)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, os.path.join(root, "tests", "grain_worker_exit.py"), prepared], cwd=root,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "read 4 batches; closed" in r.stdout, r.stderr[-3000:]
    assert "leaked" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]


def test_a_format_v1_dataset_loads_as_the_same_examples(prepared, tmp_path):
    """Shards written before each record was a zstd frame (format v1: plain safetensors records in ArrayRecord's own
    zstd chunks, its writer's default options) still load, as the same batches as the v2 dataset of the clips."""
    import zstandard
    from array_record.python.array_record_module import ArrayRecordWriter

    m = manifest.read_manifest(prepared)
    v1 = tmp_path / "v1"
    v1.mkdir()
    shards = []
    for s in m["shards"]:
        stored = ArrayRecordReader(os.path.join(prepared, s["path"])).read_all()
        w = ArrayRecordWriter(str(v1 / s["path"]), "group_size:1")
        for r in stored:
            w.write(zstandard.ZstdDecompressor().decompress(r))
        w.close()
        assert "zstd:3" in ArrayRecordReader(str(v1 / s["path"])).writer_options_string()
        data = (v1 / s["path"]).read_bytes()
        shards.append({**s, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (v1 / manifest.MANIFEST).write_text(json.dumps({**m, "format": "mirage_jax.aroll.v1", "shards": shards}))

    def batches(path):
        ds = make_loader(path, global_batch_size=2, clip_frames=25, seed=3, num_epochs=1, process_index=0,
                         process_count=1)
        return [{k: np.asarray(v) for k, v in b.items()} for b in iter(ds)]

    old, new = batches(str(v1)), batches(prepared)
    assert len(old) == len(new) == 4
    for a, b in zip(old, new, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
