"""Shape buckets in prepare (data_pipeline/buckets.py): lists of clip lengths and sizes -> one dataset whose
manifest lists its buckets; each bucket holds exactly what a single-shape prepare of its sources writes."""

import json
import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def test_nearest_aspect_and_lists():
    from data_pipeline import buckets
    from mirage_base.errors import InputError

    sizes = [(720, 1280), (1280, 720)]
    assert buckets.nearest_size((1080, 1920), sizes) == (720, 1280)
    assert buckets.nearest_size((1920, 1080), sizes) == (1280, 720)
    assert buckets.nearest_size((1000, 1000), sizes) == (720, 1280)  # a tie: the first listed
    assert buckets.nearest_size((640, 480), [(64, 64), (96, 48)]) == (64, 64)  # ln 1.33: 0.29 vs 0.41
    assert buckets.parse_seconds("4,8") == [4.0, 8.0]
    assert buckets.parse_sizes("720x1280,1280x720") == sizes
    for bad in ("4,4", "0", "x"):
        with pytest.raises(InputError, match="--clip-seconds"):
            buckets.parse_seconds(bad)


def test_buckets_manifest_and_each_bucket_equals_a_single_shape_prepare(bucketed_raw, bucketed_shards, tmp_path):
    from data_pipeline.dataset import manifest as mf
    from data_pipeline.ingest.per_source import IngestConfig
    from data_pipeline.loader.shards import resolve_shards
    from data_pipeline.prepare import run

    top = json.load(open(os.path.join(bucketed_shards, "manifest.json")))
    assert top["format"] == mf.BUCKETS_FORMAT
    got = {b["name"]: (b["num_records"], b["clip_frames"], b["latent_frames"], b["latent_height"],
                       b["latent_width"], b["audio_frames"]) for b in top["buckets"]}
    # 3 s sources: fifteen 0.2 s clips or seven 0.4 s clips each (2 sources per size); s2d factor 8, uniform:1
    assert got == {"0.2s_64x64": (30, 5, 5, 8, 8, 5), "0.4s_64x64": (14, 10, 10, 8, 8, 10),
                   "0.2s_80x48": (30, 5, 5, 6, 10, 5), "0.4s_80x48": (14, 10, 10, 6, 10, 10)}
    assert top["sources"]["by_size"] == {"64x64": 2, "80x48": 2}
    for b in top["buckets"]:
        shards = resolve_shards(os.path.join(bucketed_shards, b["path"]))
        assert shards.num_records == b["num_records"]
        assert shards.manifest["keys"]["video"]["shape"][:3] == [b["latent_frames"], b["latent_height"],
                                                                 b["latent_width"]]
    # the 0.2s_80x48 bucket is a single-shape prepare of b/ at --size=80x48 --clip-seconds=0.2
    single = str(tmp_path / "single")
    run(os.path.join(bucketed_raw, "b"), single, IngestConfig(clip_seconds=0.2, size=(80, 48)),
        records_per_shard=8, progress=False)
    sub = os.path.join(bucketed_shards, "0.2s_80x48")
    names = sorted(f for f in os.listdir(single) if f.endswith(".array_record"))
    assert names == sorted(f for f in os.listdir(sub) if f.endswith(".array_record"))
    from data_pipeline.loader.shards import ShardSource

    a, b = resolve_shards(single), resolve_shards(sub)
    ra, rb = ShardSource(a.paths, a.counts), ShardSource(b.paths, b.counts)
    from data_pipeline.dataset.records import decode_record

    for i in range(a.num_records):  # same clips, same values; source ids differ by the root (b/ prefix), and the
        # reference frame is drawn by BLAKE2b(source id, start, seed), so `ref`/`ref_time` differ
        (ta, ma), (tb, mb) = decode_record(ra[i][1]), decode_record(rb[i][1])
        assert mb["clip_id"] == "b/" + ma["clip_id"]
        for k in set(ta) - {"ref", "ref_time"}:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def test_single_shape_reader_names_a_bucketed_dataset(bucketed_shards):
    from data_pipeline.loader.shards import resolve_shards

    with pytest.raises(ValueError, match="shape buckets .*0.2s_64x64"):
        resolve_shards(bucketed_shards)


def test_prepare_cli_lists(bucketed_raw, tmp_path):
    """The CLI: `--clip-seconds=1,2 --size=64x64` writes buckets; a single value stays a single-shape dataset."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "cli")
    env = {**os.environ, "PYTHONPATH": root}
    r = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", f"--input={bucketed_raw}/a", f"--output={out}",
                        "--clip-seconds=1,2", "--size=64x64"], capture_output=True, text=True, env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bucket 1s_64x64: 6 records" in r.stdout and "bucket 2s_64x64: 2 records" in r.stdout
