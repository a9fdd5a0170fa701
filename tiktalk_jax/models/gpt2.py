"""GPT-2 (HF `GPT2LMHeadModel`) in Flax NNX on `layers`, and the DialoGPT baseline around it.

A port of transformers' `modeling_gpt2.py`: learned absolute positions, pre-LN blocks
(`x + drop(attn(ln_1(x)))`, `x + drop(mlp(ln_2(x)))`), a final `ln_f`, gelu_new, and an LM head
tied to the token embeddings. HF stores its projections as `Conv1D` with weights `[in, out]`
(not transposed like `nn.Linear`); `c_attn` packs q, k and v along the output axis.

    model = gpt2.from_pretrained("/path/to/GPT2LMHeadModel")    # eval mode
    logits = model(input_ids, attention_mask)                      # float[B, T, V]

The DialoGPT row of the paper fine-tunes a Chinese GPT-2 chit-chat checkpoint (BERT vocabulary,
`[CLS] turn_1 [SEP] ... turn_n [SEP] response [SEP]`). The `gpt2` formatter (gpt2_inputs.py)
lays a dialogue out in two fixed-size slots:

    context  int[B, Lc]   `[CLS] turn_1 [SEP] ... turn_n`, LEFT-padded (ends at slot Lc - 1)
    response int[B, Lr]   `[SEP] response [SEP]`, right-padded

so every example's last context token sits next to its response: the response's leading [SEP]
is the separator after the last turn and the start token of decoding (`SearchConfig.bos_id`).
Positions count real tokens only (`cumsum(mask) - 1`), so padding changes nothing. The loss is
the response's next-token cross-entropy (its words and the closing [SEP]), averaged over tokens.

Decoding (`generate`): the context is run once into a static key/value cache (`layers.KVCache`,
Lc + max_new_tokens slots), copied per beam, and each step runs one token; `uncached=False`
recomputes the whole sequence every step (the reference the cached path is tested against).
`score_candidates` gives the teacher-forced log-likelihood of candidate responses (retrieval),
reusing one context cache per example for all its candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tiktalk_jax import decoding

# gpt2_inputs registers the "gpt2" batch formatter with the input pipeline on import.
from tiktalk_jax.models import gpt2_inputs, hf_import, layers, losses, registry

Array = jax.Array
Batch = Mapping[str, Array]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of HF `GPT2Config` that shape the network (defaults: the 117M GPT-2)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self):
        layers.get_activation(self.activation_function)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} not divisible by {self.n_head} heads")

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """From a parsed HF `config.json`; refuses variants whose numerics are not ported."""
        if not hf.get("scale_attn_weights", True):
            raise ValueError("GPT-2 checkpoints without scale_attn_weights are not supported")
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("scale_attn_by_inverse_layer_idx is not supported")
        if hf.get("add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported")
        # reorder_and_upcast_attn only changes float16 numerics; logits run in float32 here.
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})


class GPT2Block(nnx.Module):
    """Pre-LN block: `x += drop(attn(ln_1(x)))`; `x += drop(mlp(ln_2(x)))`."""

    def __init__(self, config: GPT2Config, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.n_embd
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        ln = dict(eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = layers.layer_norm(d, **ln)
        self.attn = layers.MultiHeadAttention(
            config.n_head, d, dropout_rate=config.attn_pdrop, **kw
        )
        self.attn_dropout = nnx.Dropout(config.resid_pdrop, rngs=rngs)
        self.ln_2 = layers.layer_norm(d, **ln)
        self.mlp = layers.Mlp(d, config.inner_size, activation=config.activation_function, **kw)
        self.mlp_dropout = nnx.Dropout(config.resid_pdrop, rngs=rngs)
        # GPT-2's scaled init: the two projections into the residual stream get
        # std / sqrt(2 * n_layer) (HF `_init_weights`), so the stream's variance does not grow
        # with depth.
        scaled = nnx.initializers.normal(config.initializer_range / math.sqrt(2 * config.n_layer))
        for kernel in (self.attn.out.kernel, self.mlp.down.kernel):
            kernel.value = scaled(rngs.params(), kernel.value.shape, kernel.value.dtype)

    def __call__(self, x: Array, mask=None, cache=None, cache_index=None):
        """`x: float[B, T, D]`, `mask: bool[B, 1, T, Tk]` -> `(float[B, T, D], cache)`."""
        h = self.ln_1(x)
        if cache is None:
            a = self.attn(h, mask=mask)
        else:
            a, cache = self.attn(h, mask=mask, cache=cache, cache_index=cache_index)
        x = x + self.attn_dropout(a)
        x = x + self.mlp_dropout(self.mlp(self.ln_2(x)))
        return x, cache


class GPT2(nnx.Module):
    """`GPT2LMHeadModel`: `model(input_ids, attention_mask=None, position_ids=None,
    token_type_ids=None) -> logits float[B, T, V]`.

    `attention_mask: [B, T]` marks real tokens (True/1); causality is always added. Positions
    default to `0..T-1` without a mask (as HF) and to `cumsum(mask) - 1` with one (what HF's
    generate does for left padding). Token types, when given, are embedded with the token table
    (as HF).
    """

    def __init__(self, config: GPT2Config, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        d = config.n_embd
        init = nnx.initializers.normal(config.initializer_range)
        emb = dict(dtype=dtype, param_dtype=param_dtype, init=init, rngs=rngs)
        self.wte = layers.embedding(config.vocab_size, d, **emb)
        self.wpe = layers.embedding(config.n_positions, d, axes=(None, layers.EMBED), **emb)
        self.drop = nnx.Dropout(config.embd_pdrop, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.h = nnx.List([GPT2Block(config, **kw) for _ in range(config.n_layer)])
        self.ln_f = layers.layer_norm(d, eps=config.layer_norm_epsilon, **kw)
        # Tied (GPT-2's default): the head reads the token table at call time (`logits`).
        head_axes = (layers.EMBED, layers.VOCAB)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else layers.linear(
                d, config.vocab_size, axes=head_axes, use_bias=False, kernel_init=init, **kw
            )
        )

    def embed(self, input_ids: Array, position_ids: Array, token_type_ids=None) -> Array:
        """Token + position (+ token type) embeddings, dropout: `float[B, T, D]`."""
        x = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        return self.drop(x)

    def decode(
        self,
        x: Array,
        mask: Array | None,
        *,
        caches: list[layers.KVCache] | None = None,
        cache_index=None,
    ) -> tuple[Array, list[layers.KVCache] | None]:
        """Blocks + `ln_f` over `x: float[B, T, D]` -> `(float[B, T, D], new caches)`.

        `mask: bool[B|1, 1, T, Tk]` is the whole mask (causality included); with `caches`, Tk is
        the cache length and the T tokens are written at slots [cache_index, cache_index + T).
        """
        new_caches = None if caches is None else []
        for i, block in enumerate(self.h):
            if caches is None:
                x, _ = block(x, mask)
            else:
                x, cache = block(x, mask, caches[i], cache_index)
                new_caches.append(cache)
        return self.ln_f(x), new_caches

    def logits(self, hidden: Array) -> Array:
        """LM head: `float[..., D]` -> `float[..., V]`."""
        if self.lm_head is None:
            return self.wte.attend(hidden)
        return self.lm_head(hidden)

    def init_caches(self, batch: int, length: int, dtype=jnp.float32) -> list[layers.KVCache]:
        c = self.config
        return [
            layers.KVCache.zeros(batch, length, c.n_head, c.head_dim, dtype)
            for _ in range(c.n_layer)
        ]

    def __call__(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None):
        t = input_ids.shape[1]
        mask = layers.causal_mask(t)
        if attention_mask is not None:
            valid = jnp.asarray(attention_mask).astype(bool)
            mask = layers.combine_masks(mask, layers.padding_mask(valid))
            if position_ids is None:
                position_ids = layers.positions_from_mask(valid)
        if position_ids is None:
            position_ids = jnp.arange(t)[None, :]
        x = self.embed(input_ids, position_ids, token_type_ids)
        return self.logits(self.decode(x, mask)[0])


# --------------------------------------------------------------------------------------------
# HF checkpoint import.
# --------------------------------------------------------------------------------------------

# Causal-mask buffers that old checkpoints carry; HF itself ignores them on load.
_IGNORED = (r"\.attn\.bias$", r"\.attn\.masked_bias$")


def _prefix(sd: hf_import.StateDict) -> str:
    """ "transformer." for `GPT2LMHeadModel` checkpoints, "" for a bare `GPT2Model`."""
    return "transformer." if sd.has_prefix("transformer.h.") else ""


def load_hf_weights(model: GPT2, sd: hf_import.StateDict) -> None:
    """Copies HF GPT-2 weights (Conv1D `[in, out]`, no transposes) into `model`."""
    p = _prefix(sd)
    c = model.config
    d, h, k = c.n_embd, c.n_head, c.head_dim

    def put(var, key, shape=None):
        value = np.asarray(sd.get(key))
        hf_import.assign(var, value if shape is None else value.reshape(shape), key)

    put(model.wte.embedding, f"{p}wte.weight")
    put(model.wpe.embedding, f"{p}wpe.weight")
    for i, block in enumerate(model.h):
        key = f"{p}h.{i}"
        hf_import.assign_layer_norm(block.ln_1, sd, f"{key}.ln_1")
        hf_import.assign_layer_norm(block.ln_2, sd, f"{key}.ln_2")
        # c_attn: weight [D, 3D] = [q | k | v] along the output axis, each [D, heads * head_dim].
        w = np.asarray(sd.get(f"{key}.attn.c_attn.weight")).reshape(d, 3, h, k)
        b = np.asarray(sd.get(f"{key}.attn.c_attn.bias")).reshape(3, h, k)
        for j, proj in enumerate((block.attn.query, block.attn.key, block.attn.value)):
            hf_import.assign(proj.kernel, w[:, j], f"{key}.attn.c_attn.weight[{j}]")
            hf_import.assign(proj.bias, b[j], f"{key}.attn.c_attn.bias[{j}]")
        put(block.attn.out.kernel, f"{key}.attn.c_proj.weight", (h, k, d))
        put(block.attn.out.bias, f"{key}.attn.c_proj.bias")
        put(block.mlp.up.kernel, f"{key}.mlp.c_fc.weight")
        put(block.mlp.up.bias, f"{key}.mlp.c_fc.bias")
        put(block.mlp.down.kernel, f"{key}.mlp.c_proj.weight")
        put(block.mlp.down.bias, f"{key}.mlp.c_proj.bias")
    hf_import.assign_layer_norm(model.ln_f, sd, f"{p}ln_f")
    if model.lm_head is not None:
        hf_import.assign_linear(model.lm_head, sd, "lm_head")
    elif "lm_head.weight" in sd:
        # Tied: a saved copy of the head must be the token table, or the config is wrong.
        table = np.asarray(model.wte.embedding.value)
        head = np.asarray(sd.get("lm_head.weight"), table.dtype)
        if not np.array_equal(head, table):
            raise ValueError(
                f"{sd.source}: tie_word_embeddings but lm_head.weight differs from wte.weight"
            )


def from_pretrained(
    path: str,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> GPT2:
    """Reads a local HF `GPT2LMHeadModel` (or `GPT2Model`) directory; returns eval mode.

    Parameters are created shape-only and filled from the checkpoint (nothing random is
    initialised); fails if a checkpoint tensor is unused or a parameter unset. A bare
    `GPT2Model` checkpoint needs tied embeddings (the head is the token table). `rngs` seeds
    dropout (default `nnx.Rngs(0)`).
    """
    config = GPT2Config.from_hf(hf_import.load_config(path))
    sd = hf_import.StateDict(hf_import.load_state_dict(path), source=path)
    if not config.tie_word_embeddings and "lm_head.weight" not in sd:
        raise ValueError(f"{path}: untied embeddings but no lm_head.weight in the checkpoint")
    # Streams passed into nnx.eval_shape would be mutated inside its trace: build with a local
    # seed, then reseed the dropout streams from `rngs`.
    model = hf_import.abstract_module(
        lambda: GPT2(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    load_hf_weights(model, sd)
    for pattern in _IGNORED:
        sd.mark_unused_ok(pattern)
    sd.check_all_used()
    hf_import.check_all_set(model, path)
    if rngs is not None:
        nnx.reseed(model, dropout=rngs.dropout())
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Dialogue model: training objective.
# --------------------------------------------------------------------------------------------


def dialogue_inputs(batch: Batch) -> tuple[Array, Array, Array]:
    """`[context][response]` of the `gpt2` formatter's batch: `(ids int[B, Lc + Lr],
    valid bool[B, Lc + Lr], positions int[B, Lc + Lr])`."""
    ids = jnp.concatenate([batch["context_ids"], batch["response_ids"]], axis=1)
    valid = jnp.concatenate(
        [batch["context_mask"].astype(bool), batch["response_mask"].astype(bool)], axis=1
    )
    return ids, valid, layers.positions_from_mask(valid)


def loss_fn(model: GPT2, batch: Batch, rngs: nnx.Rngs | Array | None = None):
    """Next-token cross-entropy on the response (words and closing [SEP]), mean over tokens.

    Dropout uses the model's stored streams (`rngs` is accepted for the loop's contract).
    Examples with `example_mask` False contribute nothing. Returns
    `(loss, {"token_accuracy", "tokens"})`.
    """
    del rngs
    ids, valid, positions = dialogue_inputs(batch)
    lc, lr = batch["context_ids"].shape[1], batch["response_ids"].shape[1]
    mask = layers.combine_masks(layers.causal_mask(lc + lr), layers.padding_mask(valid))
    hidden, _ = model.decode(model.embed(ids, positions), mask)
    # Only the slots that predict a response token reach the (vocabulary-sized) head.
    logits = model.logits(hidden[:, lc : lc + lr - 1]).astype(jnp.float32)
    targets = batch["response_ids"][:, 1:]
    return losses.response_cross_entropy(
        logits, targets, batch["response_mask"][:, 1:], batch.get("example_mask")
    )


# --------------------------------------------------------------------------------------------
# Decoding and candidate scoring.
# --------------------------------------------------------------------------------------------


class DecodeState(NamedTuple):
    """caches: per layer `KVCache [N, Lc + S, heads, head_dim]` (the context's Lc slots, then S
    for the tokens that follow it); context_valid `bool[N, Lc]`."""

    caches: list[layers.KVCache]
    context_valid: Array


def search_config(sep_id: int, pad_id: int, **overrides) -> decoding.SearchConfig:
    """Decoding that starts from the [SEP] after the context and ends at the next [SEP].

    Defaults: beam 5, no length or repetition penalty (the start token is that same [SEP]: a
    repetition penalty would make ending less likely)."""
    base = dict(
        bos_id=sep_id,
        eos_ids=(sep_id,),
        pad_id=pad_id,
        num_beams=5,
        length_penalty=1.0,
        repetition_penalty=1.0,
    )
    base.update(overrides)
    return decoding.SearchConfig(**base)


def _eval_copy(model: GPT2) -> GPT2:
    """A dropout-free view of `model` sharing its parameters (safe inside jit)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return copy


def _context(batch: Batch) -> dict[str, Array]:
    return {"context_ids": batch["context_ids"], "context_mask": batch["context_mask"]}


def prefill(model: GPT2, batch: Batch, extra_slots: int) -> DecodeState:
    """Runs the context `[B, Lc]` into caches of `Lc + extra_slots` slots."""
    ctx, valid = batch["context_ids"], batch["context_mask"].astype(bool)
    b, lc = ctx.shape
    s = lc + extra_slots
    if s > model.config.n_positions:
        raise ValueError(
            f"{s} context + decoding slots exceed {model.config.n_positions} positions"
        )
    x = model.embed(ctx, layers.positions_from_mask(valid))
    caches = model.init_caches(b, s, x.dtype)  # the compute dtype
    key_valid = jnp.concatenate([valid, jnp.ones((b, extra_slots), bool)], axis=1)
    mask = layers.combine_masks(layers.causal_mask(lc, s), key_valid[:, None, None, :])
    _, caches = model.decode(x, mask, caches=caches, cache_index=0)
    return DecodeState(caches, valid)


def run_after_context(
    model: GPT2, state: DecodeState, ids: Array, start: int | Array
) -> tuple[Array, DecodeState]:
    """Runs `ids: int[N, T]`, the tokens at offsets [start, start + T) after the context, through
    the cache; returns `(hidden float[N, T, D], state with their keys/values written)`.

    Each token sees the valid context and the tokens after it up to itself (padding after the
    real tokens of `ids` is only ever seen by padding, so it needs no mask).
    """
    n, lc = state.context_valid.shape
    s = state.caches[0].length
    key_valid = jnp.concatenate([state.context_valid, jnp.ones((n, s - lc), bool)], axis=1)
    mask = layers.combine_masks(
        layers.causal_mask(ids.shape[1], s, offset=lc + start), key_valid[:, None, None, :]
    )
    context_len = jnp.sum(state.context_valid, axis=1, dtype=jnp.int32)
    positions = context_len[:, None] + start + jnp.arange(ids.shape[1])[None, :]
    hidden, caches = model.decode(
        model.embed(ids, positions), mask, caches=state.caches, cache_index=lc + start
    )
    return hidden, state._replace(caches=caches)


def cached_step(model: GPT2, state: DecodeState, tokens: Array, cur_len: Array):
    """`decoding.StepFn`: runs `tokens[:, cur_len - 1]` and returns the next-token logits."""
    last = jax.lax.dynamic_slice_in_dim(tokens, cur_len - 1, 1, axis=1)
    hidden, state = run_after_context(model, state, last, cur_len - 1)
    return model.logits(hidden[:, 0]), state


def uncached_step(model: GPT2, batch: Batch, tokens: Array, cur_len: Array):
    """`decoding.StepFn` recomputing `[context][tokens < cur_len]` in full (`batch` holds one
    context row per search row); returns the logits after `tokens[:, cur_len - 1]`."""
    lc = batch["context_ids"].shape[1]
    written = jnp.arange(tokens.shape[1])[None, :] < cur_len
    ids = jnp.concatenate([batch["context_ids"], tokens], axis=1)
    valid = jnp.concatenate(
        [batch["context_mask"].astype(bool), jnp.broadcast_to(written, tokens.shape)], axis=1
    )
    if ids.shape[1] > model.config.n_positions:
        raise ValueError(f"{ids.shape[1]} tokens exceed {model.config.n_positions} positions")
    mask = layers.combine_masks(layers.causal_mask(ids.shape[1]), layers.padding_mask(valid))
    hidden, _ = model.decode(model.embed(ids, layers.positions_from_mask(valid)), mask)
    h = jax.lax.dynamic_index_in_dim(hidden, lc + cur_len - 1, axis=1, keepdims=False)
    return model.logits(h), batch


def generate(
    model: GPT2,
    batch: Batch,
    cfg: decoding.SearchConfig,
    *,
    cached: bool = True,
    greedy: bool = False,
) -> decoding.SearchOutput:
    """Beam (or greedy) search continuing every context of `batch` (`context_ids/_mask`).

    Jit with `nnx.jit(generate, static_argnames=("cfg", "cached", "greedy"))`. Runs in eval
    mode whatever the model's mode. Cached: the context is computed once per example and its
    cache copied to the example's beams.
    """
    m = _eval_copy(model)
    ctx = _context(batch)
    b = ctx["context_ids"].shape[0]
    rows = 1 if greedy else cfg.num_beams
    repeat = lambda tree: jax.tree.map(lambda a: jnp.repeat(a, rows, axis=0), tree)  # noqa: E731
    if cached:
        state = repeat(prefill(m, ctx, cfg.max_new_tokens))
        step, reorder = functools.partial(cached_step, m), decoding.default_reorder
    else:
        state = repeat(ctx)
        # Rows of one example hold the same context: reordering beams leaves them unchanged.
        step, reorder = functools.partial(uncached_step, m), lambda s, _: s
    if greedy:
        return decoding.greedy_search(step, state, b, cfg)
    return decoding.beam_search(step, state, b, cfg, reorder)


def score_candidates(
    model: GPT2, batch: Batch, candidate_ids: Array, candidate_mask: Array
) -> Array:
    """Log-likelihood of candidate responses given the context: `float[B, C]`.

    `candidate_ids: int[B, C, Lr]` are laid out like `response_ids` (`[SEP] r [SEP]`, padded;
    `candidate_mask` True on real tokens); the score is `sum_t log p(r_t | context, r_<t)` over
    every token after the leading [SEP] (the closing [SEP] included). The context is run once
    per example; its cache is copied to the example's C candidates, and the logits are
    `[B * C, Lr - 1, V]`: chunk C for large vocabularies.
    """
    m = _eval_copy(model)
    b, c, lr = candidate_ids.shape
    state = prefill(m, _context(batch), lr)
    state = jax.tree.map(lambda a: jnp.repeat(a, c, axis=0), state)
    ids = candidate_ids.reshape(b * c, lr)
    hidden, _ = run_after_context(m, state, ids, 0)
    logp = jax.nn.log_softmax(m.logits(hidden[:, :-1]).astype(jnp.float32))
    target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=2)[..., 0]
    valid = candidate_mask.reshape(b * c, lr)[:, 1:].astype(bool)
    return jnp.sum(jnp.where(valid, target, 0.0), axis=1).reshape(b, c)


# --------------------------------------------------------------------------------------------
# The "gpt2" model family (tiktalk_jax/models/registry.py).
# --------------------------------------------------------------------------------------------


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` section of the family (GPT-2 small shape by default).

    Fields: name; init_from (a local HF GPT2LMHeadModel directory; its shape wins over the
    fields below; needs `config.input.tokenizer` = its vocabulary); dtype / param_dtype;
    the GPT2Config fields, vocab_size None = the tokenizer's (`gpt2_inputs.vocab_spec`);
    pad_id / cls_id / sep_id: None = the tokenizer's.
    """
    placeholder = ml_collections.config_dict.placeholder
    base = GPT2Config()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(GPT2Config)}
    fields.update(vocab_size=placeholder(int), n_inner=placeholder(int))
    config = ml_collections.ConfigDict(
        dict(
            name="gpt2",
            init_from=placeholder(str),
            dtype="float32",
            param_dtype="float32",
            pad_id=placeholder(int),
            cls_id=placeholder(int),
            sep_id=placeholder(int),
            **fields,
        )
    )
    config.update(overrides)
    return config


def decode_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The family's default `config.decode` section (used when a config has none).

    The paper does not give DialoGPT's decoding; Chinese GPT-2 chit-chat code samples (top-k),
    which `decoding` does not offer yet: beam 5 without penalties, at most 20 tokens.
    """
    config = ml_collections.ConfigDict(
        dict(
            num_beams=5,
            max_new_tokens=20,
            length_penalty=1.0,
            repetition_penalty=1.0,
            greedy=False,
            cached=True,
        )
    )
    config.update(overrides)
    return config


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> GPT2:
    """The family's model in training mode: loaded from `config.model.init_from` when set,
    else randomly initialised with the config's shape."""
    m = config.model
    spec = gpt2_inputs.vocab_spec(config)
    kw = dict(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)
    if m.get("init_from"):
        if not config.input.get("tokenizer"):
            # A vocabulary trained on the data would not match the checkpoint's embeddings.
            raise ValueError("init_from needs config.input.tokenizer (the checkpoint's vocab)")
        model = from_pretrained(m.init_from, **kw)
        model.train()
    else:
        names = {f.name for f in dataclasses.fields(GPT2Config)}
        fields = {k: m[k] for k in names if k in m and m[k] is not None}
        fields["vocab_size"] = int(m.get("vocab_size") or spec.vocab_size)
        model = GPT2(GPT2Config(**fields), **kw)
    if spec.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {spec.vocab_size} tokens, the model embeds "
            f"{model.config.vocab_size}"
        )
    return model


def decode_settings(config: ml_collections.ConfigDict) -> tuple[decoding.SearchConfig, dict]:
    """(search config, `generate` options) from `config.decode` (default: `decode_config()`)
    with the tokenizer's ids."""
    spec = gpt2_inputs.vocab_spec(config)
    d = decode_config()
    d.update(dict(config.get("decode") or {}))
    search = search_config(
        spec.sep_id,
        spec.pad_id,
        num_beams=int(d.num_beams),
        max_new_tokens=int(d.max_new_tokens),
        length_penalty=float(d.length_penalty),
        repetition_penalty=float(d.repetition_penalty),
    )
    return search, dict(cached=bool(d.cached), greedy=bool(d.greedy))


def family_generate(model: GPT2, batch: Batch, config: ml_collections.ConfigDict) -> Array:
    """Registry `generate`: `int32[B, max_new_tokens]` response tokens (then [SEP], padding).
    Traceable: jit it with `config` closed over."""
    search, options = decode_settings(config)
    return generate(model, batch, search, **options).tokens


def family_score(model: GPT2, batch: Batch, config: ml_collections.ConfigDict) -> Array:
    """Registry `score`: the log-likelihood of `batch["candidate_ids"]` (`float32[B, C]`).

    The candidates' first slot is the start token whatever it holds: the evaluator encodes
    every family's candidates as `[CLS] r [SEP]`, and GPT-2's start token is the [SEP] that
    closes the context, so the slot is set to [SEP] here."""
    ids = jnp.asarray(batch["candidate_ids"])
    ids = ids.at[..., 0].set(gpt2_inputs.vocab_spec(config).sep_id)
    return score_candidates(model, batch, ids, batch["candidate_mask"])


registry.register(
    registry.ModelFamily(
        name="gpt2",
        build=build,
        loss_fn=loss_fn,
        formatter=gpt2_inputs.FORMATTER,
        frozen_source=lambda config: config.model.get("init_from"),
        generate=family_generate,
        score=family_score,
    )
)
