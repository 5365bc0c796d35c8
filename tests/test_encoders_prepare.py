"""`python -m data_pipeline.prepare --video-encoder=mochi_vae --audio-encoder=wav2vec2 --text-encoder=t5` on
tiny synthetic clips with tiny random-weight models saved in the published layouts: manifest names, versions, shapes,
and the records decode through `from_manifest(manifest, "video").decode`, as mirage_jax.generate will."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLMochi
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, Wav2Vec2Config, Wav2Vec2ForCTC

from data_pipeline import encoders, manifest, speech
from data_pipeline.loader import make_loader
from data_pipeline.synthesize import synthesize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed (make sysdeps)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).save_pretrained(str(root / "vae"), safe_serialization=True)
    cfg = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=12,
    )  # fmt: skip
    Wav2Vec2ForCTC(cfg).save_pretrained(str(root / "w2v"), safe_serialization=True)
    t5 = T5Config(vocab_size=8, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    T5EncoderModel(t5).save_pretrained(str(root / "t5"), safe_serialization=True)
    words = ["<pad>", "</s>", "<unk>", "a", "the", "person", "speaks", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(root / "t5" / "tokenizer.json"))
    return str(root / "vae"), str(root / "w2v"), str(root / "t5")


def test_prepare_cli_with_mochi_vae_and_wav2vec2(weights, tmp_path):
    vae, w2v, t5 = weights
    raw, out = str(tmp_path / "raw"), str(tmp_path / "prepared")
    synthesize(raw, clips=2, seconds=1.0, seed=5, size=(64, 64), progress=False)
    cmd = [
        sys.executable, "-m", "data_pipeline.prepare", f"--input={raw}", f"--output={out}", "--clip-seconds=1",
        "--video-encoder=mochi_vae", f"--video-weights={vae}", "--vae-decode-chunk-latents=2",
        "--audio-encoder=wav2vec2", f"--audio-weights={w2v}",
        "--text-encoder=t5", f"--text-weights={t5}", "--text-len=16",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.read_manifest(out)
    assert m["num_records"] == 2 and m["clip_frames"] == 25  # 25 = 6 * 4 + 1 frames: no frame wasted
    v, a, t = m["encoders"]["video"], m["encoders"]["audio"], m["encoders"]["text"]
    assert (t["name"], t["version"], t["params"]["weights"], t["feature_shape"]) == ("t5", "1", t5, [16, 16])
    assert m["keys"]["text"]["shape"] == [16, 16] and m["keys"]["text_mask"]["shape"] == [16]
    assert (v["name"], v["version"], v["params"]["weights"]) == ("mochi_vae", "1", vae)
    assert (a["name"], a["version"], a["params"]["weights"]) == ("wav2vec2", "1", w2v)
    assert v["feature_shape"] == [None, 8, 8, 12] and a["feature_shape"] == [None, 32]
    assert m["keys"]["video"]["shape"] == [5, 8, 8, 12]  # 1 + (25 - 1) // 6 latent frames
    assert m["keys"]["audio"]["shape"] == [25, 32] and m["keys"]["ref"]["shape"] == [1, 8, 8, 12]
    ds = make_loader(out, global_batch_size=1, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    batch = next(iter(ds))
    lat = batch["video"][0][batch["video_mask"][0]]
    assert lat.shape == (5, 8, 8, 12) and np.isfinite(lat).all()
    pixels = encoders.from_manifest(m, "video").decode(lat)  # exactly generate's call
    assert pixels.shape == (25, 64, 64, 3) and pixels.dtype == np.float32 and np.abs(pixels).max() <= 1.0


def test_missing_weights_flag_is_a_usage_error(tmp_path):
    cmd = [sys.executable, "-m", "data_pipeline.prepare", f"--input={tmp_path}", f"--output={tmp_path}/o",
           "--video-encoder=mochi_vae"]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    assert r.returncode != 0 and "--video-encoder=mochi_vae needs --video-weights" in r.stderr
