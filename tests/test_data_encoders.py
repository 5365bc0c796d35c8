"""Encoders and the record format, each checked against an independent computation or library."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy as stn

from data_pipeline import encoders
from data_pipeline.dataset.records import RecordError, compress, decode_record, encode_record, tensor_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("f,tf", [(8, 1), (4, 2)])
def test_s2d_matches_per_pixel_definition_and_inverts_exactly(f, tf):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 16, 24, 3), dtype=np.uint8)
    enc = encoders.get_video_encoder("s2d", spatial_factor=f, temporal_factor=tf)
    z = enc.encode(x)
    assert z.shape == (4 // tf, 16 // f, 24 // f, tf * f * f * 3) == enc.latent_shape(4, 16, 24)
    # independent definition, element by element: channel ((dt * f + dy) * f + dx) * 3 + c
    for t, i, j, dt, dy, dx, c in [
        (0, 0, 0, 0, 0, 0, 0),
        (1, 1, 2, tf - 1, f - 1, 3 % f, 2),
        (0, 1, 0, 0, 2, 1, 1),
    ]:
        ch = ((dt * f + dy) * f + dx) * 3 + c
        assert z[t, i, j, ch] == np.float32(x[t * tf + dt, i * f + dy, j * f + dx, c]) / np.float32(127.5) - 1
    assert z.min() >= -1 and z.max() <= 1
    np.testing.assert_array_equal(enc.to_uint8(enc.decode(z)), x)
    np.testing.assert_array_equal(enc.encode(enc.decode(z)), z)


def test_s2d_rejects_indivisible_sizes_with_a_hint():
    with pytest.raises(ValueError, match="--size"):
        encoders.get_video_encoder("s2d").encode(np.zeros((1, 60, 64, 3), np.uint8))


def test_logmel_one_frame_per_video_frame_and_aligned():
    enc = encoders.get_audio_encoder("logmel")
    sr, hop = 16000, 640
    n = 50
    x = np.zeros(n * hop)
    x[20 * hop : 21 * hop] = np.sin(2 * np.pi * 1000 * np.arange(hop) / sr)  # tone burst inside frame 20
    feats = enc.encode(x)
    assert feats.shape == (n, 80) and feats.dtype == np.float32
    energy = feats.mean(axis=1)
    assert int(np.argmax(energy)) == 20
    # the loudest mel band is the one whose centre is nearest 1 kHz (HTK mel scale)
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    centres = np.linspace(mel(20), mel(8000), 82)[1:-1]
    assert abs(int(np.argmax(feats[20])) - int(np.argmin(np.abs(centres - mel(1000))))) <= 1
    assert enc.encode(x, num_frames=10).shape == (10, 80)


def test_hash_text_deterministic_masked_and_similarity_preserving():
    enc = encoders.get_text_encoder("hash", max_len=8, dim=16)
    e1, m1 = enc.encode("A person with red hair.")
    e2, m2 = enc.encode("A person with red hair.")
    np.testing.assert_array_equal(e1, e2)
    assert m1.tolist() == [1] * 6 + [0] * 2 and not e1[6:].any()
    near, _ = enc.encode("A person with red hairs.")
    far, _ = enc.encode("Zebras eat quietly outside today.")
    cos = lambda a, b: float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos(e1, near) > cos(e1, far)
    # a fresh interpreter gives the same table (no salted hash(), no RNG stream)
    code = (
        "import numpy as np; from data_pipeline import encoders; "
        "e = encoders.get_text_encoder('hash', max_len=8, dim=16); "
        "print(e.encode('A person with red hair.')[0].sum())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert float(out) == pytest.approx(float(e1.sum()), rel=1e-6)


def test_encoders_rebuild_from_manifest_spec_and_check_version():
    enc = encoders.get_video_encoder("s2d", spatial_factor=4)
    spec = json.loads(json.dumps(enc.spec(32, 32).to_json()))
    assert encoders.from_spec("video", spec).params == enc.params
    with pytest.raises(ValueError, match="version"):
        encoders.from_spec("video", {**spec, "version": "0"})
    with pytest.raises(TypeError, match="unknown parameter"):
        encoders.get_audio_encoder("logmel", n_mel=80)


def _tensors():
    rng = np.random.default_rng(1)
    return {
        "video": rng.standard_normal((3, 2, 2, 12)).astype(np.float32),
        "audio": rng.standard_normal((3, 5)).astype(np.float32),
        "text": rng.standard_normal((4, 6)).astype(np.float32),
        "text_mask": np.array([1, 1, 0, 0], np.uint8),
        "ref": rng.standard_normal((1, 2, 2, 12)).astype(np.float32),
        "ref_time": np.array([-7.0], np.float32),
        "mouth": np.arange(3, dtype=np.float32),
        "mouth_valid": np.array([1], np.uint8),
    }


META = {"clip_id": "a@0000000", "source": "a.mp4", "caption": "Hello, world", "start_frame": "0"}


def test_record_is_safetensors_and_byte_reproducible_across_processes():
    t = _tensors()
    data = encode_record(t, META)
    loaded = stn.load(data)  # the reference implementation reads it
    assert sorted(loaded) == sorted(t)
    for k in t:
        np.testing.assert_array_equal(loaded[k], t[k])
    back, meta = decode_record(data)
    assert meta == META
    code = (
        "import numpy as np, sys, hashlib; sys.path.insert(0, sys.argv[1]); "
        "from tests.test_data_encoders import _tensors, "
        "META; from data_pipeline.dataset.records import encode_record; "
        "print(hashlib.sha256(encode_record(_tensors(), META)).hexdigest())"
    )
    import hashlib

    outs = {
        subprocess.run(
            [sys.executable, "-c", code, ROOT], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
        for _ in range(2)
    }
    assert outs == {hashlib.sha256(data).hexdigest()}


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command-line tool is not installed")
def test_a_stored_record_is_a_zstd_frame_that_the_zstd_tool_decompresses_and_checks(tmp_path):
    """A shard stores `compress(encode_record(...))`: the reference zstd tool gets the safetensors bytes back
    (`--check`: the frame's content checksum), its header is what safetensors reads, decode_record reads it, and a
    changed byte in the compressed data is refused."""
    t = _tensors()
    plain = encode_record(t, META)
    stored = compress(plain)
    (tmp_path / "r.zst").write_bytes(stored)
    subprocess.run(["zstd", "-q", "-d", "--check", str(tmp_path / "r.zst"), "-o", str(tmp_path / "r")], check=True)
    assert (tmp_path / "r").read_bytes() == plain
    listed = subprocess.run(["zstd", "-lv", str(tmp_path / "r.zst")], capture_output=True, text=True, check=True)
    assert "Check: XXH64" in listed.stdout, listed.stdout
    loaded = stn.load(plain)
    assert tensor_specs(stored) == tensor_specs(plain) == {
        k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in loaded.items()}
    back, meta = decode_record(stored)
    assert meta == META and all(np.array_equal(back[k], t[k]) for k in t)
    bad = bytearray(stored)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(RecordError, match="does not decompress"):
        decode_record(bytes(bad))


def test_a_flipped_bit_in_a_stored_records_frame_header_is_refused_or_harmless():
    """Every single-bit change in a stored record's zstd frame header (magic excluded) either still decodes to the
    same tensors (a bit the content checksum proves unused) or is a RecordError, never another exception: a flip
    that makes the header declare an enormous content size was a MemoryError past the loader's corrupt-record
    budget (a new user's trial)."""
    import zstandard

    t = _tensors()
    t["video"] = np.zeros((3, 64, 64, 12), np.float32)  # compresses well: the frame header is a small part of it
    t["ref"] = np.zeros((1, 64, 64, 12), np.float32)
    stored = compress(encode_record(t, META))
    header_end = 4 + zstandard.frame_header_size(stored)
    outcomes = set()
    for i in range(4, header_end):
        for bit in range(8):
            bad = bytearray(stored)
            bad[i] ^= 1 << bit
            try:
                back, _ = decode_record(bytes(bad))
                assert all(np.array_equal(back[k], t[k]) for k in t)
                outcomes.add("same")
            except RecordError:
                outcomes.add("refused")
    assert "refused" in outcomes


def test_record_errors_name_the_key():
    t = _tensors()
    t["mouth"] = np.zeros(4, np.float32)
    with pytest.raises(RecordError, match="'mouth'"):
        encode_record(t, META)
    with pytest.raises(RecordError, match="not a safetensors record|exceeds"):
        decode_record(b"\xff" * 40)
