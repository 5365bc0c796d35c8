"""t5 (JAX) against transformers' T5EncoderModel (v1.1: gated GELU) with random weights, loaded from the
published safetensors layout: last hidden state max |diff| <= 1e-4 in fp32, padded keys masked, relative
position buckets beyond max_distance; then the caption interface with a tokenizer.json."""

import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel

from data_pipeline import encoders
from data_pipeline.encoders.t5 import T5

TOL = 1e-4
WORDS = ["<pad>", "</s>", "<unk>", "a", "woman", "speaks", "to", "the", "camera", "in", "soft", "light", "."]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    model = T5EncoderModel(cfg).eval()
    path = tmp_path_factory.mktemp("t5")
    model.save_pretrained(str(path), safe_serialization=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(os.path.join(path, "tokenizer.json"))
    return str(path), model


def test_hidden_states_match_transformers(t5_dir):
    path, model = t5_dir
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(WORDS), (2, 40)).astype(np.int64)  # 40 tokens: buckets past max_distance=16
    mask = np.ones((2, 40), np.int64)
    mask[1, 25:] = 0
    ids[1, 25:] = 0
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = T5(weights=path, max_len=40).encode_ids(ids, mask)
    d = float(np.abs(got - want).max())
    print(f"t5: max|diff| {d:.2e} {got.shape}")
    assert got.shape == (2, 40, 32) and d <= TOL
    half = T5(weights=path, max_len=40, dtype="bfloat16").encode_ids(ids, mask)  # bf16 weights: close, not equal
    assert float(np.abs(half - want).max()) <= 0.1 * float(np.abs(want).max())


def test_caption_interface(t5_dir):
    path, model = t5_dir
    enc = encoders.get_text_encoder("t5", weights=path, max_len=12)
    emb, mask = enc.encode("a woman speaks to the camera")
    assert emb.shape == (12, 32) and mask.tolist() == [1] * 7 + [0] * 5  # 6 words + </s>
    assert not emb[7:].any() and np.abs(emb[:7]).min() > 0
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 1]])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state[0].numpy()  # padding is masked: same as unpadded
    assert float(np.abs(emb[:7] - want).max()) <= TOL
    long_emb, long_mask = enc.encode("a woman speaks to the camera in soft light . a woman speaks")
    assert long_mask.all() and long_emb.shape == (12, 32)  # truncated to max_len
    assert enc.spec().to_json()["feature_shape"] == [12, 32]
