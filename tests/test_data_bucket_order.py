"""The bucket order (data_pipeline/loader/buckets.py): one shape per global batch, buckets in proportion to their
share of an epoch's steps, elastic over process counts, bitwise the same after a resume."""

import json
import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

SIZES = {"0.2s_64x64": 4, "0.2s_80x48": 4, "0.4s_64x64": 2, "0.4s_80x48": 2}


def _loader(path, pi=0, pc=1, **kw):
    from data_pipeline.loader.buckets import make_bucket_loader, read_buckets

    bks = read_buckets(path)
    return make_bucket_loader(bks, [SIZES[b.name] for b in bks], seed=3, process_index=pi, process_count=pc, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_schedule_is_a_pure_function_in_proportion():
    from data_pipeline.loader.buckets import BucketSchedule

    s = BucketSchedule([6 / 4, 6 / 4, 2 / 2, 2 / 2], seed=3, fingerprint="sha256:x")
    seq = s.buckets(0, 20000)
    np.testing.assert_array_equal(seq[12345:12400], s.buckets(12345, 12400))  # random access = sequential
    assert s.bucket(777) == seq[777]
    p = np.array([1.5, 1.5, 1, 1]) / 5  # N_b / B_b normalised: closed form
    freq = np.bincount(seq, minlength=4) / len(seq)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / len(seq)))  # within 4 binomial sigmas
    other = BucketSchedule([6 / 4, 6 / 4, 2 / 2, 2 / 2], seed=4, fingerprint="sha256:x").buckets(0, 200)
    assert not np.array_equal(other, seq[:200])


def test_each_batch_has_its_buckets_shape_and_processes_split_rows(bucketed_shards):
    ds = _loader(bucketed_shards)
    top = json.load(open(os.path.join(bucketed_shards, "manifest.json")))
    entry = {e["name"]: e for e in top["buckets"]}
    whole = _take(iter(ds), 12)
    halves = [_take(iter(_loader(bucketed_shards, pi, 2)), 12) for pi in (0, 1)]
    seen = set()
    for n, b in enumerate(whole):
        name = ds.names[int(b["bucket"])]
        seen.add(name)
        e = entry[name]
        assert int(b["bucket"]) == ds.schedule.bucket(n)
        assert b["video"].shape[:4] == (SIZES[name], e["latent_frames"], e["latent_height"], e["latent_width"])
        assert b["audio"].shape[:2] == (SIZES[name], e["audio_frames"])
        for k in ("video", "audio", "ref", "mouth"):
            np.testing.assert_array_equal(b[k], np.concatenate([halves[0][n][k], halves[1][n][k]]))
    assert len(seen) >= 3


def test_resume_continues_the_same_buckets_and_samples(bucketed_shards):
    from data_pipeline.loader.order import DataStateError

    it = iter(_loader(bucketed_shards))
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    rest = _take(it, 6)
    again = iter(_loader(bucketed_shards, 1, 2))  # another process layout resumes the position
    again.set_state(state)
    for a, b in zip(rest, _take(again, 6), strict=True):
        half = a["video"].shape[0] // 2
        np.testing.assert_array_equal(a["video"][half:], b["video"])
        assert a["bucket"] == b["bucket"]
    other = iter(_loader(bucketed_shards))
    bad = {**state, "fingerprint": "sha256:0000"}
    with pytest.raises(DataStateError, match="allow_dataset_change"):
        other.set_state(bad)


def test_worker_processes_give_the_same_batches(bucketed_shards):
    """Grain worker processes (the trainer's default, data.worker_count=-1) read the same batches in order."""
    ref = _take(iter(_loader(bucketed_shards)), 6)
    it = iter(_loader(bucketed_shards, worker_count=2))
    try:
        got = _take(it, 6)
    finally:
        it.close()
    for a, b in zip(ref, got, strict=True):
        assert a["bucket"] == b["bucket"]
        np.testing.assert_array_equal(a["video"], b["video"])


def test_allow_dataset_change_keeps_each_remaining_buckets_position(bucketed_shards):
    """A bucket left out since the checkpoint: refused by default; with allow_dataset_change each remaining bucket
    continues at its saved batch count and sample offset, and its next batch is the one it would have drawn."""
    from data_pipeline.loader.buckets import make_bucket_loader, read_buckets
    from data_pipeline.loader.order import DataStateError

    it = iter(_loader(bucketed_shards))
    _take(it, 7)
    state = it.get_state()
    later = {}  # each bucket's next batch in the uninterrupted run
    while len(later) < 4:
        b = next(it)
        later.setdefault(it.dataset.names[int(b["bucket"])], b)
    kept = [b for b in read_buckets(bucketed_shards) if b.name != "0.4s_80x48"]
    for allow in (False, True):
        ds = make_bucket_loader(kept, [SIZES[b.name] for b in kept], seed=3, process_index=0, process_count=1,
                                allow_dataset_change=allow)
        other = iter(ds)
        if not allow:
            with pytest.raises(DataStateError, match="0.4s_80x48"):
                other.set_state(state)
            continue
        other.set_state(state)
        assert {k: v[:2] for k, v in other.get_state()["buckets"].items()} == {
            k: v[:2] for k, v in state["buckets"].items() if k != "0.4s_80x48"}
        seen = {}
        while len(seen) < 3:
            b = next(other)
            seen.setdefault(ds.names[int(b["bucket"])], b)
        for name, b in seen.items():
            np.testing.assert_array_equal(b["video"], later[name]["video"])
