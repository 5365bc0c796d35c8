"""The elastic data order (data_pipeline.loader.order through make_loader): global batch n does not depend on the
process count or worker count, a position saved by P processes resumes under any other count (and another
global batch size, at the same sample offset), corrupt records are replaced the same way under every layout,
and other datasets / old per-process states are refused by name."""

import hashlib
import os
import shutil

import numpy as np
import pytest

from data_pipeline.dataset import manifest
from data_pipeline.dataset.records import decode_record
from data_pipeline.loader.examples import CorruptRecordError
from data_pipeline.loader.grain_loader import make_loader
from data_pipeline.loader.order import DataStateError
from data_pipeline.loader.shards import ShardSource
from data_pipeline.synthetic import speech

pytestmark = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")

B = 4  # global batch size; 9 records, so epochs end mid-batch


@pytest.fixture(scope="module")
def prepared(prepared_shards):
    """9 records of 25 frames in 3 shards (4, 4, 1) (tests/conftest.py)."""
    return prepared_shards


def _loader(data, process_index=0, process_count=1, global_batch_size=B, **kw):
    kw = {"clip_frames": 10, "seed": 3, "slow_batch_warn_s": 0, **kw}
    return make_loader(data, global_batch_size=global_batch_size, process_index=process_index,
                       process_count=process_count, **kw)


def _global(data, process_count, steps, state=None, **kw):
    """`steps` global batches: every process's rows concatenated in process order (from `state` if given)."""
    per_process = []
    for p in range(process_count):
        it = iter(_loader(data, p, process_count, **kw))
        if state is not None:
            it.set_state(state)
        per_process.append([next(it) for _ in range(steps)])
        it.close()
    return [{k: np.concatenate([pp[s][k] for pp in per_process]) for k in per_process[0][s]} for s in range(steps)]


def _digest(batch):
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode() + np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


def _records(data):
    src = ShardSource(*manifest_paths(data))
    return [decode_record(src[i][1])[0] for i in range(len(src))]


def manifest_paths(data):
    m = manifest.read_manifest(data)
    return (tuple(os.path.join(data, s["path"]) for s in m["shards"] if s["num_records"]),
            tuple(s["num_records"] for s in m["shards"] if s["num_records"]))


def _crop_of(video, records):
    """Index of the record whose video contains `video` (10 frames) as a contiguous crop."""
    hits = [i for i, r in enumerate(records) for o in range(r["video"].shape[0] - video.shape[0] + 1)
            if np.array_equal(r["video"][o:o + video.shape[0]], video)]
    assert len(hits) == 1, hits
    return hits[0]


def test_global_batches_do_not_depend_on_process_or_worker_count(prepared):
    records = _records(prepared)
    one = _global(prepared, 1, 5)  # 20 samples: epochs 0, 1 and part of 2
    for p in (2, 4):
        assert [_digest(b) for b in _global(prepared, p, 5)] == [_digest(b) for b in one], p
    workers = _global(prepared, 1, 5, worker_count=2)
    assert [_digest(b) for b in workers] == [_digest(b) for b in one]
    order = [_crop_of(v, records) for b in one for v in b["video"]]
    for e in range(2):  # every epoch is a permutation of the records, and the epochs differ
        assert sorted(order[9 * e:9 * (e + 1)]) == list(range(9))
    assert order[:9] != order[9:18]


def test_position_saved_by_two_processes_resumes_in_one_and_four_and_back(prepared):
    want = _global(prepared, 1, 6)
    states = []
    for p in range(2):
        it = iter(_loader(prepared, p, 2))
        for _ in range(3):
            next(it)
        states.append(it.get_state())
    assert states[0] == states[1] and states[0]["step"] == 3  # one global position, any process can save it
    for count in (1, 4):
        got = _global(prepared, count, 3, state=states[0])
        assert [_digest(b) for b in got] == [_digest(b) for b in want[3:]], count
    it = iter(_loader(prepared, 0, 1))  # and the other way round: 1 process saves, 2 resume
    for _ in range(2):
        next(it)
    got = _global(prepared, 2, 4, state=it.get_state())
    assert [_digest(b) for b in got] == [_digest(b) for b in want[2:]]


def test_new_global_batch_size_continues_at_the_same_sample_offset(prepared):
    it = iter(_loader(prepared))
    for _ in range(2):
        next(it)
    state = it.get_state()
    assert state["next_sample"] == 2 * B
    singles = _global(prepared, 1, 2 * B + 6, global_batch_size=1)  # sample g alone, cropped by g's seed
    got = _global(prepared, 2, 3, state=state, global_batch_size=2)
    for n, batch in enumerate(got):
        for r in range(2):
            g = 2 * B + 2 * n + r
            np.testing.assert_array_equal(batch["video"][r], singles[g]["video"][0], err_msg=f"sample {g}")
    assert got and iter(_loader(prepared, global_batch_size=2)).position().next_sample == 0


def test_other_dataset_refused_naming_both_fingerprints_unless_allowed(prepared, tmp_path):
    it = iter(_loader(prepared))
    next(it)
    state = it.get_state()
    subset = os.path.join(prepared, "data-0000[01]-*.array_record")
    other = _loader(subset)
    assert other.position.fingerprint != state["fingerprint"]
    with pytest.raises(DataStateError, match=f"fingerprint '{state['fingerprint']}' in the checkpoint, "
                                             f"'{other.position.fingerprint}' now.*allow_dataset_change"):
        iter(other).set_state(state)
    with pytest.raises(DataStateError, match="seed 3 in the checkpoint, 4 now"):
        iter(_loader(prepared, seed=4)).set_state(state)
    allowed = iter(_loader(subset, allow_dataset_change=True))
    allowed.set_state(state)
    assert allowed.get_state()["next_sample"] == B and next(allowed)["video"].shape[0] == B
    moved = str(tmp_path / "moved")  # the same shards elsewhere: the same dataset
    shutil.copytree(prepared, moved)
    assert _loader(moved).position.fingerprint == state["fingerprint"]


def test_old_per_process_grain_state_is_refused_clearly(prepared, tmp_path):
    import json

    from etils import epath

    from mirage_jax.train.checkpoint import DataStateHandler, DataStateSave
    from mirage_jax.train.grain_source import GrainSource

    old = {"batches": 3, "grain": {"workers_state": {}, "iterations_to_skip": {}}}
    with pytest.raises(DataStateError, match="per-process Grain iterator state.*3 batches drawn.*new --workdir"):
        iter(_loader(prepared)).set_state(old)
    for p in range(2):  # a data item as older versions wrote it: one file per process
        (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps({"kind": "grain", "state": old}))
    legacy = DataStateHandler().restore(epath.Path(tmp_path))
    with pytest.raises(DataStateError, match="per-process Grain iterator state"):
        GrainSource(iter(_loader(prepared))).set_state(legacy)
    it = iter(_loader(prepared))  # today's item: one global file, whatever the process count
    next(it)
    DataStateHandler().save(epath.Path(tmp_path), DataStateSave(GrainSource(it).get_state()))
    assert DataStateHandler().restore(epath.Path(tmp_path))["next_sample"] == B


def test_corrupt_record_replaced_the_same_way_under_every_layout(prepared, tmp_path):
    out = str(tmp_path / "corrupt")
    shutil.copytree(prepared, out)
    shard = os.path.join(out, manifest.read_manifest(out)["shards"][0]["path"])
    data = bytearray(open(shard, "rb").read())
    mid = len(data) // 2  # inside a record's compressed chunk; same size, different bytes
    data[mid:mid + 64] = bytes(64)
    open(shard, "wb").write(bytes(data))
    src = ShardSource(*manifest_paths(out))
    bad = [i for i in range(len(src)) if src[i][1] is None or _decodes(src[i][1]) is None]
    assert len(bad) == 1
    one = _global(out, 1, 3, verify="size", corrupt_budget=1)
    two = _global(out, 2, 3, verify="size", corrupt_budget=1)
    assert [_digest(b) for b in one] == [_digest(b) for b in two]
    good = [r for i, r in enumerate(_records(prepared)) if i not in bad]
    for b in one:  # every row is a crop of a good record (the corrupt one was replaced, not dropped)
        for v in b["video"]:
            _crop_of(v, good)
    with pytest.raises(CorruptRecordError,
                       match=r"data-00000-of-00003-[0-9a-f]{8}\.array_record record \d+:.*corrupt_budget=0"):
        _global(out, 1, 3, verify="size", corrupt_budget=0)


def _decodes(data):
    try:
        return decode_record(data)
    except Exception:  # noqa: BLE001 - any failure means corrupt
        return None
