"""wav2vec2 (JAX) against transformers' Wav2Vec2Model with random weights, loaded from the published
safetensors layout (a Wav2Vec2ForCTC folder like facebook/wav2vec2-large-960h, and a stable-layer-norm
Wav2Vec2Model like large-lv60): last hidden state max |diff| <= 1e-4 in fp32; then the 25 fps resampling."""

import os

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Model

from data_pipeline import encoders
from data_pipeline.encoders.wav2vec2 import Wav2Vec2

TOL = 1e-4
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16,) * 7,  # the real kernels and strides: 320-sample hop, 400-sample receptive field
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    vocab_size=12,
)


def _save(model, path):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(str(path), safe_serialization=True)
    assert "model.safetensors" in os.listdir(path)
    return model


@pytest.fixture(scope="module")
def ctc_dir(tmp_path_factory):  # large-960h's architecture: group-norm feature extractor, post-LN encoder
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(**TINY, feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
    path = tmp_path_factory.mktemp("w2v_ctc")
    model = _save(Wav2Vec2ForCTC(cfg), path)
    return str(path), model.wav2vec2


@pytest.fixture(scope="module")
def stable_dir(tmp_path_factory):  # large-lv60's architecture: layer-norm feature extractor, pre-LN encoder
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(**TINY, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    path = tmp_path_factory.mktemp("w2v_stable")
    model = _save(Wav2Vec2Model(cfg), path)
    return str(path), model


def _torch_hidden(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x[None].astype(np.float32))).last_hidden_state[0].numpy()


@pytest.mark.parametrize("which", ["ctc_dir", "stable_dir"])
def test_hidden_states_match_transformers(which, request):
    path, model = request.getfixturevalue(which)
    enc = Wav2Vec2(weights=path, normalize=False)
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    want = _torch_hidden(model, x)
    got = enc.hidden_states(x)
    d = float(np.abs(got - want).max())
    print(f"{which}: max|diff| {d:.2e} {got.shape}")
    assert got.shape == (49, 32) and d <= TOL  # (16000 - 400) // 320 + 1 frames at 50 Hz


def test_registry_encoder_gives_one_row_per_video_frame(ctc_dir):
    path, model = ctc_dir
    enc = encoders.get_audio_encoder("wav2vec2", weights=path)
    assert enc.feature_dim == 32 and enc.spec().to_json()["feature_shape"] == [None, 32]
    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 50 * 640).astype(np.float32)  # 2 s: 50 frames
    feats = enc.encode(wave, num_frames=50)
    norm = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)  # the feature extractor's do_normalize
    hid = _torch_hidden(model, norm)  # 99 frames at 50 Hz, frame j centred on sample 320 j + 200
    pos = np.clip((np.arange(50) * 640 + 320 - 200) / 320, 0, len(hid) - 1)
    want = np.stack([np.interp(pos, np.arange(len(hid)), hid[:, c]) for c in range(hid.shape[1])], axis=1)
    assert feats.shape == (50, 32) and feats.dtype == np.float32
    assert float(np.abs(feats - want).max()) <= TOL
    assert enc.encode(wave[:300]).shape == (0, 32) and enc.encode(wave[:700], num_frames=1).shape == (1, 32)
    assert encoders.from_spec("audio", enc.spec().to_json()) is enc  # loaded once per process


def test_missing_tensor_is_named(stable_dir, tmp_path):
    from safetensors.torch import save_file

    path, model = stable_dir
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "final_layer_norm" not in k}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(KeyError, match=r"encoder.layers.0.final_layer_norm.weight.*missing"):
        Wav2Vec2(weights=str(tmp_path))
