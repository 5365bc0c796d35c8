"""The `dct` video encoder against its definition (explicit DCT-II basis, YCbCr, zig-zag), its exact
inverse on what it keeps, and its manifest round trip."""

import numpy as np
import pytest

from data_pipeline import encoders
from data_pipeline.encoders.video_dct import DCT, zigzag


def _basis(f):
    """Orthonormal DCT-II matrix: C[k, n] = a_k cos(pi (2n + 1) k / 2f)."""
    k, n = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
    c = np.cos(np.pi * (2 * n + 1) * k / (2 * f)) * np.sqrt(2.0 / f)
    c[0] /= np.sqrt(2.0)
    return c


def test_zigzag_is_jpeg_order():
    assert zigzag(4).tolist() == [0, 1, 4, 8, 5, 2, 3, 6, 9, 12, 13, 10, 7, 11, 14, 15]
    assert sorted(zigzag(8).tolist()) == list(range(64))


@pytest.mark.parametrize("f,luma,chroma", [(8, 10, 3), (4, 16, 2)])
def test_encode_matches_the_definition(f, luma, chroma):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 2 * f, 3 * f, 3), dtype=np.uint8)
    enc = DCT(spatial_factor=f, luma=luma, chroma=chroma)
    z = enc.encode(frames)
    assert z.shape == (2, 2, 3, luma + 2 * chroma) and z.dtype == np.float32
    c = _basis(f)
    rgb2ycc = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    x = frames.astype(np.float64) / 127.5 - 1.0
    t, bi, bj = 1, 1, 2
    block = x[t, bi * f:(bi + 1) * f, bj * f:(bj + 1) * f] @ rgb2ycc.T
    want = []
    for ch, keep in ((0, luma), (1, chroma), (2, chroma)):
        coef = (c @ block[..., ch] @ c.T).reshape(-1)[zigzag(f)][:keep]
        scale = np.full(keep, 8.0 / f)
        scale[0] = 2.0 / f
        want.append(coef * scale)
    np.testing.assert_allclose(z[t, bi, bj], np.concatenate(want), atol=1e-5)


def test_decode_inverts_what_is_kept():
    rng = np.random.default_rng(1)
    enc = DCT()
    frames = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    z = enc.encode(frames)
    low = enc.decode(z)  # the low-pass image
    assert low.shape == (3, 16, 24, 3) and low.min() >= -1 and low.max() <= 1
    z2 = enc.encode(low)
    np.testing.assert_allclose(z2, z, atol=0.05)  # equal up to the [-1, 1] clip of the low-pass image
    smooth = np.tile(np.linspace(-0.5, 0.5, 24)[None, None, :, None], (1, 16, 1, 3))  # no clipping: exact
    np.testing.assert_allclose(enc.encode(enc.decode(enc.encode(smooth))), enc.encode(smooth), atol=1e-5)
    full = DCT(spatial_factor=4, luma=16, chroma=16)  # every coefficient kept: lossless
    x = rng.uniform(-0.9, 0.9, (1, 8, 8, 3))
    np.testing.assert_allclose(full.decode(full.encode(x)), x, atol=1e-5)


def test_registry_manifest_round_trip_and_errors():
    enc = encoders.get_video_encoder("dct", luma=6, chroma=1)
    assert encoders.spatial_factor(enc) == 8 and encoders.temporal_factor(enc) == 1
    spec = enc.spec(64, 64).to_json()
    assert spec["feature_shape"] == [None, 8, 8, 8]
    again = encoders.from_spec("video", spec)
    assert again.params == enc.params
    with pytest.raises(ValueError, match="spatial_factor=8"):
        enc.encode(np.zeros((1, 12, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="luma"):
        DCT(luma=0)
    with pytest.raises(ValueError, match=r"\[T, h, w, 8\]"):
        enc.decode(np.zeros((1, 2, 2, 16), np.float32))
