"""ResNet (HF `ResNetModel`, basic and bottleneck blocks) in Flax NNX, frozen for extraction.

A faithful port of transformers' `modeling_resnet.py` (v1.5: the stride of a bottleneck sits on
its 3x3 conv unless `downsample_in_bottleneck`). Images come in NHWC; batch norm always uses the
running statistics, because the encoder is frozen and features must not depend on the batch.

Torch pads convolutions symmetrically by `kernel // 2`; XLA's "SAME" pads asymmetrically for
stride 2 on even inputs, so the padding is written out explicitly to match the checkpoint.

    model = ResNet.from_pretrained("/path/to/resnet-101")  # ResNetModel or ResNetFor...
    out = model(pixels)        # float[B, 224, 224, 3], normalised by image_preprocessing
    out.pooler_output          # float[B, 2048]
    out.last_hidden_state      # float[B, 7, 7, 2048], the pre-pool feature map
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tiktalk_jax.models import hf_import

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "swish": jax.nn.silu}

# Torch's BatchNorm2d default, used by every HF ResNet checkpoint.
_BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The fields of HF `ResNetConfig` that shape the network."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 23, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False

    def __post_init__(self):
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type must be 'basic' or 'bottleneck', got {self.layer_type!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}")
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(f"hidden_sizes {self.hidden_sizes} and depths {self.depths} differ")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ResNetConfig:
        """Builds the config from a parsed HF `config.json` (missing fields take HF defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        for key in ("hidden_sizes", "depths"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def named(cls, name: str) -> ResNetConfig:
        """The standard torchvision/HF sizes: resnet18, resnet34, resnet50, resnet101, resnet152."""
        sizes = {
            "resnet18": ("basic", (2, 2, 2, 2)),
            "resnet34": ("basic", (3, 4, 6, 3)),
            "resnet50": ("bottleneck", (3, 4, 6, 3)),
            "resnet101": ("bottleneck", (3, 4, 23, 3)),
            "resnet152": ("bottleneck", (3, 8, 36, 3)),
        }
        if name not in sizes:
            raise ValueError(f"unknown ResNet {name!r}; choose from {sorted(sizes)}")
        layer_type, depths = sizes[name]
        widths = (64, 128, 256, 512) if layer_type == "basic" else (256, 512, 1024, 2048)
        return cls(hidden_sizes=widths, depths=depths, layer_type=layer_type)


class ResNetOutput(NamedTuple):
    last_hidden_state: jax.Array  # float[B, h, w, C_last]: the feature map before pooling
    pooler_output: jax.Array  # float[B, C_last]: its spatial mean


class ConvNorm(nnx.Module):
    """Conv (no bias) -> BatchNorm (running stats) -> optional activation: HF `ResNetConvLayer`."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        activation: str | None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        pad = kernel // 2
        self.convolution = nnx.Conv(
            cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
            use_bias=False, dtype=dtype, param_dtype=param_dtype,
            # HF's init (kaiming normal, fan_out) keeps random-init features at a sane scale.
            kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), rngs=rngs,
        )  # fmt: skip
        self.normalization = nnx.BatchNorm(
            cout, use_running_average=True, epsilon=_BN_EPS, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )  # fmt: skip
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.normalization(self.convolution(x))
        return _ACTIVATIONS[self.activation](x) if self.activation else x

    def load(self, sd: hf_import.StateDict, key: str) -> None:
        """Reads `{key}.convolution.weight` [out, in, kh, kw] and `{key}.normalization.*`."""
        w = sd.get(f"{key}.convolution.weight").transpose(2, 3, 1, 0)
        hf_import.assign(self.convolution.kernel, w, f"{key}.convolution.weight")
        norm = self.normalization
        for var, name in ((norm.scale, "weight"), (norm.bias, "bias"),
                          (norm.mean, "running_mean"), (norm.var, "running_var")):  # fmt: skip
            hf_import.assign(var, sd.get(f"{key}.normalization.{name}"), f"{key}.{name}")


class ResidualBlock(nnx.Module):
    """HF `ResNetBasicLayer` (two 3x3) or `ResNetBottleNeckLayer` (1x1 -> 3x3 -> 1x1, width / 4)."""

    def __init__(self, cfg: ResNetConfig, cin: int, cout: int, stride: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        act = cfg.hidden_act
        if cin != cout or stride != 1:
            self.shortcut = ConvNorm(cin, cout, 1, stride, None, **kw)
        else:
            self.shortcut = None
        if cfg.layer_type == "bottleneck":
            mid = cout // 4
            s1, s2 = (stride, 1) if cfg.downsample_in_bottleneck else (1, stride)
            self.layer = nnx.List([
                ConvNorm(cin, mid, 1, s1, act, **kw),
                ConvNorm(mid, mid, 3, s2, act, **kw),
                ConvNorm(mid, cout, 1, 1, None, **kw),
            ])  # fmt: skip
        else:
            self.layer = nnx.List([
                ConvNorm(cin, cout, 3, stride, act, **kw),
                ConvNorm(cout, cout, 3, 1, None, **kw),
            ])  # fmt: skip
        self.activation = act

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut(x)
        for conv in self.layer:
            x = conv(x)
        return _ACTIVATIONS[self.activation](x + residual)

    def load(self, sd: hf_import.StateDict, key: str) -> None:
        if self.shortcut is not None:
            self.shortcut.load(sd, f"{key}.shortcut")
        for i, conv in enumerate(self.layer):
            conv.load(sd, f"{key}.layer.{i}")


class ResNet(nnx.Module):
    """HF `ResNetModel`: stem (7x7/2 conv, 3x3/2 max pool), stages, global average pool.

    Args:
      cfg: the architecture; `ResNetConfig.named("resnet101")` for the standard ones.
      dtype: computation dtype (e.g. bf16 for extraction); batch-norm statistics stay in
        `param_dtype`.
      rngs: random init for running without weights; `from_pretrained` skips it.
    """

    def __init__(self, cfg: ResNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):  # fmt: skip
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embedder = ConvNorm(cfg.num_channels, cfg.embedding_size, 7, 2, cfg.hidden_act, **kw)
        stages = []
        cin = cfg.embedding_size
        for i, (cout, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
            stride = 2 if (i > 0 or cfg.downsample_in_first_stage) else 1
            blocks = [ResidualBlock(cfg, cin, cout, stride, **kw)]
            blocks += [ResidualBlock(cfg, cout, cout, 1, **kw) for _ in range(depth - 1)]
            stages.append(nnx.List(blocks))
            cin = cout
        self.stages = nnx.List(stages)

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_sizes[-1]

    def __call__(self, pixels: jax.Array) -> ResNetOutput:
        """pixels: float[B, H, W, C] normalised images -> `ResNetOutput`."""
        if pixels.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"expected NHWC pixels with {self.config.num_channels} channels, got {pixels.shape}"
            )
        x = self.embedder(pixels)
        # Max pooling pads with -inf, like torch's MaxPool2d(3, 2, padding=1).
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        return ResNetOutput(last_hidden_state=x, pooler_output=pooled)

    def load_hf_state(self, sd: hf_import.StateDict, prefix: str = "") -> None:
        """Copies HF `ResNetModel` tensors (names under `prefix`) into this module."""
        self.embedder.load(sd, f"{prefix}embedder.embedder")
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                block.load(sd, f"{prefix}encoder.stages.{i}.layers.{j}")

    @classmethod
    def from_config(cls, cfg: ResNetConfig | str, *, seed: int = 0, dtype=jnp.float32,
                    param_dtype=jnp.float32) -> ResNet:  # fmt: skip
        """A seeded random-init model, for tests and runs without pretrained weights."""
        cfg = ResNetConfig.named(cfg) if isinstance(cfg, str) else cfg
        return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> ResNet:
        """Loads a local HF `ResNetModel` or `ResNetForImageClassification` directory.

        The classification head of the latter (`classifier.*`) is ignored.
        """
        cfg = ResNetConfig.from_hf(hf_import.load_config(path))
        model = hf_import.abstract_module(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        )
        sd = hf_import.StateDict(hf_import.load_state_dict(path), source=path)
        prefix = "resnet." if sd.has_prefix("resnet.") else ""
        sd.mark_unused_ok(r"num_batches_tracked$|^classifier\.")
        model.load_hf_state(sd, prefix)
        sd.check_all_used()
        hf_import.check_all_set(model, source=path)
        return model
