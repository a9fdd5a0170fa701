"""BLIP-2's frozen image encoder, EVA-CLIP ViT-g/14 (HF `Blip2VisionModel`), in Flax NNX.

A pre-LN ViT: 14x14 patch conv, a class token, learned positions, 39 blocks of
LN -> MHSA -> residual, LN -> MLP (exact GELU) -> residual, then a final LayerNorm applied to
every token (BLIP-2's `ln_vision`). 224 px images give 1 + 16 * 16 = 257 tokens of width 1408.
Blocks are built from `layers.MultiHeadAttention` / `layers.Mlp`.

EVA's fused `qkv` projection has biases for q and v only; HF stores the concatenation
[q_bias, 0, v_bias] as `qkv.bias` (older exports: separate `q_bias` / `v_bias`). Both load; the
k bias is kept as a (zero) parameter so one attention module serves every model.

    vit = VisionTransformer.from_pretrained("/path/to/blip2-opt-2.7b")   # the vision tower only
    out = vit(pixels)            # float[B, 224, 224, 3], normalised (image_preprocessing)
    out.last_hidden_state        # float[B, 257, 1408], what the Q-Former attends to
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tiktalk_jax.models import hf_import, layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """HF `Blip2VisionConfig` fields; the defaults are EVA ViT-g/14 as BLIP-2 uses it."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> VisionConfig:
        """From a `Blip2Config` dict (its `vision_config`) or a bare `Blip2VisionConfig` dict."""
        hf = hf.get("vision_config", hf) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        for key in ("image_size", "patch_size"):
            if isinstance(kwargs.get(key), list | tuple):
                h, w = kwargs[key]
                if h != w:
                    raise ValueError(f"non-square {key} {kwargs[key]} is not supported")
                kwargs[key] = h
        return cls(**kwargs)


class VisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # float[B, 1 + P, D], after the final LayerNorm
    pooler_output: jax.Array  # float[B, D]: the class token, LayerNorm'd once more (as HF)


class EncoderLayer(nnx.Module):
    """HF `Blip2EncoderLayer`: pre-LN self-attention and MLP blocks."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.layer_norm1 = layers.layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = layers.MultiHeadAttention(
            cfg.num_attention_heads, d, use_bias=cfg.qkv_bias, out_bias=True, **kw
        )
        self.layer_norm2 = layers.layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.mlp = layers.Mlp(d, cfg.intermediate_size, activation=cfg.hidden_act, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

    def load(self, sd: hf_import.StateDict, key: str, cfg: VisionConfig) -> None:
        attn = self.self_attn
        d, h = cfg.hidden_size, cfg.num_attention_heads
        qkv = sd.get(f"{key}.self_attn.qkv.weight").T.reshape(d, 3, h, d // h)
        for i, proj in enumerate((attn.query, attn.key, attn.value)):
            hf_import.assign(proj.kernel, qkv[:, i], f"{key}.self_attn.qkv.weight[{i}]")
        if cfg.qkv_bias:
            if f"{key}.self_attn.qkv.bias" in sd:
                q_b, k_b, v_b = sd.get(f"{key}.self_attn.qkv.bias").reshape(3, h, d // h)
            else:
                q_b = sd.get(f"{key}.self_attn.q_bias").reshape(h, d // h)
                v_b = sd.get(f"{key}.self_attn.v_bias").reshape(h, d // h)
                k_b = 0 * q_b
            for proj, b, n in (
                (attn.query, q_b, "q"),
                (attn.key, k_b, "k"),
                (attn.value, v_b, "v"),
            ):
                hf_import.assign(proj.bias, b, f"{key}.self_attn.{n}_bias")
        hf_import.assign_linear(attn.out, sd, f"{key}.self_attn.projection")
        hf_import.assign_layer_norm(self.layer_norm1, sd, f"{key}.layer_norm1")
        hf_import.assign_layer_norm(self.layer_norm2, sd, f"{key}.layer_norm2")
        hf_import.assign_linear(self.mlp.up, sd, f"{key}.mlp.fc1")
        hf_import.assign_linear(self.mlp.down, sd, f"{key}.mlp.fc2")


class VisionTransformer(nnx.Module):
    """HF `Blip2VisionModel`: `pixels: float[B, H, W, C]` (H = W = image_size) -> `VisionOutput`."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):  # fmt: skip
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, (p, p), strides=p, padding="VALID",
            kernel_init=layers.partitioned(layers.default_kernel_init, (None, None, None, "embed")),
            bias_init=layers.partitioned(nnx.initializers.zeros_init(), ("embed",)), **kw,
        )  # fmt: skip
        init = layers.default_kernel_init
        self.class_embedding = nnx.Param(
            init(rngs.params(), (d,), param_dtype), out_sharding=(layers.EMBED,),
            eager_sharding=False,
        )  # fmt: skip
        self.position_embedding = nnx.Param(
            init(rngs.params(), (cfg.num_patches + 1, d), param_dtype),
            out_sharding=(None, layers.EMBED), eager_sharding=False,
        )  # fmt: skip
        self.layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = layers.layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.dtype = dtype

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    def __call__(self, pixels: jax.Array) -> VisionOutput:
        cfg = self.config
        size = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixels.shape[1:]) != size:
            raise ValueError(f"expected NHWC pixels [B, {size}], got {pixels.shape}")
        x = self.patch_embedding(pixels)  # [B, H/p, W/p, D], patches in row-major order
        b, d = x.shape[0], x.shape[-1]
        x = x.reshape(b, -1, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        x = self.post_layernorm(x)
        return VisionOutput(last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0]))

    def load_hf_state(self, sd: hf_import.StateDict, prefix: str = "") -> None:
        """Copies HF `Blip2VisionModel` tensors (names under `prefix`) into this module."""
        p = prefix
        w = sd.get(f"{p}embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)
        hf_import.assign(self.patch_embedding.kernel, w, f"{p}embeddings.patch_embedding.weight")
        key = f"{p}embeddings.patch_embedding.bias"
        hf_import.assign(self.patch_embedding.bias, sd.get(key), key)
        key = f"{p}embeddings.class_embedding"
        hf_import.assign(self.class_embedding, sd.get(key).reshape(-1), key)
        key = f"{p}embeddings.position_embedding"
        hf_import.assign(self.position_embedding, sd.get(key)[0], key)
        for i, layer in enumerate(self.layers):
            layer.load(sd, f"{p}encoder.layers.{i}", self.config)
        hf_import.assign_layer_norm(self.post_layernorm, sd, f"{p}post_layernorm")

    @classmethod
    def from_config(cls, cfg: VisionConfig | None = None, *, seed: int = 0, dtype=jnp.float32,
                    param_dtype=jnp.float32) -> VisionTransformer:  # fmt: skip
        """A seeded random-init model (default: full ViT-g), for runs without weights."""
        return cls(cfg or VisionConfig(), dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32,
                        param_dtype=jnp.float32) -> VisionTransformer:  # fmt: skip
        """The vision tower of a local HF BLIP-2 directory (`Blip2Model`,
        `Blip2ForConditionalGeneration`, ...: weights under `vision_model.`) or of a bare
        `Blip2VisionModel` directory. Only the vision tensors are read."""
        cfg = VisionConfig.from_hf(hf_import.load_config(path))
        model = hf_import.abstract_module(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        )
        sd = hf_import.StateDict(hf_import.load_state_dict(path), source=path)
        prefix = "vision_model." if sd.has_prefix("vision_model.") else ""
        if prefix:  # the Q-Former, projections and LLM belong to other modules
            sd.mark_unused_ok(f"^(?!{re.escape(prefix)})")
        model.load_hf_state(sd, prefix)
        sd.check_all_used()
        hf_import.check_all_set(model, source=path)
        return model
