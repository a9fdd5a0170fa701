"""ResNet port against HF PyTorch `ResNetModel` on tiny random configs (batch norm in eval mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tiktalk_jax.models import resnet


def _randomize_batch_norm(model: torch.nn.Module, seed: int) -> None:
    # A fresh HF model has identity batch norms (mean 0, var 1, scale 1, bias 0), which would
    # hide a wrong mapping of the running statistics; give every one distinct values.
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _save(tmp_path, model_cls, **config):
    torch.manual_seed(0)
    hf = model_cls(transformers.ResNetConfig(embedding_size=8, **config)).eval()
    with torch.no_grad():
        _randomize_batch_norm(hf, seed=1)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize(
    "model_cls,config",
    [
        (
            transformers.ResNetModel,
            dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1], layer_type="bottleneck"),
        ),
        # A classification checkpoint (weights under `resnet.`, head ignored), basic blocks,
        # the downsampling variants.
        (
            transformers.ResNetForImageClassification,
            dict(
                hidden_sizes=[8, 16],
                depths=[2, 1],
                layer_type="basic",
                downsample_in_first_stage=True,
            ),
        ),  # fmt: skip
        (
            transformers.ResNetModel,
            dict(
                hidden_sizes=[16, 32],
                depths=[1, 1],
                layer_type="bottleneck",
                downsample_in_bottleneck=True,
            ),
        ),  # fmt: skip
    ],
)
def test_matches_hf(tmp_path, model_cls, config):
    hf = _save(tmp_path, model_cls, **config)
    model = resnet.ResNet.from_pretrained(str(tmp_path))
    pixels = np.random.default_rng(0).normal(size=(2, 3, 45, 38)).astype(np.float32)
    with torch.no_grad():
        base = hf.resnet if hasattr(hf, "resnet") else hf
        ref = base(torch.from_numpy(pixels))
    out = jax.jit(lambda m, x: m(x))(model, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    want_map = ref.last_hidden_state.numpy().transpose(0, 2, 3, 1)
    assert out.last_hidden_state.shape == want_map.shape
    np.testing.assert_allclose(out.last_hidden_state, want_map, atol=1e-4, rtol=0)
    assert out.pooler_output.shape == (2, config["hidden_sizes"][-1])
    np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy()[:, :, 0, 0], atol=1e-4)


def test_missing_tensor_is_an_error(tmp_path):
    _save(tmp_path, transformers.ResNetModel, hidden_sizes=[8], depths=[1], layer_type="basic")
    from tiktalk_jax.models import hf_import

    tensors = dict(hf_import.load_state_dict(str(tmp_path)))
    tensors.pop("encoder.stages.0.layers.0.layer.1.normalization.running_var")
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(KeyError, match="running_var"):
        resnet.ResNet.from_pretrained(str(tmp_path))


def test_random_init_named_config():
    cfg = resnet.ResNetConfig.named("resnet50")
    assert cfg.depths == (3, 4, 6, 3) and cfg.hidden_sizes[-1] == 2048
    # One distinct parameter shape per kind: random init compiles one program per shape.
    small = resnet.ResNetConfig(
        embedding_size=8, hidden_sizes=(8,), depths=(2,), layer_type="basic"
    )
    a = resnet.ResNet.from_config(small, seed=3)
    b = resnet.ResNet.from_config(small, seed=3)
    x = jnp.ones((1, 32, 32, 3))
    run = jax.jit(lambda m, x: m(x))
    out = run(a, x)
    assert out.pooler_output.shape == (1, 8)
    assert out.last_hidden_state.shape == (1, 8, 8, 8)
    np.testing.assert_array_equal(out.pooler_output, run(b, x).pooler_output)
    assert np.all(np.isfinite(out.pooler_output)) and float(jnp.std(out.pooler_output)) > 0
