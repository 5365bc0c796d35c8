"""Small shared fixtures-as-functions for the model tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from mirage_jax.config import ModelConfig
from mirage_jax.run_config import RunConfig


def small_config(**overrides) -> ModelConfig:
    base = dict(num_layers=3, num_heads=2, head_dim=16, video_dim=32, text_dim=24, audio_dim=16, latent_channels=4,
                text_embed_dim=16, audio_feature_dim=8, pool_heads=2, time_embed_dim=32, time_map="uniform:2",
                rope_base_height=8, rope_base_width=8)
    base.update(overrides)
    return ModelConfig(**base)


def saved_config(model: dict | None = None) -> RunConfig:
    """A run's config as a checkpoint reader gets it (`checkpoint_format.read_config`): `model` over ModelConfig's
    defaults, configs/tiny.py's diffusion and shapes, every other section at its default."""
    from configs.tiny import diffusion_config, shapes_config

    return RunConfig.from_config({"model": model or {}, "diffusion": diffusion_config().to_dict(),
                                  "shapes": shapes_config().to_dict()})


def random_inputs(cfg: ModelConfig, seed: int = 0, b: int = 2, t: int = 3, h: int = 4, w: int = 6, text_len: int = 7,
                  audio_len: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    text_mask = np.ones((b, text_len), bool)
    text_mask[0, text_len // 2:] = False  # padded text on the first sample
    return {
        "video": rng.standard_normal((b, t, h, w, cfg.latent_channels)).astype(np.float32),
        "timestep": np.array([100.0, 731.0][:b], np.float32),
        "text": rng.standard_normal((b, text_len, cfg.text_embed_dim)).astype(np.float32),
        "text_mask": text_mask,
        "audio": rng.standard_normal((b, audio_len, cfg.audio_feature_dim)).astype(np.float32),
        "audio_mask": np.ones((b, audio_len), bool),
        "ref": rng.standard_normal((b, 1, h, w, cfg.latent_channels)).astype(np.float32),
        "ref_time": np.array([-7.0, 9.0][:b], np.float32),
        "ref_mask": np.ones((b,), bool),
    }


def randomize(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every parameter random values (zero-initialised gates would hide most of the network)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [scale * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
           for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def tiny_encoder_weights(root) -> tuple[str, str, str]:
    """Tiny random-weight Mochi VAE, wav2vec2 (CTC) and T5 encoder (+ a word-level tokenizer.json) saved under
    `root` in their published safetensors layouts; returns the (vae, wav2vec2, t5) folders."""
    import torch
    from diffusers import AutoencoderKLMochi
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, Wav2Vec2Config, Wav2Vec2ForCTC

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


def make_eval_loss(layout: Any, dcfg: Any, seed: int, activation_rules: tuple[tuple[str, Any], ...]) -> Any:
    """`(params, batch, step) -> (loss, grads)` without an update (the flow-matching loss of `train.step` under
    `activation_rules`): the tests compare layouts with it."""
    import jax
    from flax import nnx
    from flax.core import spmd as core_spmd

    from mirage_jax.diffusion import flow_matching_loss

    graphdef = layout.graphdef

    def fn(params: Any, batch: dict[str, Any], step: Any) -> tuple[Any, Any]:
        with core_spmd.logical_axis_rules(activation_rules):
            rng = jax.random.fold_in(jax.random.key(seed), step)

            def loss(p: Any) -> Any:
                return flow_matching_loss(nnx.merge(graphdef, p), batch, rng, dcfg)[0]

            return jax.value_and_grad(loss)(params)

    return jax.jit(fn)
