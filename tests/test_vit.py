"""EVA ViT (BLIP-2 vision tower) against HF PyTorch `Blip2VisionModel` on a tiny BLIP-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tiktalk_jax.models import layers, vit

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=28, patch_size=7, initializer_range=0.02,
)  # fmt: skip
QFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    encoder_hidden_size=32, vocab_size=100, max_position_embeddings=16,
)  # fmt: skip
OPT = dict(
    model_type="opt", vocab_size=100, hidden_size=16, word_embed_proj_dim=16,
    num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, max_position_embeddings=32,
)  # fmt: skip


def _randomize(model: torch.nn.Module) -> None:
    # HF initialises biases/LN to 0/1 and the EVA q/v biases to 0, which would hide a wrong
    # mapping; every parameter gets distinct random values instead.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _tiny_blip2(tmp_path, model_cls=transformers.Blip2ForConditionalGeneration, **vision):
    config = transformers.Blip2Config(
        vision_config={**VISION, **vision}, qformer_config=QFORMER, text_config=OPT,
        num_query_tokens=4,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = model_cls(config).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize(
    "model_cls,vision",
    [
        (transformers.Blip2ForConditionalGeneration, {}),
        (transformers.Blip2Model, {"qkv_bias": False}),
    ],
)
def test_matches_hf(tmp_path, model_cls, vision):
    hf = _tiny_blip2(tmp_path, model_cls, **vision)
    model = vit.VisionTransformer.from_pretrained(str(tmp_path))
    assert model.config.num_patches == 16 and model.config.qkv_bias == vision.get("qkv_bias", True)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=torch.from_numpy(pixels))
    out = jax.jit(lambda m, x: m(x))(model, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert out.last_hidden_state.shape == (2, 17, 32)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy(), atol=1e-4)


def test_random_init_and_axes():
    cfg = vit.VisionConfig(**{k: v for k, v in VISION.items() if k != "initializer_range"})
    model = vit.VisionTransformer.from_config(cfg, seed=0)
    layers.check_param_axes(model)  # every parameter, the patch conv included, has axes
    axes = layers.param_axes(model)
    assert axes["layers/0/self_attn/query/kernel"] == ("embed", "heads", "kv")
    assert axes["position_embedding"] == (None, "embed")
    out = jax.jit(lambda m, x: m(x))(model, jnp.ones((1, 28, 28, 3)))
    assert out.last_hidden_state.shape == (1, 17, 32)
    assert np.all(np.isfinite(out.last_hidden_state))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.ones((1, 3, 28, 28)))
