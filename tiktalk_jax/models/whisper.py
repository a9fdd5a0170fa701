"""Whisper's audio encoder (HF `WhisperEncoder`) in Flax NNX: the speech-aware audio features.

VGGish (what TikTalk's Maria+Audio used) summarises ambient sound; the paper names speech as the
missing piece. Whisper's encoder states carry what is said, so they are offered as an alternative
audio feature type.

Two GELU convs over the log-mel frames (the second with stride 2: 3000 frames -> 1500 states of
20 ms), learned (checkpoint-stored sinusoidal) positions, pre-LN transformer blocks built from
`layers.MultiHeadAttention` / `layers.Mlp`, a final LayerNorm. Whisper's k projection has no
bias: it is loaded as a zero bias of the shared attention module, which computes the same.

    enc = WhisperEncoder.from_pretrained("/path/to/whisper-small")   # WhisperModel or ...ForCond...
    feats, frames = audio_features.whisper_log_mel(audio)            # [C, 80, 3000], 30 s chunks
    enc(feats).shape                                                 # [C, 1500, 768]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tiktalk_jax.models import hf_import, layers

_SIZES = {  # name: (d_model, layers, heads, mel bins)
    "tiny": (384, 4, 6, 80),
    "base": (512, 6, 8, 80),
    "small": (768, 12, 12, 80),
    "medium": (1024, 24, 16, 80),
    "large-v2": (1280, 32, 20, 80),
    "large-v3": (1280, 32, 20, 128),
}


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """The encoder fields of HF `WhisperConfig` (defaults: whisper-tiny, like HF's)."""

    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    @property
    def num_frames(self) -> int:
        """Log-mel frames the encoder takes (the stride-2 conv halves them)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> WhisperEncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    @classmethod
    def named(cls, name: str) -> WhisperEncoderConfig:
        """OpenAI's sizes: tiny, base, small, medium, large-v2, large-v3."""
        if name.removeprefix("whisper-") not in _SIZES:
            raise ValueError(f"unknown Whisper size {name!r}; choose from {sorted(_SIZES)}")
        d, n, h, mels = _SIZES[name.removeprefix("whisper-")]
        return cls(d, n, h, 4 * d, mels)


class EncoderLayer(nnx.Module):
    """HF `WhisperEncoderLayer`: pre-LN self-attention and MLP blocks (LayerNorm eps 1e-5)."""

    def __init__(self, cfg: WhisperEncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.d_model
        self.self_attn_layer_norm = layers.layer_norm(d, **kw)
        self.self_attn = layers.MultiHeadAttention(cfg.encoder_attention_heads, d, **kw)
        self.final_layer_norm = layers.layer_norm(d, **kw)
        self.mlp = layers.Mlp(d, cfg.encoder_ffn_dim, activation=cfg.activation_function, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.mlp(self.final_layer_norm(x))

    def load(self, sd: hf_import.StateDict, key: str) -> None:
        attn = self.self_attn
        hf_import.assign_linear(attn.query, sd, f"{key}.self_attn.q_proj")
        hf_import.assign_linear(attn.value, sd, f"{key}.self_attn.v_proj")
        k_kernel = sd.get(f"{key}.self_attn.k_proj.weight").T
        hf_import.assign(
            attn.key.kernel, k_kernel.reshape(attn.key.kernel.shape), f"{key}.k_proj.weight"
        )
        hf_import.assign(attn.key.bias, jnp.zeros(attn.key.bias.shape), f"{key}.k_proj (no bias)")
        hf_import.assign_linear(attn.out, sd, f"{key}.self_attn.out_proj")
        hf_import.assign_layer_norm(self.self_attn_layer_norm, sd, f"{key}.self_attn_layer_norm")
        hf_import.assign_linear(self.mlp.up, sd, f"{key}.fc1")
        hf_import.assign_linear(self.mlp.down, sd, f"{key}.fc2")
        hf_import.assign_layer_norm(self.final_layer_norm, sd, f"{key}.final_layer_norm")


class WhisperEncoder(nnx.Module):
    """`input_features: float[B, num_mel_bins, 2 * max_source_positions]` (HF's layout, as
    `whisper_log_mel` returns it) -> `float[B, max_source_positions, d_model]`."""

    def __init__(self, cfg: WhisperEncoderConfig, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.d_model

        def conv(cin: int, stride: int) -> nnx.Conv:
            return nnx.Conv(
                cin, d, (3,), strides=stride, padding=((1, 1),),
                kernel_init=layers.partitioned(layers.default_kernel_init, (None, None, "embed")),
                bias_init=layers.partitioned(nnx.initializers.zeros_init(), ("embed",)), **kw,
            )  # fmt: skip

        self.conv1 = conv(cfg.num_mel_bins, 1)
        self.conv2 = conv(d, 2)
        self.embed_positions = nnx.Param(
            layers.default_kernel_init(rngs.params(), (cfg.max_source_positions, d), param_dtype),
            out_sharding=(None, layers.EMBED), eager_sharding=False,
        )  # fmt: skip
        self.layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.encoder_layers)])
        self.layer_norm = layers.layer_norm(d, **kw)

    @property
    def feature_dim(self) -> int:
        return self.config.d_model

    def __call__(self, input_features: jax.Array) -> jax.Array:
        cfg = self.config
        want = (cfg.num_mel_bins, cfg.num_frames)
        if tuple(input_features.shape[1:]) != want:
            raise ValueError(f"expected input_features [B, {want}], got {input_features.shape}")
        x = jnp.swapaxes(input_features, 1, 2)  # [B, frames, mels]: channels last for nnx.Conv
        # Exact (erf) GELU after the convs, as HF's `nn.functional.gelu`.
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        x = x + self.embed_positions[...].astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)

    def load_hf_state(self, sd: hf_import.StateDict, prefix: str = "") -> None:
        """Copies HF `WhisperEncoder` tensors (names under `prefix`) into this module."""
        for conv, name in ((self.conv1, "conv1"), (self.conv2, "conv2")):
            w = sd.get(f"{prefix}{name}.weight").transpose(2, 1, 0)  # [out, in, k] -> [k, in, out]
            hf_import.assign(conv.kernel, w, f"{prefix}{name}.weight")
            hf_import.assign(conv.bias, sd.get(f"{prefix}{name}.bias"), f"{prefix}{name}.bias")
        key = f"{prefix}embed_positions.weight"
        hf_import.assign(self.embed_positions, sd.get(key), key)
        for i, layer in enumerate(self.layers):
            layer.load(sd, f"{prefix}layers.{i}")
        hf_import.assign_layer_norm(self.layer_norm, sd, f"{prefix}layer_norm")

    @classmethod
    def from_config(cls, cfg: WhisperEncoderConfig | str = "tiny", *, seed: int = 0,
                    dtype=jnp.float32, param_dtype=jnp.float32) -> WhisperEncoder:  # fmt: skip
        """A seeded random-init encoder, for tests and runs without pretrained weights."""
        cfg = WhisperEncoderConfig.named(cfg) if isinstance(cfg, str) else cfg
        return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32,
                        param_dtype=jnp.float32) -> WhisperEncoder:  # fmt: skip
        """The encoder of a local HF `WhisperModel` (`encoder.*`) or
        `WhisperForConditionalGeneration` (`model.encoder.*`) directory; the decoder is not read."""
        cfg = WhisperEncoderConfig.from_hf(hf_import.load_config(path))
        model = hf_import.abstract_module(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        )
        sd = hf_import.StateDict(hf_import.load_state_dict(path), source=path)
        prefix = next(
            (p for p in ("model.encoder.", "encoder.") if sd.has_prefix(p + "conv1.")), ""
        )
        sd.mark_unused_ok(r"^(model\.)?decoder\.|^proj_out\.")
        model.load_hf_state(sd, prefix)
        sd.check_all_used()
        hf_import.check_all_set(model, source=path)
        return model
