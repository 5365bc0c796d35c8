"""MirageDiT without audio/reference equals diffusers' MochiTransformer3DModel (random weights, fp32)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mirage_jax.config import ModelConfig  # noqa: E402
from mirage_jax.interop.mochi import assign_params, convert_mochi_state, mochi_config_to_model  # noqa: E402
from mirage_jax.model import MirageDiT  # noqa: E402

CONFIGS = [
    dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=3, pooled_projection_dim=24,
         in_channels=4, text_embed_dim=16, time_embed_dim=32),
    dict(patch_size=1, num_attention_heads=3, attention_head_dim=8, num_layers=1, pooled_projection_dim=12,
         in_channels=3, text_embed_dim=24, time_embed_dim=16),
    dict(patch_size=2, num_attention_heads=4, attention_head_dim=8, num_layers=2, pooled_projection_dim=40,
         in_channels=12, text_embed_dim=32, time_embed_dim=64),
]


def _mochi(kwargs, seed):
    torch.manual_seed(seed)
    model = diffusers.MochiTransformer3DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # the default init leaves gates and RoPE at zero: randomize all
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("idx", range(len(CONFIGS)))
@pytest.mark.parametrize("scan", [True, False])
def test_forward_matches_diffusers(idx, scan):
    kwargs = CONFIGS[idx]
    tm = _mochi(kwargs, idx)
    cfg = ModelConfig(**mochi_config_to_model(dict(tm.config)), use_audio=False, scan_layers=scan,
                      pool_heads=8, rope_base_height=192, rope_base_width=192)
    model = MirageDiT(cfg, rngs=nnx.Rngs(0))
    assign_params(model, convert_mochi_state({k: v.numpy() for k, v in tm.state_dict().items()}, cfg))

    rng = np.random.default_rng(idx)
    b, t, h, w = 2, 3, 4, 6
    x = rng.standard_normal((b, kwargs["in_channels"], t, h, w)).astype(np.float32)
    text = rng.standard_normal((b, 9, kwargs["text_embed_dim"])).astype(np.float32)
    mask = np.ones((b, 9), bool)
    mask[0, 5:] = False  # padded text
    ts = np.array([37.0, 912.0], np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(ts),
                  torch.from_numpy(mask)).sample.numpy()
    got = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 4, 1)), jnp.asarray(ts), jnp.asarray(text),
                           jnp.asarray(mask))).transpose(0, 4, 1, 2, 3)
    assert np.abs(want).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
