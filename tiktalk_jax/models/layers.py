"""Shared transformer pieces: attention (self, cross, cached), MLP, masks, annotated params.

Every model in the repo (BERT/Maria, Q-Former, EVA ViT, Whisper encoder, GPT-2, Livebot, the
LLM) builds its blocks from these, so numerics (float32 softmax, masking, dropout placement) and
sharding annotations are decided once.

Dtypes: `dtype` is the compute dtype (e.g. `jnp.bfloat16`; None = the inputs' dtype),
`param_dtype` the storage dtype of parameters (float32 by default). Attention logits and
softmax always run in float32.

Logical sharding axes. Every parameter carries an `out_sharding` metadata tuple of logical axis
names (`nnx.with_partitioning(..., eager_sharding=False)`: nothing is sharded at creation, so
modules build without a mesh). The train loop maps names to mesh axes (data / fsdp / tensor):

    with nnx.logical_axis_rules([("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
                                 ("vocab", "tensor"), ("kv", None)]):
        specs = nnx.get_partition_spec(nnx.state(model))   # PartitionSpecs over mesh axes

Names:

  embed  the residual-stream width of a model (any input width): q/k/v kernel dim 0, LN scale
  heads  attention heads: q/k/v kernel dim 1
  kv     per-head feature (head_dim), normally not sharded: q/k/v kernel dim 2
  mlp    a hidden width that is not the residual stream: MLP up kernel dim 1
  vocab  token vocabulary: word embeddings dim 0
  None   never sharded (small tables: position / token-type embeddings dim 0)

Kernel layouts (chosen so HF `nn.Linear` weights import by transpose + reshape):
  q/k/v `[embed, heads, kv]` (+ bias `[heads, kv]`), attention output `[heads, kv, embed]`
  (+ bias `[embed]`), MLP up/gate `[embed, mlp]`, down `[mlp, embed]`.

Attention masks are boolean, `bool[B, 1 or H, Tq, Tk]`, True where a query may attend a key.
A fully masked query row gives a uniform distribution (as HF's additive masks do); callers drop
such rows (padding queries) from losses.

Key/value cache (static shapes, jit-friendly): `KVCache.zeros(B, S, heads, head_dim)` holds S
slots; a self-attention call with `cache=..., cache_index=i` writes its Tq new keys/values at
slots [i, i + Tq) (`lax.dynamic_update_slice`, i may be traced) and attends over all S slots,
with slots >= i + Tq (not written yet) masked out on top of the caller's mask. Prefill =
one call with the whole prefix at i = 0; decoding = one call per step. `reorder_cache` gathers
along the batch axis (beam search). For cross-attention, `project_kv` precomputes a read-only
`KVCache` of the encoder states, passed with `cache_index=None`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Dtype = Any
Axes = tuple[str | None, ...]

EMBED, MLP, HEADS, KV, VOCAB = "embed", "mlp", "heads", "kv", "vocab"

default_kernel_init = nnx.initializers.normal(stddev=0.02)


def partitioned(init: Callable, axes: Axes) -> Callable:
    """Wraps an initializer so the created parameter carries logical axis names `axes`."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# Names as in HF `ACT2FN`, so a config's `hidden_act` selects the same function.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------
# Annotated building blocks.
# --------------------------------------------------------------------------------------------


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: Axes = (EMBED, MLP),
    use_bias: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = default_kernel_init,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """`nnx.Linear` with kernel `[in, out]` named `axes` and bias named `axes[1]`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def layer_norm(
    features: int,
    *,
    eps: float = 1e-5,
    use_bias: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
    """`nnx.LayerNorm` over the last axis with scale/bias named `embed`.

    Two-pass variance (`use_fast_variance=False`), as torch computes it: E[x^2] - E[x]^2 loses
    digits on activations with a large mean.
    """
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=partitioned(nnx.initializers.ones_init(), (EMBED,)),
        bias_init=partitioned(nnx.initializers.zeros_init(), (EMBED,)),
        rngs=rngs,
    )


def embedding(
    num_embeddings: int,
    features: int,
    *,
    axes: Axes = (VOCAB, EMBED),
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    init: Callable = default_kernel_init,
    rngs: nnx.Rngs,
) -> nnx.Embed:
    """`nnx.Embed` whose table `[num, features]` is named `axes` (use `(None, EMBED)` for small
    tables such as positions or token types)."""
    return nnx.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=partitioned(init, axes),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """`x / sqrt(mean(x^2) + eps) * scale` over the last axis, as HF Llama/Qwen/GLM compute it:
    normalised in float32, cast back to the compute dtype, then scaled (the order matters in bf16).

    `x: float[..., features] -> float[..., features]`; `scale` is named `axes` (`(EMBED,)` for
    the residual stream, `(KV,)` for per-head q/k norms).
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-6,
        axes: Axes = (EMBED,),
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(
            partitioned(nnx.initializers.ones_init(), axes)(rngs.params(), (features,), param_dtype)
        )

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype if self.dtype is None else self.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(dtype) * self.scale.value.astype(dtype)


class Mlp(nnx.Module):
    """Linear - activation - Linear, optionally gated (`down(act(gate(x)) * up(x))`, SwiGLU style).

    `x: float[..., D] -> float[..., out_features or D]`. Dropout, residual and norms belong to the
    block that uses it, because their placement differs between model families.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        out_features: int | None = None,
        activation: str = "gelu",
        gated: bool = False,
        use_bias: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Callable = default_kernel_init,
        rngs: nnx.Rngs,
    ):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init)
        self.activation = activation
        self._act = get_activation(activation)
        self.up = linear(features, hidden_features, axes=(EMBED, MLP), rngs=rngs, **kw)
        self.gate = (
            linear(features, hidden_features, axes=(EMBED, MLP), rngs=rngs, **kw) if gated else None
        )
        self.down = linear(
            hidden_features, out_features or features, axes=(MLP, EMBED), rngs=rngs, **kw
        )

    def __call__(self, x: Array) -> Array:
        if self.gate is not None:
            h = self._act(self.gate(x)) * self.up(x)
        else:
            h = self._act(self.up(x))
        return self.down(h)


# --------------------------------------------------------------------------------------------
# Masks.
# --------------------------------------------------------------------------------------------


def padding_mask(valid: Array, num_queries: int | None = None) -> Array:
    """`valid: bool[B, Tk]` (True = real token) -> `bool[B, 1, Tq, Tk]` masking padded keys.

    Padded queries keep attending (like HF); `Tq` defaults to `Tk`.
    """
    valid = jnp.asarray(valid).astype(bool)
    tq = valid.shape[-1] if num_queries is None else num_queries
    return jnp.broadcast_to(valid[:, None, None, :], (valid.shape[0], 1, tq, valid.shape[-1]))


def positions_from_mask(valid: Array) -> Array:
    """`bool[B, T]` -> `int32[B, T]`: the number of real tokens before each slot, so left or right
    padding shifts no position (padding slots get their neighbour's; they are never attended)."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(valid).astype(jnp.int32), axis=1) - 1, 0)


def causal_mask(num_queries: int, num_keys: int | None = None, offset: int | Array = 0) -> Array:
    """`bool[1, 1, Tq, Tk]`: query i (at absolute position i + offset) sees keys j <= i + offset."""
    num_keys = num_queries if num_keys is None else num_keys
    q = jnp.arange(num_queries)[:, None] + offset
    k = jnp.arange(num_keys)[None, :]
    return (k <= q)[None, None]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given (broadcastable, boolean) masks; None entries are ignored."""
    masks = [jnp.asarray(m).astype(bool) for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


def as_attention_mask(mask: Array | None) -> Array | None:
    """Normalises a user mask (bool or 0/1 numbers, True/1 = attend) to `bool[B, 1|H, Tq, Tk]`.

    Accepts `[B, Tk]` (padding), `[B, Tq, Tk]` (full per-example mask) or 4D.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    if mask.ndim == 2:
        return padding_mask(mask)
    if mask.ndim == 3:
        return mask[:, None]
    if mask.ndim == 4:
        return mask
    raise ValueError(f"attention mask must be [B,Tk], [B,Tq,Tk] or [B,H,Tq,Tk]; got {mask.shape}")


# --------------------------------------------------------------------------------------------
# Key/value cache.
# --------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Keys and values of one attention layer, `float[B, S, heads, head_dim]` each (a pytree)."""

    key: Array
    value: Array

    @classmethod
    def zeros(
        cls, batch: int, length: int, num_heads: int, head_dim: int, dtype: Dtype = jnp.float32
    ) -> KVCache:
        shape = (batch, length, num_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.key.shape[1]

    def update(self, key: Array, value: Array, index: int | Array) -> KVCache:
        """Writes `key/value: [B, T, heads, head_dim]` into slots [index, index + T)."""
        start = (0, index, 0, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(self.key, key.astype(self.key.dtype), start),
            jax.lax.dynamic_update_slice(self.value, value.astype(self.value.dtype), start),
        )


def reorder_cache(caches: Any, indices: Array) -> Any:
    """Gathers every cache array of a pytree (e.g. a list of `KVCache`) along the batch axis:
    `new[b] = old[indices[b]]` (beam search reordering)."""
    return jax.tree.map(lambda a: jnp.take(a, indices, axis=0), caches)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings.
# --------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(
    head_dim: int,
    *,
    theta: float = 10000.0,
    partial_rotary_factor: float = 1.0,
    rope_type: str = "default",
    scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies `float32[rotary_dim // 2]` and the cos/sin scale of a HF rope config.

    The arithmetic follows transformers' `modeling_rope_utils` step by step in float32 (the
    frequencies are parameters of the function being matched, not of the model). `scaling` holds
    the type's fields (`factor`, `low_freq_factor`, `beta_fast`, ...); "dynamic" and "longrope"
    depend on the running sequence length and are not ported.
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; choose from {ROPE_TYPES}")
    p = dict(scaling or {})
    dim = int(head_dim * partial_rotary_factor)
    f32 = np.float32
    pos_freqs = f32(theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim))
    inv = (f32(1.0) / pos_freqs).astype(f32)
    attention_scaling = 1.0
    if rope_type == "linear":
        inv = inv / f32(p["factor"])
    elif rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p.get("original_max_position_embeddings") or max_position_embeddings
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > old / low, inv / f32(factor), inv)
        smooth = (f32(old) / wavelen - f32(low)) / f32(high - low)
        smoothed = (1 - smooth) * scaled / f32(factor) + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        orig = p.get("original_max_position_embeddings") or max_position_embeddings
        factor = p.get("factor") or max_position_embeddings / orig
        attention_scaling = p.get("attention_factor")
        if attention_scaling is None:
            mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_scaling = _yarn_mscale(factor, mscale) / _yarn_mscale(
                    factor, mscale_all_dim
                )
            else:
                attention_scaling = _yarn_mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (f32(1.0) / (f32(factor) * pos_freqs)) * (1 - extrapolation) + (
            f32(1.0) / pos_freqs
        ) * extrapolation
    return np.asarray(inv, f32), float(attention_scaling)


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary position embedding of the first `rotary_dim` features of every head (static).

    `interleaved=False` rotates the pairs (i, i + rotary_dim / 2) (Llama, Qwen: HF
    `rotate_half`); True rotates adjacent pairs (2i, 2i + 1) (GLM-4). Features past
    `rotary_dim` pass unchanged (partial rotary). cos/sin are computed in float32 from the
    positions, scaled by `attention_scaling` (YaRN) and cast to the input dtype, as HF does.
    """

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0
    interleaved: bool = False

    @classmethod
    def create(cls, head_dim: int, *, interleaved: bool = False, **kwargs: Any) -> Rope:
        """From a HF rope config; `kwargs` as `rope_frequencies`."""
        inv, scale = rope_frequencies(head_dim, **kwargs)
        return cls(tuple(float(f) for f in inv), scale, interleaved)

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def __call__(self, x: Array, positions: Array) -> Array:
        """`x: float[B, T, heads, head_dim]`, `positions: int[B|1, T]` -> rotated `x`."""
        rot = self.rotary_dim
        freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(self.inv_freq, jnp.float32)
        cos = (jnp.cos(freqs) * self.attention_scaling).astype(x.dtype)[:, :, None, :]
        sin = (jnp.sin(freqs) * self.attention_scaling).astype(x.dtype)[:, :, None, :]
        xr, rest = x[..., :rot], x[..., rot:]
        if self.interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
        else:
            x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
            out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


# --------------------------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------------------------

ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "auto")


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    dropout: nnx.Dropout | None = None,
    deterministic: bool | None = None,
) -> Array:
    """`softmax(q k^T / sqrt(d)) v` with float32 logits/softmax.

    query `[B, Tq, H, d]`, key/value `[B, Tk, K, d]`, mask `bool[B|1, H|1, Tq, Tk]`
    -> `[B, Tq, H, d]`. K = H, or K divides H (grouped-query attention: query head i reads
    key/value head i // (H / K), as HF's `repeat_kv`; keys are not copied per query head).
    """
    if key.shape[-2] != query.shape[-2]:
        return _grouped_attention(query, key, value, mask, dropout, deterministic)
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value)


def _grouped_attention(query, key, value, mask, dropout, deterministic) -> Array:
    b, tq, h, d = query.shape
    kh = key.shape[-2]
    if h % kh:
        raise ValueError(f"{h} query heads are not a multiple of {kh} key/value heads")
    g = h // kh
    q = query.reshape(b, tq, kh, g, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, key, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32).reshape(b, h, tq, -1) * d**-0.5
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    probs = probs.reshape(b, kh, g, tq, -1)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, value).reshape(b, tq, h, d)


def _fused_attention(query: Array, key: Array, value: Array, mask: Array | None, impl: str):
    """`jax.nn.dot_product_attention` (same shapes and numerics contract as above)."""
    b, tq, h, _ = query.shape
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], tq, key.shape[1]))
    if impl == "auto":
        # cuDNN flash attention takes 16-bit inputs only; anything else (or a shape cuDNN refuses
        # at trace time) runs the XLA implementation, whose numerics equal "einsum".
        if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return jax.nn.dot_product_attention(
                    query, key, value, mask=mask, implementation="cudnn"
                )
            except (ValueError, NotImplementedError, RuntimeError) as e:
                logging.info("cuDNN attention not applicable (%s); using XLA", e)
        impl = "xla"
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=impl)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with separate q/k/v projections; self- or cross-attention.

    `inputs_q: float[B, Tq, D]`; `inputs_kv: float[B, Tk, Dkv]` (cross-attention; `Dkv` =
    `kv_features`, e.g. 1408-d image tokens into a 768-d Q-Former) or None (self-attention).
    Returns `float[B, Tq, out_features or D]`, or `(output, KVCache)` when a cache is given.
    Decoder-LLM options (`num_kv_heads`, `rope`, `qk_norm_eps`, `attention_impl`): see the
    module docstring.
    """

    def __init__(
        self,
        num_heads: int,
        features: int,
        *,
        kv_features: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        use_bias: bool = True,
        key_bias: bool | None = None,
        out_bias: bool | None = None,
        dropout_rate: float = 0.0,
        num_kv_heads: int | None = None,
        rope: Rope | None = None,
        qk_norm_eps: float | None = None,
        attention_impl: str = "einsum",
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Callable = default_kernel_init,
        rngs: nnx.Rngs,
    ):
        if head_dim is None:
            if features % num_heads:
                raise ValueError(f"features {features} not divisible by num_heads {num_heads}")
            head_dim = features // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {attention_impl!r} not in {ATTENTION_IMPLS}")
        if attention_impl != "einsum" and dropout_rate:
            raise ValueError("attention dropout needs attention_impl='einsum'")
        if rope is not None and rope.rotary_dim > head_dim:
            raise ValueError(f"rotary dim {rope.rotary_dim} exceeds head_dim {head_dim}")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.rope, self.attention_impl = rope, attention_impl
        kv_features = features if kv_features is None else kv_features
        out_features = features if out_features is None else out_features
        out_bias = use_bias if out_bias is None else out_bias
        # Whisper and EVA-ViT (BLIP-2) have q/v biases but no key bias.
        key_bias = use_bias if key_bias is None else key_bias
        zeros = nnx.initializers.zeros_init()

        def proj(in_features: int, heads: int, bias: bool) -> nnx.Einsum:
            return nnx.Einsum(
                "...d,dhk->...hk",
                (in_features, heads, head_dim),
                (heads, head_dim) if bias else None,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=partitioned(kernel_init, (EMBED, HEADS, KV)),
                bias_init=partitioned(zeros, (HEADS, KV)),
                rngs=rngs,
            )

        self.query = proj(features, num_heads, use_bias)
        self.key = proj(kv_features, num_kv_heads, key_bias)
        self.value = proj(kv_features, num_kv_heads, use_bias)
        self.out = nnx.Einsum(
            "...hk,hkd->...d",
            (num_heads, head_dim, out_features),
            (out_features,) if out_bias else None,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=partitioned(kernel_init, (HEADS, KV, EMBED)),
            bias_init=partitioned(zeros, (EMBED,)),
            rngs=rngs,
        )
        norm = dict(eps=qk_norm_eps, axes=(KV,), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = RMSNorm(head_dim, **norm) if qk_norm_eps is not None else None
        self.key_norm = RMSNorm(head_dim, **norm) if qk_norm_eps is not None else None
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def _keys(self, inputs_kv: Array) -> Array:
        key = self.key(inputs_kv)
        return key if self.key_norm is None else self.key_norm(key)

    def project_kv(self, inputs_kv: Array) -> KVCache:
        """Keys/values of `inputs_kv: float[B, Tk, Dkv]`, reusable as a read-only cross cache."""
        return KVCache(self._keys(inputs_kv), self.value(inputs_kv))

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: Array | None = None,
        cache: KVCache | None = None,
        cache_index: int | Array | None = None,
        positions: Array | None = None,
        deterministic: bool | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Args:
        mask: `bool[B|1, H|1, Tq, Tk]` (Tk = cache length when a cache is given).
        cache: with `cache_index`, a self-attention cache to write the new keys/values into;
          without, precomputed read-only keys/values (`project_kv`) and `inputs_kv` is None.
        cache_index: slot of the first of the Tq new tokens (int or traced int32 scalar).
        positions: `int[B|1, Tq]` rotary positions of the new tokens (self-attention with
          `rope` only); default `cache_index + arange(Tq)`.
        deterministic: overrides the module's dropout mode (`model.train()` / `.eval()`).
        """
        query = self.query(inputs_q)
        if self.query_norm is not None:
            query = self.query_norm(query)
        if cache is not None and cache_index is None:
            if inputs_kv is not None:
                raise ValueError("pass either inputs_kv or a precomputed cache, not both")
            if self.rope is not None:
                raise ValueError("rotary embeddings need self-attention keys")
            key, value = cache.key, cache.value
        else:
            if self.rope is not None and inputs_kv is not None:
                raise ValueError("rotary embeddings need self-attention keys")
            kv_in = inputs_q if inputs_kv is None else inputs_kv
            key, value = self._keys(kv_in), self.value(kv_in)
            if self.rope is not None:
                if positions is None:
                    start = 0 if cache_index is None else cache_index
                    positions = start + jnp.arange(inputs_q.shape[-2])[None, :]
                query, key = self.rope(query, positions), self.rope(key, positions)
            if cache is not None:
                cache = cache.update(key, value, cache_index)
                key, value = cache.key.astype(query.dtype), cache.value.astype(query.dtype)
                written = jnp.arange(cache.length) < cache_index + inputs_q.shape[-2]
                mask = combine_masks(mask, written[None, None, None, :])
        if self.attention_impl == "einsum":
            out = dot_product_attention(
                query, key, value, mask, dropout=self.dropout, deterministic=deterministic
            )
        else:
            out = _fused_attention(query, key, value, mask, self.attention_impl)
        out = self.out(out)
        return out if cache is None else (out, cache)


def param_axes(module: nnx.Module) -> dict[str, Axes | None]:
    """`{"path/to/param": logical axis names or None}` for every `nnx.Param` of `module`."""
    return {
        "/".join(map(str, path)): var.get_metadata().get("out_sharding")
        for path, var in nnx.iter_graph(module)
        if isinstance(var, nnx.Param)
    }


def check_param_axes(module: nnx.Module) -> None:
    """Raises if a parameter lacks logical axis names or their count differs from its rank."""
    bad = []
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("out_sharding")
            if axes is None or len(axes) != var.value.ndim:
                bad.append(f"{'/'.join(map(str, path))} {tuple(var.value.shape)}: {axes}")
    if bad:
        raise ValueError("parameters without valid logical axes: " + "; ".join(bad))
