"""Decoder-only LLMs (HF Llama, Qwen2, Qwen3, GLM-4) in Flax NNX: one module, family switches.

The four `model_type`s share one architecture (pre-RMSNorm blocks, rotary attention with
grouped-query heads, SwiGLU MLP, optionally tied embeddings) and differ in switches read from
`config.json`:

  llama  q/k/v/o bias = `attention_bias`, MLP bias = `mlp_bias`, rope scaling (llama3, linear, yarn)
  qwen2  q/k/v bias (always), no o/MLP bias
  qwen3  RMSNorm of q and k over head_dim before rotary, q/k/v/o bias = `attention_bias`
  glm    q/k/v bias = `attention_bias`, interleaved partial rotary (half of head_dim by default),
         MLP gate/up fused in one checkpoint tensor (split on import)

    model = llm.from_pretrained("/path/to/Qwen2.5-7B", dtype=jnp.bfloat16)  # on the current mesh
    logits = model(input_ids, attention_mask)                               # float[B, T, V]
    out = nnx.jit(llm.generate, static_argnames=("cfg", "method"))(
        model, input_ids, attention_mask, cfg=llm.search_config(model.config, max_new_tokens=32))

Positions. Without explicit `positions`, a token's rotary position is the number of real tokens
before it (`cumsum(attention_mask) - 1`, as HF `generate` computes them), so left-padded prompts
decode as if unpadded. Pass `positions` to reproduce HF's plain `forward` (arange) on padded rows.

Cached decoding. `init_cache(B, S)` gives a static `Cache` of S slots (keys/values per layer,
which slots hold real tokens, the next slot to write). A call with `cache=` writes its T tokens
at slots [index, index + T) and attends causally over the slots written so far; prefill is one
call with the prompt, decoding one call per token. `generate` runs greedy, beam or top-k/top-p
sampling from `tiktalk_jax.decoding` on it under jit.

Loading. `from_pretrained` builds the module abstractly (shapes only), then reads each tensor of
the (sharded, memory-mapped) safetensors checkpoint straight into its `NamedSharding` on the
current mesh (logical axes -> mesh axes by `tiktalk_jax.sharding` rules): every device receives
only its own slice and no host or device ever holds the whole model.

The "llm" model family (end of this file; configs/llm_text.py): the paper's fine-tuned
ChatGLM-6B text baseline, LoRA (or full) fine-tuning on the chat-style prompts of the "llm"
formatter (llm_inputs.py), loss on the response tokens only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from tiktalk_jax import decoding, sharding

# llm_inputs registers the "llm" batch formatter with the input pipeline on import.
from tiktalk_jax.models import hf_import, layers, llm_inputs, lora, losses, registry

Array = jax.Array

FAMILIES = ("llama", "qwen2", "qwen3", "glm")

# HF class defaults that differ between families, for config.json files that omit a field.
_DEFAULTS = {
    "llama": dict(head_dim=None, attention_bias=False, rms_norm_eps=1e-6, partial_rotary=1.0),
    "qwen2": dict(head_dim=None, attention_bias=True, rms_norm_eps=1e-6, partial_rotary=1.0),
    "qwen3": dict(head_dim=128, attention_bias=False, rms_norm_eps=1e-6, partial_rotary=1.0),
    "glm": dict(head_dim=128, attention_bias=True, rms_norm_eps=1.5625e-7, partial_rotary=0.5),
}


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


@dataclasses.dataclass(frozen=True)
class LlmConfig:
    """The network's shape and switches (hashable; build with `from_hf`)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    fused_gate_up: bool = False  # checkpoint layout (GLM): gate and up in one tensor
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # the rope type's fields (factor, ...)
    partial_rotary_factor: float = 1.0
    rope_interleaved: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # "auto": cuDNN flash attention on GPU for 16-bit inputs, XLA elsewhere (layers.py).
    attention_impl: str = "auto"
    # Recompute each layer's activations in the backward pass (training memory for compute).
    remat: bool = False

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} not in {FAMILIES}")
        layers.get_activation(self.hidden_act)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def rope(self) -> layers.Rope:
        return layers.Rope.create(
            self.head_dim,
            interleaved=self.rope_interleaved,
            theta=self.rope_theta,
            partial_rotary_factor=self.partial_rotary_factor,
            rope_type=self.rope_type,
            scaling=dict(self.rope_scaling),
            max_position_embeddings=self.max_position_embeddings,
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlmConfig:
        """From a parsed HF `config.json` (old `rope_theta`/`rope_scaling` fields or v5
        `rope_parameters`); `overrides` replace fields of the result."""
        kind = hf.get("model_type")
        if kind not in FAMILIES:
            raise ValueError(f"model_type {kind!r} is not ported; choose from {FAMILIES}")
        if "sliding_attention" in (hf.get("layer_types") or ()) or (
            hf.get("use_sliding_window") and hf.get("sliding_window")
        ):
            raise ValueError("sliding-window attention layers are not ported")
        d = _DEFAULTS[kind]
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or d["head_dim"] or hf["hidden_size"] // heads
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        partial = rope.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor")
        bias = hf.get("attention_bias", d["attention_bias"])
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        fields = dict(
            model_type=kind,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            hidden_act=hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", d["rms_norm_eps"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if kind == "qwen2" else bool(bias),
            out_bias=bool(bias) if kind in ("llama", "qwen3") else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if kind == "llama" else False,
            qk_norm=kind == "qwen3",
            fused_gate_up=kind == "glm",
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_scaling=_hashable(rope),
            partial_rotary_factor=float(partial or d["partial_rotary"]),
            rope_interleaved=kind == "glm",
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)


# --------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------


class DecoderLayer(nnx.Module):
    """Pre-norm block: `x += attn(norm(x))`, `x += mlp(norm(x))`."""

    def __init__(self, config: LlmConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(c.initializer_range)
        self.attention_norm = layers.RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.attention = layers.MultiHeadAttention(
            c.num_attention_heads,
            c.hidden_size,
            head_dim=c.head_dim,
            use_bias=c.qkv_bias,
            out_bias=c.out_bias,
            num_kv_heads=c.num_key_value_heads,
            rope=c.rope,
            qk_norm_eps=c.rms_norm_eps if c.qk_norm else None,
            attention_impl=c.attention_impl,
            kernel_init=init,
            **kw,
        )
        self.mlp_norm = layers.RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.mlp = layers.Mlp(
            c.hidden_size,
            c.intermediate_size,
            activation=c.hidden_act,
            gated=True,
            use_bias=c.mlp_bias,
            kernel_init=init,
            **kw,
        )

    def __call__(self, x: Array, mask: Array, positions: Array, cache=None, cache_index=None):
        """`x: float[B, T, D]`, `mask: bool[B, 1, T, Tk]`, `positions: int[B, T]`."""
        h = self.attention_norm(x)
        if cache is None:
            a = self.attention(h, mask=mask, positions=positions)
        else:
            a, cache = self.attention(
                h, mask=mask, positions=positions, cache=cache, cache_index=cache_index
            )
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache


def _layer_forward(layer: DecoderLayer, x: Array, mask: Array, positions: Array) -> Array:
    return layer(x, mask, positions)[0]


class Cache(NamedTuple):
    """Decoding state: `kv` per layer `KVCache [B, S, kv_heads, head_dim]`; `valid: bool[B, S]`
    slots holding a real (not padding) token; `index: int32[]` the next slot to write."""

    kv: list[layers.KVCache]
    valid: Array
    index: Array


class Llm(nnx.Module):
    """The decoder with its LM head. Parameters: `embed` `[vocab, embed]`, `layers/i/...`,
    `norm`, `lm_head` `[embed, vocab]` (None when tied to `embed`)."""

    def __init__(self, config: LlmConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(c.initializer_range)
        self.embed = layers.embedding(c.vocab_size, c.hidden_size, init=init, **kw)
        self.layers = nnx.List([DecoderLayer(c, **kw) for _ in range(c.num_hidden_layers)])
        self.norm = layers.RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else layers.linear(
                c.hidden_size,
                c.vocab_size,
                axes=(layers.EMBED, layers.VOCAB),
                use_bias=False,
                kernel_init=init,
                **kw,
            )
        )

    def embed_tokens(self, input_ids: Array) -> Array:
        """`int[B, T] -> float[B, T, D]` (an adapter concatenates its tokens to these)."""
        return self.embed(input_ids)

    def init_cache(self, batch: int, length: int, dtype=None) -> Cache:
        """An empty cache of `length` slots (dtype: the compute dtype, else the parameters')."""
        c = self.config
        dtype = dtype or self.embed.dtype or self.embed.embedding.get_value().dtype
        kv = [
            layers.KVCache.zeros(batch, length, c.num_key_value_heads, c.head_dim, dtype)
            for _ in range(c.num_hidden_layers)
        ]
        return Cache(kv, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

    def hidden_states(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[Array, Cache | None]:
        """Final-norm hidden states `float[B, T, D]` (and the updated cache)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        valid = (
            jnp.ones((b, t), bool)
            if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool)
        )
        if cache is None:
            if positions is None:
                positions = layers.positions_from_mask(valid)
            mask = layers.causal_mask(t) & valid[:, None, None, :]
            for layer in self.layers:
                if self.config.remat:
                    x = nnx.remat(_layer_forward)(layer, x, mask, positions)
                else:
                    x = _layer_forward(layer, x, mask, positions)
            return self.norm(x), None
        index = cache.index
        slots = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
        if positions is None:
            before = jnp.cumsum(slots, axis=1) - 1
            positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(before, index, t, axis=1), 0)
        mask = layers.causal_mask(t, slots.shape[1], offset=index) & slots[:, None, None, :]
        kv = []
        for layer, layer_cache in zip(self.layers, cache.kv, strict=True):
            x, layer_cache = layer(x, mask, positions, layer_cache, index)
            kv.append(layer_cache)
        return self.norm(x), Cache(kv, slots, index + t)

    def logits(self, hidden: Array) -> Array:
        """`float[..., D] -> float[..., V]` (the tied embedding table or `lm_head`)."""
        return self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)

    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array | None = None,
        cache: Cache | None = None,
    ) -> Array | tuple[Array, Cache]:
        """Logits `float[B, T, V]` of `input_ids: int[B, T]` (or `inputs_embeds: float[B, T, D]`);
        `attention_mask: [B, T]` 1 = real token; with `cache`, `(logits, new cache)`."""
        hidden, cache = self.hidden_states(
            input_ids, attention_mask, inputs_embeds=inputs_embeds, positions=positions, cache=cache
        )
        logits = self.logits(hidden)
        return logits if cache is None else (logits, cache)


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------


class GenerateState(NamedTuple):
    """`cache` after the prompt; `first_logits: float32[N, V]` the logits after its last real
    token (the first decoding step returns these instead of running the model)."""

    cache: Cache
    first_logits: Array


def search_config(config: LlmConfig, **overrides: Any) -> decoding.SearchConfig:
    """LLM defaults: no repetition or length penalty, the checkpoint's end and pad tokens.

    `bos_id` (the pad token) fills the search's slot 0, which the model never reads: the prompt
    is in the cache. A repetition penalty therefore sees the generated words (and this filler),
    not the prompt.
    """
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    base = dict(
        max_new_tokens=32,
        num_beams=4,
        length_penalty=1.0,
        repetition_penalty=1.0,
        bos_id=pad,
        eos_ids=config.eos_token_ids,
        pad_id=pad,
    )
    base.update(overrides)
    return decoding.SearchConfig(**base)


def prefill(
    model: Llm,
    input_ids: Array | None,
    attention_mask: Array | None,
    max_new_tokens: int,
    *,
    inputs_embeds: Array | None = None,
) -> GenerateState:
    """Runs the prompt `[B, P]` (left or right padded) into a cache with room for the answer."""
    x = model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, p = x.shape[:2]
    valid = jnp.ones((b, p), bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
    cache = model.init_cache(b, p + max(max_new_tokens - 1, 1))
    hidden, cache = model.hidden_states(attention_mask=valid, inputs_embeds=x, cache=cache)
    last = p - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return GenerateState(cache, model.logits(h).astype(jnp.float32))


def _step(model: Llm, state: GenerateState, tokens: Array, cur_len: Array):
    """`decoding.StepFn`: step 1 returns the prompt's logits; step t feeds `tokens[:, t - 1]`."""

    def first(state):
        return state.first_logits, state.cache

    def feed(state):
        token = jax.lax.dynamic_slice_in_dim(tokens, cur_len - 1, 1, axis=1)
        logits, cache = model(token, cache=state.cache)
        return logits[:, 0].astype(jnp.float32), cache

    logits, cache = jax.lax.cond(cur_len == 1, first, feed, state)
    return logits, state._replace(cache=cache)


def _rows(state: GenerateState, rows: Array) -> GenerateState:
    """Gathers the batch rows of everything but the shared slot index (beam reordering)."""
    take = functools.partial(decoding.default_reorder, rows=rows)
    cache = state.cache
    return GenerateState(
        Cache(take(cache.kv), take(cache.valid), cache.index), take(state.first_logits)
    )


def generate(
    model: Llm,
    input_ids: Array | None = None,
    attention_mask: Array | None = None,
    *,
    cfg: decoding.SearchConfig,
    method: str = "greedy",
    inputs_embeds: Array | None = None,
    rng: Array | None = None,
) -> decoding.SearchOutput:
    """Continues every prompt: `method` "greedy", "beam" (`cfg.num_beams`) or "sample"
    (`cfg.temperature/top_k/top_p`, needs `rng`). Stops a row at any of `cfg.eos_ids`.
    Greedy equals HF `generate(do_sample=False)`; beam search is the repo's (`decoding.py`, the
    original Maria algorithm), not HF's, so its hypotheses may differ from HF beam search.

    Jit with `nnx.jit(generate, static_argnames=("cfg", "method"))`. Returns
    `decoding.SearchOutput` (tokens `int[B, max_new_tokens]`: the answer, its end token, pad).
    """
    if method not in ("greedy", "beam", "sample"):
        raise ValueError(f"method {method!r} not in ('greedy', 'beam', 'sample')")
    state = prefill(
        model, input_ids, attention_mask, cfg.max_new_tokens, inputs_embeds=inputs_embeds
    )
    b = state.first_logits.shape[0]
    step = functools.partial(_step, model)
    if method == "greedy":
        return decoding.greedy_search(step, state, b, cfg)
    if method == "sample":
        if rng is None:
            raise ValueError("sampling needs an rng key")
        return decoding.sample_search(step, state, b, cfg, rng)
    # Beams of an example start from the same prompt: its cache is computed once and copied.
    state = _rows(state, jnp.repeat(jnp.arange(b), cfg.num_beams))
    return decoding.beam_search(step, state, b, cfg, _rows)


# --------------------------------------------------------------------------------------------
# HF checkpoints.
# --------------------------------------------------------------------------------------------


def config_from_pretrained(path: str, **overrides: Any) -> LlmConfig:
    """`LlmConfig` of a local HF directory; end tokens from `generation_config.json` when it
    names them (chat checkpoints list more there than in config.json)."""
    hf = hf_import.load_config(path)
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            hf = {**hf, "eos_token_id": eos}
    return LlmConfig.from_hf(hf, **overrides)


def current_mesh() -> jax.sharding.Mesh | None:
    """The mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh


class _Placer:
    """Puts checkpoint tensors into the variables of `model`, each read slice by slice straight
    into its sharding (the variable's logical axes mapped onto `mesh` by `rules`)."""

    def __init__(self, model: nnx.Module, mesh, rules: Sequence[tuple[str, Any]]):
        self.paths = {
            id(var): sharding.path_str(path)
            for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Variable)
        }
        self.mesh, self.rules, self.warned = mesh, rules, set()

    def sharding(self, var: nnx.Variable, shape: tuple[int, ...]):
        if self.mesh is None:
            return SingleDeviceSharding(jax.devices()[0])
        names = var.get_metadata().get("out_sharding")
        path = self.paths[id(var)]
        spec = sharding.spec_for(path, shape, names, self.mesh, self.rules, _warned=self.warned)
        return NamedSharding(self.mesh, spec)

    def __call__(self, var: nnx.Variable, value: np.ndarray, name: str) -> None:
        target = var.get_value()
        shape, dtype = tuple(target.shape), np.dtype(target.dtype)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: checkpoint shape {value.shape} != {shape}")
        # `value` is a (possibly transposed) view of a memory map: indexing it reads one slice.
        array = jax.make_array_from_callback(
            shape, self.sharding(var, shape), lambda idx: np.asarray(value[idx]).astype(dtype)
        )
        var.set_value(array)


def load_hf_weights(
    model: Llm,
    sd: hf_import.StateDict,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
) -> None:
    """Sets every parameter of `model` (concrete or `hf_import.abstract_module`) from the HF
    `*ForCausalLM` (or bare `*Model`) tensors in `sd`, placed on `mesh` (None: one device)."""
    put = _Placer(model, mesh, rules)
    c = model.config
    p = "model." if sd.has_prefix("model.embed_tokens.") else ""
    hd = c.head_dim

    def linear(module, key: str, reshape=None) -> None:
        w = sd.get(f"{key}.weight")
        put(module.kernel, w.T if reshape is None else reshape(w), f"{key}.weight")
        if getattr(module, "bias", None) is not None:
            bias = sd.get(f"{key}.bias")
            put(module.bias, bias.reshape(module.bias.get_value().shape), f"{key}.bias")

    def heads_in(w: np.ndarray) -> np.ndarray:  # [heads * hd, D] -> [D, heads, hd], a view
        return w.reshape(-1, hd, w.shape[-1]).transpose(2, 0, 1)

    def heads_out(w: np.ndarray) -> np.ndarray:  # [D, heads * hd] -> [heads, hd, D], a view
        return w.reshape(w.shape[0], -1, hd).transpose(1, 2, 0)

    put(model.embed.embedding, sd.get(f"{p}embed_tokens.weight"), f"{p}embed_tokens.weight")
    for i, layer in enumerate(model.layers):
        key = f"{p}layers.{i}"
        att = layer.attention
        linear(att.query, f"{key}.self_attn.q_proj", heads_in)
        linear(att.key, f"{key}.self_attn.k_proj", heads_in)
        linear(att.value, f"{key}.self_attn.v_proj", heads_in)
        linear(att.out, f"{key}.self_attn.o_proj", heads_out)
        if att.query_norm is not None:
            for norm, name in ((att.query_norm, "q_norm"), (att.key_norm, "k_norm")):
                k = f"{key}.self_attn.{name}.weight"
                put(norm.scale, sd.get(k), k)
        for norm, name in (
            (layer.attention_norm, "input_layernorm"),
            (layer.mlp_norm, "post_attention_layernorm"),
        ):
            put(norm.scale, sd.get(f"{key}.{name}.weight"), f"{key}.{name}.weight")
        mlp = layer.mlp
        if c.fused_gate_up:
            k = f"{key}.mlp.gate_up_proj.weight"
            fused, n = sd.get(k), c.intermediate_size
            put(mlp.gate.kernel, fused[:n].T, k)
            put(mlp.up.kernel, fused[n:].T, k)
        else:
            linear(mlp.gate, f"{key}.mlp.gate_proj")
            linear(mlp.up, f"{key}.mlp.up_proj")
        linear(mlp.down, f"{key}.mlp.down_proj")
    put(model.norm.scale, sd.get(f"{p}norm.weight"), f"{p}norm.weight")
    if model.lm_head is not None:
        linear(model.lm_head, "lm_head")
    elif "lm_head.weight" in sd:
        sd.get("lm_head.weight")  # tied: a saved copy of the embedding table
    # Old checkpoints saved the rotary frequency buffers; they are recomputed from the config.
    sd.mark_unused_ok(r"rotary_emb\.inv_freq$")


def from_pretrained(
    path: str,
    dtype=jnp.bfloat16,
    *,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **config_overrides: Any,
) -> Llm:
    """Reads a local HF directory (config.json, model.safetensors or sharded
    model-*.safetensors + index) into an `Llm` with parameters in `param_dtype` (default:
    `dtype`), sharded over `mesh` (default: the mesh set with `jax.set_mesh`, else one device).

    Fails if a checkpoint tensor is left unused or a parameter unset. `config_overrides` are
    `LlmConfig` fields (e.g. `attention_impl="xla"`, `remat=True`).
    """
    config = config_from_pretrained(path, **config_overrides)
    param_dtype = dtype if param_dtype is None else param_dtype
    mesh = current_mesh() if mesh is None else mesh
    model = hf_import.abstract_module(
        lambda: Llm(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    sd = hf_import.StateDict(hf_import.load_state_dict(path), source=path)
    load_hf_weights(model, sd, mesh=mesh, rules=rules)
    sd.check_all_used()
    hf_import.check_all_set(model, path)
    return model


# --------------------------------------------------------------------------------------------
# The "llm" model family (tiktalk_jax/models/registry.py): the paper's fine-tuned ChatGLM-6B
# text baseline as LoRA (or full) fine-tuning of a ported decoder on chat-style prompts.
# --------------------------------------------------------------------------------------------

# Shapes for random init, as HF config.json fields (`LlmConfig.from_hf`). The vocabulary is the
# tokenizer's unless `config.model.vocab_size` is set (the 7B shapes keep their own).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Wide enough that a frozen random base gives logits LoRA can steer (CPU tests train
        # adapters on it; at 0.02 its head is near uniform and the loss barely moves).
        initializer_range=0.2,
    ),
    # A CPU-sized LLM that, fully fine-tuned on the sample, learns to read its prompt (it names a
    # colour written into the title; `tiny` does not): the frozen LLM of benchmarks/blip2_vision.py
    # --llm=reading. Init at 0.02 as HF's: it is trained, not steered by adapters.
    "small": dict(
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.02,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    # The 1.5B class BLIP-2 is benchmarked with (benchmarks/train_step.py --model=blip2).
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
    # GLM-4-9B: ChatGLM-6B's successor (ChatGLM-6B itself, GLM-130B-style, is not ported).
    "glm4-9b": dict(
        model_type="glm",
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=1e4,
        rms_norm_eps=1.5625e-7,
    ),
}

# LoRA on every projection of the blocks (attention q/k/v/out, MLP gate/up/down).
DEFAULT_LORA_TARGETS = r"attention/(query|key|value|out)$|mlp/(gate|up|down)$"


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` section of the family.

    Fields: name; init_from (a local HF checkpoint directory, loaded sharded onto the mesh; its
    config.json wins over `shape`); shape (a `SHAPES` name for random init); vocab_size (None:
    the tokenizer's, `llm_inputs.token_spec`); dtype (compute) / param_dtype (storage of the
    base; LoRA matrices use lora.param_dtype); attention_impl ("auto" | "xla" | "cudnn"); remat
    (recompute each block in the backward pass); lora.rank (0: no adapters, e.g. full
    fine-tuning), lora.alpha, lora.targets (regex over module paths), lora.param_dtype.
    """
    placeholder = ml_collections.config_dict.placeholder
    config = ml_collections.ConfigDict(
        dict(
            name="llm",
            init_from=placeholder(str),
            shape="tiny",
            vocab_size=placeholder(int),
            dtype="float32",
            param_dtype="float32",
            attention_impl="auto",
            remat=False,
            lora=dict(rank=8, alpha=16.0, targets=DEFAULT_LORA_TARGETS, param_dtype="float32"),
        )
    )
    config.update(overrides)
    return config


def decode_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The family's default `config.decode` section (used when a config has none).

    The paper gives no decoding settings for its LLM rows; this is the original BLIP-2's (beam 5,
    at most 30 tokens), whose LLM is the same fine-tuned ChatGLM-6B. method: "greedy" | "beam" |
    "sample" (temperature / top_k / top_p, seeded by `seed` and the batch's first record).
    """
    config = ml_collections.ConfigDict(
        dict(
            method="beam",
            num_beams=5,
            max_new_tokens=30,
            length_penalty=1.0,
            repetition_penalty=1.0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            seed=0,
        )
    )
    config.update(overrides)
    return config


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Llm:
    """The family's model: `init_from` loaded onto the current mesh, or `shape` randomly
    initialised; then LoRA adapters when `config.model.lora.rank > 0`. Which parameters train
    is `config.frozen` (`lora.frozen_regex()` trains the adapters only)."""
    m = config.model
    spec = llm_inputs.token_spec(config)
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    switches = dict(attention_impl=str(m.get("attention_impl", "auto")), remat=bool(m.remat))
    if m.get("init_from"):
        if not config.input.get("tokenizer"):
            # A vocabulary trained on the data would not match the checkpoint's embeddings.
            raise ValueError("init_from needs config.input.tokenizer (the checkpoint's own)")
        rules = tuple(tuple(r) for r in config.sharding.rules)
        model = from_pretrained(
            m.init_from, dtype, param_dtype=param_dtype, rules=rules, **switches
        )
    else:
        if m.shape not in SHAPES:
            raise ValueError(f"model.shape {m.shape!r} not in {sorted(SHAPES)}")
        hf = dict(SHAPES[m.shape])
        if m.get("vocab_size") or "vocab_size" not in hf:
            hf["vocab_size"] = int(m.get("vocab_size") or spec.vocab_size)
        hf.update(eos_token_id=list(spec.stop_ids), pad_token_id=spec.pad_id)
        cfg = LlmConfig.from_hf(hf, **switches)
        model = Llm(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if spec.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {spec.vocab_size} tokens, the model embeds "
            f"{model.config.vocab_size}"
        )
    if int(m.lora.rank) > 0:
        lora.apply(
            model,
            rank=int(m.lora.rank),
            alpha=float(m.lora.alpha),
            targets=m.lora.targets,
            rngs=rngs,
            param_dtype=jnp.dtype(m.lora.param_dtype),
        )
    return model


def _joined(batch: Mapping[str, Array]) -> tuple[Array, Array, int, int]:
    """`[prompt | response]` ids `int[B, Lc + Lr]` and mask (left-padded prompt, right-padded
    response: the response follows the last real prompt token; positions count real tokens)."""
    lc, lr = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    ids = jnp.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1)
    mask = jnp.concatenate(
        [batch["prompt_mask"].astype(bool), batch["response_mask"].astype(bool)], axis=1
    )
    return ids, mask, lc, lr


def loss_fn(model: Llm, batch: Mapping[str, Array], rngs: nnx.Rngs | None = None):
    """Next-token cross-entropy on the response tokens only (its words and end token), mean
    over tokens of the examples with `example_mask`. Returns `(loss, {"token_accuracy",
    "tokens"})`. These decoders have no dropout: `rngs` is unused."""
    del rngs
    ids, mask, lc, lr = _joined(batch)
    hidden, _ = model.hidden_states(ids, mask)
    # Only the Lr slots that predict a response token reach the vocabulary-sized head.
    logits = model.logits(hidden[:, lc - 1 : lc + lr - 1]).astype(jnp.float32)
    targets = batch["response_ids"]
    return losses.response_cross_entropy(
        logits, targets, batch["response_mask"], batch.get("example_mask")
    )


def score_responses(
    model: Llm, prompt_ids: Array, prompt_mask: Array, ids: Array, mask: Array
) -> Array:
    """Log-likelihood `float32[B, C]` of C responses per prompt, `sum_t log p(r_t | prompt,
    r_<t)` over the real tokens of `ids: int[B, C, L]` (laid out like `response_ids`).

    The prompt runs once per example; its cache is copied to the C candidates, which then run
    in one call (logits `[B * C, L, V]`: chunk C for large vocabularies)."""
    b, c, length = ids.shape
    state = prefill(model, prompt_ids, prompt_mask, length)
    state = _rows(state, jnp.repeat(jnp.arange(b), c))
    flat, valid = ids.reshape(b * c, length), mask.reshape(b * c, length).astype(bool)
    logits = [state.first_logits[:, None]]
    if length > 1:
        after, _ = model(flat[:, :-1], valid[:, :-1], cache=state.cache)
        logits.append(after.astype(jnp.float32))
    logp = jax.nn.log_softmax(jnp.concatenate(logits, axis=1))
    target = jnp.take_along_axis(logp, flat[..., None], axis=2)[..., 0]
    return jnp.sum(jnp.where(valid, target, 0.0), axis=1).reshape(b, c)


def decode_settings(config: ml_collections.ConfigDict, model_config: LlmConfig):
    """(search config, method, seed) from `config.decode` over `decode_config()`, ending at the
    template's end token (and the tokenizer's eos)."""
    spec = llm_inputs.token_spec(config)
    d = decode_config()
    d.update(dict(config.get("decode") or {}))
    search = search_config(
        model_config,
        max_new_tokens=int(d.max_new_tokens),
        num_beams=int(d.num_beams),
        length_penalty=float(d.length_penalty),
        repetition_penalty=float(d.repetition_penalty),
        temperature=float(d.temperature),
        top_k=int(d.top_k),
        top_p=float(d.top_p),
        bos_id=spec.pad_id,
        pad_id=spec.pad_id,
        eos_ids=spec.stop_ids,
    )
    return search, str(d.method), int(d.seed)


def family_generate(model: Llm, batch: Mapping[str, Array], config) -> Array:
    """Registry `generate`: `int32[B, max_new_tokens]` (the response, its end token, padding)
    continuing `prompt_ids`. Traceable: jit it with `config` closed over."""
    search, method, seed = decode_settings(config, model.config)
    rng = None
    if method == "sample":
        first = jnp.asarray(batch["record_index"])[0] if "record_index" in batch else 0
        rng = jax.random.fold_in(jax.random.key(seed), first)
    out = generate(
        model, batch["prompt_ids"], batch["prompt_mask"], cfg=search, method=method, rng=rng
    )
    return out.tokens


def family_score(model: Llm, batch: Mapping[str, Array], config) -> Array:
    """Registry `score`: log-likelihood `float32[B, C]` of `batch["candidate_ids"]`, laid out
    like `response_ids` (`response end`; `llm_inputs.encode_candidates`, the family's
    `encode_candidates` hook)."""
    del config
    ids, mask = batch["candidate_ids"], jnp.asarray(batch["candidate_mask"]).astype(bool)
    return score_responses(model, batch["prompt_ids"], batch["prompt_mask"], ids, mask)


registry.register(
    registry.ModelFamily(
        name="llm",
        build=build,
        loss_fn=loss_fn,
        formatter=llm_inputs.FORMATTER,
        frozen_source=lambda config: config.model.get("init_from"),
        generate=family_generate,
        score=family_score,
        decode_text=llm_inputs.decode_text,
        encode_candidates=llm_inputs.encode_candidates,
    )
)
