"""Maria (UniLM over BERT, as TikTalk trains it) in Flax NNX: one model, five modality variants.

Port of the original Maria / OSCAR code (jokieleung/Maria, `oscar/modeling/modeling_bert.py`
`BertForMultiModalDialog`, `run_dialog_generate.py` `CaptionTensorizer`), without the detector
concept tags and their Hungarian-matched loss, and with TikTalk's audio and knowledge segments.

Sequence layout (assembled on device from the `maria` formatter's batch, see maria_inputs.py):

    [response R][context Lc][knowledge Lk][frames F][audio A]
     type 0      type 1      type 2 (*)    no type / position embeddings (optionally positions)
     pos 0..     pos R..     pos R + context length ..

(*) `knowledge_segment=1` shares the context's type. The response slot is `[CLS] r [SEP]` padded
to R; context and knowledge positions continue from R (the original's text_b positions), the
knowledge right after the last real context token (the original packs tags after the context).
Frames and audio enter through their own Linear -> LayerNorm -> dropout. The variants of the
paper's Table 7 are the flags `use_vision`, `use_audio`, `use_knowledge`; a disabled segment has
length 0 (it costs nothing), it is not a masked dummy.

The UniLM seq2seq mask: response tokens attend causally to the response and to every valid
prefix token (context, knowledge, frames, audio); prefix tokens attend bidirectionally to valid
prefix tokens and never to the response; padding is never attended. Nothing in the prefix
depends on the response, so decoding caches the prefix exactly.

Training (`loss_fn`): MRP masks 70% of the response (not [CLS]; [SEP] included), MCP 15% of the
context, MKP 15% of the knowledge; per segment `n = min(max(round(p * len), 1), cap)` tokens
(Python rounding, `len` counting [CLS] for the response, as the original), each replaced by
[MASK] 80% / a random token 10% / kept 10%. Masked positions are gathered to a static maximum
before the MLM head; one cross-entropy averaged over all masked tokens of the batch.

Decoding (`generate`): the original predicts a [MASK] appended to the prefix generated so far.
Cached: the prefix keys/values are computed once per example and shared by its beams (not
copied per beam); every step writes the keys/values of [last token, MASK] into a small response
cache (the [MASK] slot is overwritten by the chosen word at the next step) and runs two tokens.
Uncached: the whole sequence is recomputed every step, as the original did. Search:
`tiktalk_jax.decoding` (beam 5, length penalty 0.3, repetition penalty 3, end at [SEP]/[PAD]).

Deviations from the original, besides those of `decoding`: the MLM decoder (tied to the word
embeddings, as the original) has BERT's output bias (loaded from `cls.predictions.bias`); the
prediction head transform is initialised from `cls.predictions.transform` when the checkpoint
has it; MCP candidates are all context tokens (the original excluded the [SEP] before its tags).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tiktalk_jax import decoding, input_pipeline
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import bert as bert_lib

# maria_inputs registers the "maria" batch formatter with the input pipeline on import.
from tiktalk_jax.models import hf_import, layers, maria_inputs, registry

Array = jax.Array
Batch = Mapping[str, Array]


@dataclasses.dataclass(frozen=True)
class MariaConfig:
    """Maria's shape, variant and training objectives (hashable).

    Attributes:
      bert: the BERT encoder; `type_vocab_size` >= 3 for a separate knowledge segment.
      use_vision, use_audio, use_knowledge: the variant (T = all False; paper Maria = vision).
      max_response_len, max_context_len, max_knowledge_len: R, Lc, Lk text tokens (180 in all).
      max_frames, max_audio: F, A feature tokens; frame_dim, audio_dim: their widths.
      knowledge_segment: token type of knowledge (2, or 1 to share the context's).
      media_layer_norm: LayerNorm after the feature projections (the original's
        `use_img_layernorm`).
      media_position_embeddings: learned temporal positions for frames/audio (off: the original
        gave visual tokens none).
      response_mask_prob, context_mask_prob, knowledge_mask_prob: MRP / MCP / MKP rates.
      max_masked_per_segment: cap on masked tokens per segment (the original's
        `max_masked_tokens`, 300 by default: no cap in practice).
      mask_replace_prob, mask_random_prob: [MASK] / random-token shares (the rest is kept).
      pad_id, cls_id, sep_id, mask_id: special tokens (bert-base-chinese ids by default; set from
        the tokenizer, see `maria_inputs.special_token_ids`).
    """

    bert: bert_lib.BertConfig = dataclasses.field(
        default_factory=lambda: bert_lib.BertConfig(type_vocab_size=3)
    )
    use_vision: bool = True
    use_audio: bool = False
    use_knowledge: bool = False
    max_response_len: int = 40
    max_context_len: int = 100
    max_knowledge_len: int = 40
    max_frames: int = 50
    max_audio: int = 50
    frame_dim: int = 2048
    audio_dim: int = 128
    knowledge_segment: int = 2
    media_layer_norm: bool = True
    media_position_embeddings: bool = False
    response_mask_prob: float = 0.7
    context_mask_prob: float = 0.15
    knowledge_mask_prob: float = 0.15
    max_masked_per_segment: int = 300
    mask_replace_prob: float = 0.8
    mask_random_prob: float = 0.1
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103

    def __post_init__(self):
        if self.use_knowledge and self.knowledge_segment >= self.bert.type_vocab_size:
            raise ValueError(
                f"knowledge_segment {self.knowledge_segment} needs type_vocab_size > it "
                f"(got {self.bert.type_vocab_size})"
            )
        if self.text_len > self.bert.max_position_embeddings:
            raise ValueError(
                f"{self.text_len} text tokens exceed {self.bert.max_position_embeddings} positions"
            )
        if self.max_response_len < 2 or self.max_context_len < 1:
            raise ValueError("max_response_len must be >= 2 and max_context_len >= 1")

    @property
    def knowledge_len(self) -> int:
        return self.max_knowledge_len if self.use_knowledge else 0

    @property
    def text_len(self) -> int:
        return self.max_response_len + self.max_context_len + self.knowledge_len

    @property
    def prefix_len(self) -> int:
        """Tokens after the response: context, knowledge, frames, audio."""
        media = (self.max_frames if self.use_vision else 0) + (
            self.max_audio if self.use_audio else 0
        )
        return self.max_context_len + self.knowledge_len + media

    def mask_segments(self) -> list[tuple[str, int, float, bool]]:
        """(batch name, length, rate, exclude the first token) of each masked text segment."""
        segs = [
            ("response", self.max_response_len, self.response_mask_prob, True),
            ("context", self.max_context_len, self.context_mask_prob, False),
        ]
        if self.use_knowledge:
            segs.append(("knowledge", self.max_knowledge_len, self.knowledge_mask_prob, False))
        return segs

    def num_to_mask(self, length: int, rate: float) -> int:
        """The original's count, with Python's round (half to even)."""
        return min(max(round(rate * length), 1), self.max_masked_per_segment)

    @property
    def max_masked(self) -> int:
        """Static number of masked slots per example (the most any example can need)."""
        total = 0
        for _, size, rate, skip_first in self.mask_segments():
            total += max(
                min(self.num_to_mask(n, rate), n - int(skip_first)) for n in range(size + 1)
            )
        return total


def with_tokenizer(config: MariaConfig, tokenizer: Any) -> MariaConfig:
    """`config` with the tokenizer's special token ids; fails if its vocabulary does not fit
    the embedding table."""
    size = getattr(tokenizer, "backend_tokenizer", tokenizer).get_vocab_size()
    if size > config.bert.vocab_size:
        raise ValueError(f"tokenizer has {size} tokens, the model embeds {config.bert.vocab_size}")
    return dataclasses.replace(config, **maria_inputs.special_token_ids(tokenizer))


class MediaEmbedding(nnx.Module):
    """Feature tokens: Linear(in -> H) [+ temporal position] [-> LayerNorm] -> dropout."""

    def __init__(
        self,
        in_features: int,
        config: bert_lib.BertConfig,
        *,
        max_len: int = 0,
        norm: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        h = config.hidden_size
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The input axis is a feature width (2048 ResNet, 128 VGGish), not the residual stream.
        self.proj = layers.linear(in_features, h, axes=(None, layers.EMBED), kernel_init=init, **kw)
        self.position = (
            layers.embedding(max_len, h, axes=(None, layers.EMBED), init=init, **kw)
            if max_len
            else None
        )
        self.norm = layers.layer_norm(h, eps=config.layer_norm_eps, **kw) if norm else None
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, feats: Array) -> Array:
        """`feats: float[B, T, in]` -> `float[B, T, H]`."""
        x = self.proj(feats)
        if self.position is not None:
            x = x + self.position(jnp.arange(feats.shape[1]))[None]
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


def seq2seq_mask(response_valid: Array, prefix_valid: Array) -> Array:
    """The UniLM mask over `[response Tr][prefix P]`: `bool[B, 1, T, T]` (True = may attend)."""
    tr = response_valid.shape[1]
    t = tr + prefix_valid.shape[1]
    is_resp = jnp.arange(t) < tr
    q, k = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = jnp.where(is_resp[:, None], ~is_resp[None, :] | (k <= q), ~is_resp[None, :])
    key_valid = jnp.concatenate([response_valid, prefix_valid], axis=1).astype(bool)
    return (allowed[None] & key_valid[:, None, :])[:, None]


class Maria(nnx.Module):
    """BERT + feature embeddings + MLM head. `model(batch) -> hidden float[B, Tr + P, H]`.

    `batch` holds (B = batch, R = response slot length, any R works):
      response_ids int[B, R], response_mask bool[B, R]     `[CLS] r [SEP]`, padded
      context_ids int[B, Lc], context_mask bool[B, Lc]     turns joined by [SEP]
      knowledge_ids/_mask [B, Lk]                           when use_knowledge
      frame_feats float[B, F, frame_dim], frame_mask        when use_vision
      audio_feats float[B, A, audio_dim], audio_mask        when use_audio
    """

    def __init__(self, config: MariaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bert = bert_lib.BertModel(
            config.bert, add_pooling_layer=False, add_mlm_head=True, **kw
        )
        pos = config.media_position_embeddings
        media = dict(norm=config.media_layer_norm, **kw)
        self.frames = (
            MediaEmbedding(
                config.frame_dim, config.bert, max_len=config.max_frames if pos else 0, **media
            )
            if config.use_vision
            else None
        )
        self.audio = (
            MediaEmbedding(
                config.audio_dim, config.bert, max_len=config.max_audio if pos else 0, **media
            )
            if config.use_audio
            else None
        )

    def embed_response(self, ids: Array, positions: Array) -> Array:
        """Response-segment tokens `int[N, T]` at `positions` -> `float[N, T, H]`."""
        positions = jnp.broadcast_to(positions, ids.shape)
        return self.bert.embed(ids, jnp.zeros_like(ids), positions)

    def embed_prefix(self, batch: Batch) -> tuple[Array, Array]:
        """Context, knowledge, frames and audio tokens: `(float[B, P, H], valid bool[B, P])`."""
        c = self.config
        ids, valid = [batch["context_ids"]], [batch["context_mask"].astype(bool)]
        lc = ids[0].shape[1]
        types = [jnp.ones_like(ids[0])]
        positions = [jnp.broadcast_to(c.max_response_len + jnp.arange(lc), ids[0].shape)]
        if c.use_knowledge:
            k_ids = batch["knowledge_ids"]
            context_len = jnp.sum(valid[0], axis=1, keepdims=True)
            ids.append(k_ids)
            valid.append(batch["knowledge_mask"].astype(bool))
            types.append(jnp.full_like(k_ids, c.knowledge_segment))
            positions.append(c.max_response_len + context_len + jnp.arange(k_ids.shape[1]))
        cat = functools.partial(jnp.concatenate, axis=1)
        parts = [self.bert.embed(cat(ids), cat(types), cat(positions))]
        if self.frames is not None:
            parts.append(self.frames(batch["frame_feats"]).astype(parts[0].dtype))
            valid.append(batch["frame_mask"].astype(bool))
        if self.audio is not None:
            parts.append(self.audio(batch["audio_feats"]).astype(parts[0].dtype))
            valid.append(batch["audio_mask"].astype(bool))
        return cat(parts), cat(valid)

    def __call__(self, batch: Batch) -> Array:
        response = batch["response_ids"]
        x_resp = self.embed_response(response, jnp.arange(response.shape[1]))
        x_prefix, prefix_valid = self.embed_prefix(batch)
        x = jnp.concatenate([x_resp, x_prefix], axis=1)
        mask = seq2seq_mask(batch["response_mask"], prefix_valid)
        return self.bert.encode(x, mask)[0]

    def mlm_logits(self, hidden: Array) -> Array:
        """`float[..., H]` -> `float[..., vocab]`."""
        return self.bert.mlm_logits(hidden)


# --------------------------------------------------------------------------------------------
# Training objective.
# --------------------------------------------------------------------------------------------


class MaskedTargets(NamedTuple):
    """positions `int[B, M]` (into the text `[response][context][knowledge]`, which is also the
    start of the model's hidden states), labels `int[B, M]` (original tokens), weights
    `float[B, M]` (1 on real masked slots, 0 on unused ones)."""

    positions: Array
    labels: Array
    weights: Array


def mask_tokens(rng: Array, batch: Batch, config: MariaConfig) -> tuple[dict, MaskedTargets]:
    """MRP / MCP / MKP with BERT's 80/10/10 on device; returns the corrupted batch and targets.

    All segments are handled at once on the concatenated text (one draw of each random array,
    one ranking), which keeps the compiled program small.
    """
    segs = config.mask_segments()
    ids, valid, cand, counts = [], [], [], []
    for name, size, rate, skip_first in segs:
        seg_ids, seg_valid = batch[f"{name}_ids"], batch[f"{name}_mask"].astype(bool)
        if seg_ids.shape[1] != size:
            raise ValueError(f"{name}_ids has {seg_ids.shape[1]} tokens, the config says {size}")
        seg_cand = seg_valid & (jnp.arange(size) >= int(skip_first))[None, :]
        # Exact Python-round counts from a static table (float32 rounding could differ).
        table = jnp.asarray([config.num_to_mask(n, rate) for n in range(size + 1)], jnp.int32)
        n = table[jnp.sum(seg_valid, axis=1)]
        counts.append(jnp.minimum(n, jnp.sum(seg_cand, axis=1)))
        ids.append(seg_ids)
        valid.append(seg_valid)
        cand.append(seg_cand)
    sizes = [size for _, size, _, _ in segs]
    text, cand = jnp.concatenate(ids, axis=1), jnp.concatenate(cand, axis=1)
    seg = jnp.asarray(np.repeat(np.arange(len(segs)), sizes))  # segment of every text slot
    counts = jnp.stack(counts, axis=1)  # [B, segments]

    k_pick, k_action, k_random = jax.random.split(rng, 3)
    # Candidates of segment s score in [s, s + 1): one ranking of the row ranks every segment's
    # candidates contiguously; subtracting the earlier segments' candidates gives the in-segment
    # rank, and the first `count` of a random order are a uniform random subset.
    score = jnp.where(cand, seg[None, :] + jax.random.uniform(k_pick, text.shape), len(segs) + 1.0)
    rank = jnp.argsort(jnp.argsort(score, axis=1), axis=1)
    per_seg = jnp.stack([jnp.sum(c, axis=1) for c in jnp.split(cand, np.cumsum(sizes)[:-1], 1)], 1)
    before = jnp.cumsum(per_seg, axis=1) - per_seg
    sel = cand & (rank - before[:, seg] < counts[:, seg])

    u = jax.random.uniform(k_action, text.shape)
    random_ids = jax.random.randint(k_random, text.shape, 0, config.bert.vocab_size)
    replace = u < config.mask_replace_prob
    rand = ~replace & (u < config.mask_replace_prob + config.mask_random_prob)
    new = jnp.where(sel & replace, config.mask_id, jnp.where(sel & rand, random_ids, text))
    out = dict(batch)
    for (name, _, _, _), part in zip(segs, jnp.split(new, np.cumsum(sizes)[:-1], axis=1)):
        out[f"{name}_ids"] = part.astype(batch[f"{name}_ids"].dtype)

    # Gather the selected slots, in order, into M static slots (scatter by running count).
    m = config.max_masked
    slot = jnp.where(sel, jnp.cumsum(sel, axis=1) - 1, m)
    # vmap: a per-row scatter (batch dimension explicit, so it partitions along the batch).
    positions = jax.vmap(
        lambda s: jnp.zeros((m,), jnp.int32).at[s].set(jnp.arange(s.shape[0]), mode="drop")
    )(slot)
    weights = (jnp.arange(m)[None, :] < jnp.sum(sel, axis=1, keepdims=True)).astype(jnp.float32)
    labels = jnp.take_along_axis(text, positions, axis=1)
    return out, MaskedTargets(positions, labels, weights)


def loss_fn(model: Maria, batch: Batch, rngs: nnx.Rngs | Array) -> tuple[Array, dict[str, Array]]:
    """Masked-token cross-entropy averaged over every masked token of the batch.

    `rngs`: a jax key, or `nnx.Rngs` (the train loop's; its `dropout` stream draws the masking
    key; the model's dropout layers use their own stored streams). Examples with `example_mask`
    False (eval padding) contribute nothing. Returns
    `(loss, {"masked_accuracy", "masked_tokens"})`.
    """
    rng = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
    inputs, t = mask_tokens(rng, batch, model.config)
    hidden = model(inputs)
    h = jnp.take_along_axis(hidden, t.positions[..., None], axis=1)
    logits = model.mlm_logits(h).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, t.labels)
    w = t.weights
    if "example_mask" in batch:
        w = w * batch["example_mask"].astype(jnp.float32)[:, None]
    total = jnp.sum(w)
    denom = jnp.maximum(total, 1.0)
    loss = jnp.sum(ce * w) / denom
    acc = jnp.sum((jnp.argmax(logits, -1) == t.labels) * w) / denom
    return loss, {"masked_accuracy": acc, "masked_tokens": total}


# --------------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------------


class DecodeState(NamedTuple):
    """prefix: per layer `KVCache [B, P, heads, head_dim]`, shared by an example's beams;
    prefix_valid `bool[B, P]`; response: per layer `KVCache [B * beams, S, heads, head_dim]`."""

    prefix: list[layers.KVCache]
    prefix_valid: Array
    response: list[layers.KVCache]


def search_config(config: MariaConfig, **overrides) -> decoding.SearchConfig:
    """The original's search (beam 5, 20 steps, penalties 0.3 / 3) with this vocab's tokens."""
    base = dict(bos_id=config.cls_id, eos_ids=(config.sep_id, config.pad_id), pad_id=config.pad_id)
    base.update(overrides)
    return decoding.SearchConfig(**base)


def _eval_copy(model: Maria) -> Maria:
    """A dropout-free view of `model` sharing its parameters (safe inside jit / while_loop)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return copy


def _shared_prefix_attention(
    q: Array,
    prefix: layers.KVCache,
    prefix_valid: Array,
    keys: Array,
    values: Array,
    mask: Array,
) -> Array:
    """Attention of `q: [N, T, h, d]` (N = B * g rows, g per example) over the example's prefix
    keys `[B, P, h, d]` (not copied per row) and the row's own keys `[N, S, h, d]`.

    `mask: bool[N|1, T, S]` for the row's own keys; prefix keys are masked by `prefix_valid`.
    One softmax over both parts, in float32 (as `layers.dot_product_attention`).
    """
    b, p = prefix_valid.shape
    n, t, h, d = q.shape
    g = n // b
    scale = d**-0.5
    f32 = jnp.float32
    lp = jnp.einsum(
        "bgthd,bphd->bghtp", q.reshape(b, g, t, h, d), prefix.key, preferred_element_type=f32
    )
    lp = lp.reshape(n, h, t, p).astype(f32) * scale
    lr = jnp.einsum("nthd,nshd->nhts", q, keys, preferred_element_type=f32).astype(f32) * scale
    neg = jnp.finfo(f32).min
    lp = jnp.where(jnp.repeat(prefix_valid, g, axis=0)[:, None, None, :], lp, neg)
    lr = jnp.where(mask[:, None], lr, neg)
    probs = jax.nn.softmax(jnp.concatenate([lp, lr], axis=-1), axis=-1).astype(values.dtype)
    pp = probs[..., :p].reshape(b, g, h, t, p)
    out = jnp.einsum("bghtp,bphd->bgthd", pp, prefix.value.astype(values.dtype)).reshape(n, t, h, d)
    return out + jnp.einsum("nhts,nshd->nthd", probs[..., p:], values)


def _encode_after_prefix(
    model: Maria,
    x: Array,
    prefix: list[layers.KVCache],
    prefix_valid: Array,
    mask: Array,
    response: list[layers.KVCache] | None = None,
    index: Array | None = None,
) -> tuple[Array, list[layers.KVCache] | None]:
    """Runs response-side tokens `x: [N, T, H]` through the encoder against a cached prefix.

    With `response` caches, the T tokens' keys/values are written at slots [index, index + T)
    and `mask: [N|1, T, S]` is over the S cache slots; without, over the T tokens themselves.
    Mirrors `bert.BertLayer` (post-LN) with the attention swapped for `_shared_prefix_attention`.
    """
    new_caches = None if response is None else []
    for i, layer in enumerate(model.bert.layers):
        att = layer.attention
        q, k, v = att.query(x), att.key(x), att.value(x)
        if response is not None:
            cache = response[i].update(k, v, index)
            new_caches.append(cache)
            k, v = cache.key.astype(q.dtype), cache.value.astype(q.dtype)
        o = _shared_prefix_attention(q, prefix[i], prefix_valid, k, v, mask)
        x = layer.attention_norm(x + layer.attention_dropout(att.out(o)))
        x = layer.mlp_norm(x + layer.mlp_dropout(layer.mlp(x)))
    return x, new_caches


def encode_prefix(model: Maria, batch: Batch) -> tuple[list[layers.KVCache], Array]:
    """Keys/values of every layer for the prefix (computed once): `([KVCache [B, P]], valid)`."""
    x, valid = model.embed_prefix(batch)
    b, p = valid.shape
    caches = model.bert.init_caches(b, p, x.dtype)
    _, caches = model.bert.encode(x, layers.padding_mask(valid), caches=caches, cache_index=0)
    return caches, valid


def prefill(model: Maria, batch: Batch, num_rows: int, max_new_tokens: int) -> DecodeState:
    """Prefix caches plus empty response caches of `1 + max_new_tokens` slots for
    `num_rows` = batch * beams rows."""
    if max_new_tokens + 1 > model.config.max_response_len:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} + [CLS] exceed the response slot "
            f"({model.config.max_response_len} positions)"
        )
    prefix, valid = encode_prefix(model, batch)
    response = model.bert.init_caches(num_rows, max_new_tokens + 1, prefix[0].key.dtype)
    return DecodeState(prefix, valid, response)


def cached_step(model: Maria, state: DecodeState, tokens: Array, cur_len: Array):
    """`decoding.StepFn`: writes [tokens[cur_len - 1], MASK] at slots cur_len - 1, cur_len and
    returns the logits at the [MASK]."""
    n = tokens.shape[0]
    start = cur_len - 1
    last = jax.lax.dynamic_slice_in_dim(tokens, start, 1, axis=1)
    ids = jnp.concatenate([last, jnp.full((n, 1), model.config.mask_id, tokens.dtype)], axis=1)
    x = model.embed_response(ids, start + jnp.arange(2))
    slots = state.response[0].length
    mask = (jnp.arange(slots)[None, :] <= (start + jnp.arange(2))[:, None])[None]
    x, response = _encode_after_prefix(
        model, x, state.prefix, state.prefix_valid, mask, state.response, start
    )
    return model.mlm_logits(x[:, 1]), state._replace(response=response)


def _reorder_response(state: DecodeState, rows: Array) -> DecodeState:
    # Beams are reordered within their example, so the shared prefix needs no reordering.
    return state._replace(response=decoding.default_reorder(state.response, rows))


def uncached_step(model: Maria, batch: Batch, tokens: Array, cur_len: Array):
    """`decoding.StepFn` recomputing the full sequence `[tokens < cur_len, MASK][prefix]`
    (`batch` holds one row per beam); returns the logits at the [MASK]."""
    c = model.config
    pos = jnp.arange(tokens.shape[1])[None, :]
    ids = jnp.where(pos < cur_len, tokens, jnp.where(pos == cur_len, c.mask_id, c.pad_id))
    valid = jnp.broadcast_to(pos <= cur_len, ids.shape)
    hidden = model({**batch, "response_ids": ids, "response_mask": valid})
    h = jax.lax.dynamic_index_in_dim(hidden, cur_len, axis=1, keepdims=False)
    return model.mlm_logits(h), batch


def _prefix_batch(model: Maria, batch: Batch) -> dict[str, Array]:
    keys = ["context_ids", "context_mask"]
    if model.config.use_knowledge:
        keys += ["knowledge_ids", "knowledge_mask"]
    if model.config.use_vision:
        keys += ["frame_feats", "frame_mask"]
    if model.config.use_audio:
        keys += ["audio_feats", "audio_mask"]
    return {k: batch[k] for k in keys}


def generate(
    model: Maria,
    batch: Batch,
    cfg: decoding.SearchConfig,
    *,
    cached: bool = True,
    greedy: bool = False,
) -> decoding.SearchOutput:
    """Beam (or greedy) search for every example of `batch` (the prefix fields are used).

    Jit it with `nnx.jit(generate, static_argnames=("cfg", "cached", "greedy"))`. Runs in eval
    mode whatever the model's mode.
    """
    m = _eval_copy(model)
    prefix = _prefix_batch(m, batch)
    b = prefix["context_ids"].shape[0]
    rows = 1 if greedy else cfg.num_beams
    if cached:
        state = prefill(m, prefix, b * rows, cfg.max_new_tokens)
        step, reorder = functools.partial(cached_step, m), _reorder_response
    else:
        if cfg.max_new_tokens + 1 > m.config.max_response_len:
            raise ValueError("max_new_tokens + [CLS] exceed the response slot")
        state = jax.tree.map(lambda a: jnp.repeat(a, rows, axis=0), prefix)
        # Rows of one example hold identical inputs: reordering beams leaves them unchanged.
        step, reorder = functools.partial(uncached_step, m), lambda s, _: s
    if greedy:
        return decoding.greedy_search(step, state, b, cfg)
    return decoding.beam_search(step, state, b, cfg, reorder)


def score_candidates(
    model: Maria, batch: Batch, candidate_ids: Array, candidate_mask: Array
) -> Array:
    """Teacher-forced log-likelihood of candidate responses: `float[B, C]`.

    `candidate_ids: int[B, C, Lr]` are `[CLS] r [SEP]` (padded, `candidate_mask` True on real
    tokens); the score is `sum_t log p(r_t | r_<t, prefix)` over every token after [CLS]
    ([SEP] included), each predicted as in decoding from a [MASK] at its position. One pass per
    candidate: real tokens attend causally, and a pseudo [MASK] for each target position t
    attends to the real tokens before t and itself (so the real tokens never see a [MASK]).
    The prefix is encoded once per example. Logits are `[B * C, Lr - 1, vocab]`: chunk C for
    large vocabularies.
    """
    m = _eval_copy(model)
    b, c, lr = candidate_ids.shape
    n = b * c
    ids = candidate_ids.reshape(n, lr)
    valid = candidate_mask.reshape(n, lr).astype(bool)
    prefix, prefix_valid = encode_prefix(m, _prefix_batch(m, batch))
    real = m.embed_response(ids, jnp.arange(lr))
    pseudo = m.embed_response(jnp.full((n, lr - 1), m.config.mask_id, ids.dtype), jnp.arange(1, lr))
    x = jnp.concatenate([real, pseudo], axis=1)
    # Query rows: real token i sees real j <= i; the [MASK] for target t sees real j < t + itself.
    last_real = jnp.concatenate([jnp.arange(lr), jnp.arange(lr - 1)])
    see_real = jnp.arange(lr)[None, :] <= last_real[:, None]
    see_pseudo = jnp.concatenate([jnp.zeros((lr, lr - 1), bool), jnp.eye(lr - 1, dtype=bool)])
    mask = jnp.concatenate(
        [see_real[None] & valid[:, None, :], jnp.broadcast_to(see_pseudo, (n, 2 * lr - 1, lr - 1))],
        axis=2,
    )
    hidden, _ = _encode_after_prefix(m, x, prefix, prefix_valid, mask)
    logp = jax.nn.log_softmax(m.mlm_logits(hidden[:, lr:]).astype(jnp.float32))
    target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=2)[..., 0]
    return jnp.sum(jnp.where(valid[:, 1:], target, 0.0), axis=1).reshape(b, c)


# --------------------------------------------------------------------------------------------
# HF BERT checkpoints.
# --------------------------------------------------------------------------------------------


def config_from_pretrained(path: str, **overrides: Any) -> MariaConfig:
    """A MariaConfig whose BERT shape is the checkpoint's, with at least 3 token types."""
    b = bert_lib.BertConfig.from_hf(hf_import.load_config(path))
    b = dataclasses.replace(b, type_vocab_size=max(b.type_vocab_size, 3))
    bert_overrides = overrides.pop("bert_overrides", {})
    return MariaConfig(bert=dataclasses.replace(b, **bert_overrides), **overrides)


def load_bert_weights(model: Maria, path: str) -> None:
    """Loads a local HF `BertModel` / `BertForMaskedLM` / `BertForPreTraining` directory into
    `model.bert`.

    A checkpoint with fewer token types than the model (bert-base-chinese has 2) is grown: each
    new row starts as a copy of the checkpoint's last row (row 2 = the context's row 1), so a
    knowledge token starts out embedded like a context token. The MLM head (transform + bias)
    is loaded from `cls.predictions` when present, else left at its random initialisation. The
    pooler and NSP head are not used by Maria and are ignored.
    """
    tensors = bert_lib._legacy_renamed(hf_import.load_state_dict(path))
    sd = hf_import.StateDict(tensors, source=path)
    p = bert_lib.bert_prefix(sd)
    key = f"{p}embeddings.token_type_embeddings.weight"
    table = np.asarray(tensors[key])
    want = model.bert.config.type_vocab_size
    if table.shape[0] < want:
        extra = np.repeat(table[-1:], want - table.shape[0], axis=0)
        sd.tensors[key] = np.concatenate([table, extra], axis=0)
    head = model.bert.mlm
    if not sd.has_prefix("cls.predictions."):
        model.bert.mlm = None  # load_hf_weights loads a head only when the module has one
    try:
        bert_lib.load_hf_weights(model.bert, sd, p)
    finally:
        model.bert.mlm = head
    for pattern in (*bert_lib._IGNORED, rf"^{p}pooler\."):
        sd.mark_unused_ok(pattern)
    sd.check_all_used()


def from_pretrained(
    path: str,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    **config_overrides: Any,
) -> Maria:
    """Maria initialised from a local HF BERT checkpoint (feature projections random).

    `config_overrides` are MariaConfig fields (e.g. `use_audio=True`, special token ids), and
    `bert_overrides={...}` for BERT fields (e.g. dropout). Returned in training mode.
    """
    config = config_from_pretrained(path, **config_overrides)
    model = Maria(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs if rngs is not None else nnx.Rngs(0)
    )
    load_bert_weights(model, path)
    return model


# --------------------------------------------------------------------------------------------
# The model family: what the train loop and `tiktalk_jax.evaluate` call (models/registry.py).
# --------------------------------------------------------------------------------------------

# Variant name (configs/maria.py) -> (use_vision, use_audio, use_knowledge): paper Table 7;
# ta and tk are Table 3's ablations "Audio+text" and "C3KG+text" (no vision).
VARIANTS = {
    "t": (False, False, False),
    "ta": (False, True, False),
    "tk": (False, False, True),
    "tv": (True, False, False),
    "tva": (True, True, False),
    "tvk": (True, False, True),
    "tvak": (True, True, True),
}
# config.model.bert fields that apply on top of a pretrained checkpoint's shape.
_BERT_RUNTIME_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
# Feature rows read per video to standardize features (evenly spaced over the train split).
_STATS_MAX_VIDEOS = 2000


def variant_flags(variant: str) -> tuple[bool, bool, bool]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Maria variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant]


def family_tokenizer(config: Any) -> Any:
    """The tokenizer `input_pipeline.make_datasets` uses for `config` (same resolution)."""
    cfg = config.input
    vocab_dir = cfg.vocab_dir
    if not cfg.tokenizer and not vocab_dir:
        vocab_dir = input_pipeline.dataset_dir(cfg.data_dir, cfg.dataset)
    return tokenizer_lib.load_tokenizer(
        cfg.tokenizer,
        vocab_dir,
        texts=lambda: tokenizer_lib.dialogue_texts(
            input_pipeline.open_split(
                input_pipeline.dataset_dir(cfg.data_dir, cfg.dataset), cfg.train_split
            )
        ),
        vocab_size=cfg.vocab_size,
    )


def _check_input_lengths(config: Any, flags: tuple[bool, bool, bool]) -> None:
    """The formatter's segments (config.input) must be the variant's, or batches would lack
    (or carry unused) arrays."""
    vision, audio, knowledge = flags
    cfg = config.input
    for name, used, field in (
        ("vision", vision, "max_frames"),
        ("audio", audio, "max_audio"),
        ("knowledge", knowledge, "max_knowledge_len"),
    ):
        if used != (int(cfg.get(field, 0)) > 0):
            raise ValueError(
                f"variant {config.model.variant!r} {'uses' if used else 'does not use'} {name} "
                f"but config.input.{field}={cfg.get(field, 0)}: choose the variant with the "
                "config argument (configs/maria.py:variant=...), which sets both"
            )


def model_config(config: Any, tokenizer: Any = None) -> MariaConfig:
    """The MariaConfig of a train config (`config.model` + the lengths of `config.input`).

    Special token ids (and, for a random init, the vocabulary size) come from the tokenizer.
    """
    m, cfg = config.model, config.input
    flags = variant_flags(m.variant)
    _check_input_lengths(config, flags)
    tokenizer = family_tokenizer(config) if tokenizer is None else tokenizer
    vocab = getattr(tokenizer, "backend_tokenizer", tokenizer).get_vocab_size()
    fields = dict(
        use_vision=flags[0],
        use_audio=flags[1],
        use_knowledge=flags[2],
        max_response_len=int(cfg.max_response_len),
        max_context_len=int(cfg.max_context_len),
        max_knowledge_len=max(int(cfg.get("max_knowledge_len", 0)), 1),
        max_frames=max(int(cfg.get("max_frames", 0)), 1),
        max_audio=max(int(cfg.get("max_audio", 0)), 1),
        frame_dim=int(cfg.frame_dim),
        audio_dim=int(cfg.audio_dim),
        media_layer_norm=bool(m.media_layer_norm),
        media_position_embeddings=bool(m.media_position_embeddings),
        **maria_inputs.special_token_ids(tokenizer),
    )
    bert_fields = {k: v for k, v in m.bert.items() if v is not None}
    if m.get("init_from"):
        # The checkpoint fixes the shape; the config still sets the dropout rates.
        dropout = {k: v for k, v in bert_fields.items() if k in _BERT_RUNTIME_FIELDS}
        return with_tokenizer(
            config_from_pretrained(m.init_from, bert_overrides=dropout, **fields), tokenizer
        )
    bert_fields.setdefault("vocab_size", vocab)
    return with_tokenizer(MariaConfig(bert=bert_lib.BertConfig(**bert_fields), **fields), tokenizer)


def build(config: Any, rngs: nnx.Rngs) -> Maria:
    """`registry.ModelFamily.build`: from `config.model.init_from` (a local HF BERT directory)
    or a random init shaped by `config.model.bert`; training mode."""
    mc = model_config(config)
    dtype = jnp.dtype(config.model.dtype)
    param_dtype = jnp.dtype(config.model.param_dtype)
    model = Maria(mc, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.model.get("init_from"):
        load_bert_weights(model, config.model.init_from)
    return model


class StandardizedFeatures(Sequence):
    """A features table whose `features` rows are standardized per dimension, `(x - mean) / std`,
    with statistics of the TRAIN split (float32; other fields unchanged).

    Why: a features dataset fixes neither offset nor scale. Random-init encoders (the demo's)
    give features whose videos differ by 0.1% of a large common offset (ResNet) or whose
    values are ~1e-13 (VGGish: N(0, 0.01) weights shrink every layer); projected and
    LayerNorm-ed as is, the first is almost the same token for every video and the second
    vanishes under the LayerNorm epsilon. Standardizing removes both; for pretrained features it
    is the usual input normalisation.
    """

    def __init__(self, table: Any, mean: np.ndarray, std: np.ndarray, stats_from: str):
        self.table, self.mean, self.std = table, mean, std
        self.keys = table.keys
        self.metadata = {
            **table.metadata,
            "normalization": f"per-dimension standardization, statistics of {stats_from}",
        }

    def _norm(self, record: dict[str, Any]) -> dict[str, Any]:
        feats = np.asarray(record[maria_inputs.FEATURES_FIELD], np.float32)
        out = dict(record)
        out[maria_inputs.FEATURES_FIELD] = (feats - self.mean) / self.std if feats.size else feats
        return out

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._norm(self.table[index])

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        return [self._norm(r) for r in self.table.__getitems__(indices)]


@functools.lru_cache(maxsize=8)
def feature_stats(features_dir: str, split: str, max_videos: int = _STATS_MAX_VIDEOS):
    """`(mean float32[D], std float32[D], videos read)` over the feature rows of (at most
    `max_videos` evenly spaced) videos of `split`; a constant dimension gets std 1."""
    from tiktalk_jax import features as features_lib

    table = features_lib.FeatureTable(features_dir, split)
    picks = np.unique(np.linspace(0, len(table) - 1, min(len(table), max_videos)).astype(int))
    rows = [
        np.asarray(r[maria_inputs.FEATURES_FIELD], np.float64) for r in table.__getitems__(picks)
    ]
    rows = np.concatenate([r for r in rows if r.size])
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    # Relative floor: random-init features are legitimately tiny, so no absolute epsilon.
    floor = 1e-6 * float(std.max()) if std.max() > 0 else 1.0
    std = np.where(std > floor, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32), len(picks)


def features_dir(config: Any, table: str) -> str:
    """Where the `frames` / `audio` features are: config.input.<table>_dir, else the extract
    CLI's default `<data_dir>/features/<encoder>`."""
    cfg = config.input
    explicit = cfg.get(f"{table}_dir")
    if explicit:
        return explicit
    encoder = "resnet101" if table == maria_inputs.FRAMES else "vggish"
    if not cfg.data_dir:
        raise ValueError(f"set config.input.{table}_dir (or config.input.data_dir)")
    return os.path.join(cfg.data_dir, "features", encoder)


def knowledge_dir(config: Any) -> str:
    """config.input.knowledge_dir, else knowledge.prepare's default `<version dir>/knowledge`."""
    cfg = config.input
    if cfg.get("knowledge_dir"):
        return cfg.knowledge_dir
    return os.path.join(input_pipeline.dataset_dir(cfg.data_dir, cfg.dataset), "knowledge")


class WithEmptyRecords(Sequence):
    """A features table that also answers for `extra_keys` with zero feature rows.

    A dialogue whose video has no features (the mp4 was missing or undecodable, so neither the
    media build nor the extraction has it) then gets an empty, fully masked segment, as a video
    without sound does, instead of failing the join or being dropped: every variant sees the
    same dialogues, so their scores stay comparable.
    """

    def __init__(self, table: Any, extra_keys: Sequence[str], dim: int):
        self.table, self.dim = table, dim
        self.extra = list(extra_keys)
        self.keys = list(table.keys) + self.extra
        self.metadata = {**table.metadata, "videos_without_features": len(self.extra)}

    def __len__(self) -> int:
        return len(self.table) + len(self.extra)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.table):
            return self.table[index]
        return {
            "video_id": self.extra[index - len(self.table)],
            "features": np.zeros((0, self.dim)),
        }

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        return [self[int(i)] for i in indices]


def side_tables(config: Any) -> dict[str, list[Any]]:
    """`registry.ModelFamily.side_tables`: frames / audio features (standardized when
    `config.input.feature_norm == "standardize"`; dialogues whose video has no features get an
    empty segment, see `WithEmptyRecords`) and knowledge, as the variant uses them, for the
    train split and every eval split."""
    from tiktalk_jax import features as features_lib
    from tiktalk_jax.knowledge import prepare

    cfg = config.input
    vision, audio, knowledge = variant_flags(config.model.variant)
    splits = list(dict.fromkeys([cfg.train_split, *cfg.eval_splits]))
    out: dict[str, list[Any]] = {s: [] for s in splits}
    norm = cfg.get("feature_norm", "standardize")
    if norm not in ("standardize", "none"):
        raise ValueError(f"config.input.feature_norm must be standardize or none, got {norm!r}")
    video_ids = {}
    for table, used, dim_field in (
        (maria_inputs.FRAMES, vision, "frame_dim"),
        (maria_inputs.AUDIO, audio, "audio_dim"),
    ):
        if not used:
            continue
        directory = features_dir(config, table)
        width = features_lib.read_metadata(directory)["fields"]["features"]["shape"][-1]
        if width != int(cfg[dim_field]):
            raise ValueError(
                f"{table} features in {directory} are {width}-d but config.input.{dim_field}="
                f"{cfg[dim_field]} (set {dim_field}={width} in the config argument)"
            )
        if norm == "standardize":
            mean, std, n = feature_stats(directory, cfg.train_split)
        for split in splits:
            source = features_lib.FeatureTable(directory, split)
            if norm == "standardize":
                source = StandardizedFeatures(
                    source, mean, std, f"{n} {cfg.train_split} videos of {directory}"
                )
            if split not in video_ids:
                video_ids[split] = input_pipeline.dialogue_video_ids(config.input, split)
            missing = sorted(video_ids[split] - set(source.keys))
            if missing:
                logging.warning(
                    "%s %s: %d videos of the dialogues have no features (missing or corrupt "
                    "media); their dialogues get an empty %s segment. First: %s",
                    directory, split, len(missing), table, missing[:5],
                )  # fmt: skip
            source = WithEmptyRecords(source, missing, width)
            out[split].append(
                input_pipeline.SideTable(
                    name=table, source=source, key="video_id", keys=source.keys
                )
            )
    if knowledge:
        for split, tables in prepare.side_tables(knowledge_dir(config), splits).items():
            out[split].extend(tables)
    return out


def decode_settings(config: Any, model_cfg: MariaConfig) -> tuple[decoding.SearchConfig, dict]:
    """(search config, jit-static options) from `config.decode`."""
    d = config.decode
    search = search_config(
        model_cfg,
        max_new_tokens=int(d.max_new_tokens),
        num_beams=int(d.num_beams),
        length_penalty=float(d.length_penalty),
        repetition_penalty=float(d.repetition_penalty),
    )
    return search, dict(cached=bool(d.get("cached", True)), greedy=bool(d.get("greedy", False)))


def _generate(model: Maria, batch: Batch, config: Any) -> Array:
    """`registry.ModelFamily.generate`: `int32[B, max_new_tokens]` (words, [SEP], then [PAD])."""
    search, options = decode_settings(config, model.config)
    return generate(model, batch, search, **options).tokens


def _score(model: Maria, batch: Batch, config: Any) -> Array:
    """`registry.ModelFamily.score`: log-likelihood `float32[B, C]` of `batch["candidate_ids"]`
    (`int32[B, C, R]`, `[CLS] r [SEP]` padded like `response_ids`)."""
    del config
    return score_candidates(model, batch, batch["candidate_ids"], batch["candidate_mask"])


registry.register(
    registry.ModelFamily(
        name="maria",
        build=build,
        loss_fn=loss_fn,
        formatter="maria",
        frozen_source=lambda config: config.model.get("init_from"),
        side_tables=side_tables,
        generate=_generate,
        score=_score,
    )
)
