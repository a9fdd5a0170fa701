"""Livebot (Ma et al. 2019, lancopku/livebot) in Flax NNX on `layers`, trained from scratch.

A port of the original's `codes/modules.py` and the `Model` of `codes/transformer.py`: three
transformer stacks with pre-LN sublayers (`x + drop(f(LN(x)))`) and a final LayerNorm each:

    video encoder    frames `float[B, F, frame_dim]` -> self-attention, FFN      -> V [B, F, d]
    text encoder     context tokens + sinusoidal positions -> self-attention,
                     attention to V, FFN                                           -> T [B, Lc, d]
    comment decoder  response tokens + sinusoidal positions -> causal self-
                     attention, attention to V, attention to T, FFN, Linear       -> logits

One token embedding (no sqrt(d) scaling) is shared by the text encoder and the decoder; the
output layer is a separate Linear with bias; FFNs are `w_2(drop(relu(w_1(x))))`; attention
probabilities get dropout. Defaults are the original's: d=512, 8 heads, FFN 2048, 6 blocks per
stack, dropout 0.1, 5 frames, context 100 tokens (5 comments x 20), responses of 20 tokens
(`[CLS] r [SEP]`; the original's BOS/EOS are the tokenizer's [CLS]/[SEP] here), greedy decoding
of 20 tokens, no length or repetition penalty. Training: token cross-entropy, Adam 3e-4.

Deviations from the original, each because the original relies on its fixed data:
  * frame features are projected `frame_dim -> d` (the original fed 512-d ResNet-18 features
    straight in, d = 512); `frame_projection=None` projects only when the widths differ;
  * padding is masked: padded context tokens and missing frames are never attended (the
    original attended its padding, which made results depend on the padded length); the
    decoder's self-attention is causal, as the original's;
  * the loss is the mean over real response tokens (the original averaged the per-token losses
    over every slot, padding included, i.e. scaled by the padding fraction);
  * candidate ranking scores the log-likelihood, higher first (the original's `ranking` summed
    the token losses and sorted them in descending order, the least likely candidate first);
  * LayerNorm is the shared one, `(x - mean) / sqrt(var + eps)`, where the original computed
    `(x - mean) / (std + eps)` with the unbiased std (a factor of sqrt(d / (d - 1)) apart);
    kernels start at N(0, 0.02) (PyTorch's uniform default has std 0.0255 at d = 512), the
    token table at N(0, 1) as PyTorch's `nn.Embedding`, so it is on the scale of the positions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tiktalk_jax import decoding, input_pipeline

# livebot_inputs registers the "livebot" batch formatter with the input pipeline on import.
from tiktalk_jax.models import gpt2_inputs, layers, livebot_inputs, losses, registry

Array = jax.Array
Batch = Mapping[str, Array]
Memory = Array | layers.KVCache  # encoder states, or their precomputed keys/values


@dataclasses.dataclass(frozen=True)
class LivebotConfig:
    """Livebot's shape, input lengths and special tokens (hashable).

    Attributes:
      vocab_size, d_model, num_heads, d_ff, num_layers (blocks per stack), dropout.
      frame_dim: width of the frame features; frame_projection: Linear frame_dim -> d_model
        (None: only when they differ).
      max_frames F, max_context_len Lc, max_response_len Lr: the formatter's lengths.
      layer_norm_eps; initializer_range (kernels); embedding_init_std (token table).
      pad_id, bos_id, eos_id: [PAD], [CLS], [SEP] of the tokenizer (trained-vocab ids by
        default, see `gpt2_inputs.vocab_spec`).
    """

    vocab_size: int = 30000
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_layers: int = 6
    dropout: float = 0.1
    frame_dim: int = 512
    frame_projection: bool | None = None
    max_frames: int = 5
    max_context_len: int = 100
    max_response_len: int = 20
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    embedding_init_std: float = 1.0
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self):
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even and divisible by the heads")
        if self.max_frames < 1 or self.max_context_len < 3 or self.max_response_len < 3:
            raise ValueError("need max_frames >= 1, max_context_len >= 3, max_response_len >= 3")

    @property
    def projects_frames(self) -> bool:
        if self.frame_projection is None:
            return self.frame_dim != self.d_model
        return self.frame_projection


def sinusoidal_positions(positions: Array, d: int) -> Array:
    """`int[...]` -> `float32[..., d]`: sin at even, cos at odd features (the original's PE)."""
    inv = jnp.exp(jnp.arange(0, d, 2, dtype=jnp.float32) * -(math.log(10000.0) / d))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], d)


class FeedForward(nnx.Module):
    """`w_2(drop(relu(w_1(x))))`: the shared Mlp's projections with the original's inner
    dropout (which `layers.Mlp` leaves to its users)."""

    def __init__(self, config: LivebotConfig, **kw):
        rngs = kw["rngs"]
        self.mlp = layers.Mlp(config.d_model, config.d_ff, activation="relu", **kw)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.mlp.down(self.dropout(jax.nn.relu(self.mlp.up(x))))


def _attend(attn: layers.MultiHeadAttention, h: Array, memory: Memory, mask: Array) -> Array:
    """Cross-attention of `h` to encoder states or to their precomputed keys/values."""
    if isinstance(memory, layers.KVCache):
        return attn(h, cache=memory, mask=mask)[0]
    return attn(h, memory, mask=mask)


class Block(nnx.Module):
    """One pre-LN block: self-attention, then attention to each memory in turn, then the FFN.

    `memories` = 0 (video encoder), 1 (text encoder: video), 2 (decoder: video, text).
    """

    def __init__(self, config: LivebotConfig, memories: int, **kw):
        rngs = kw["rngs"]
        ln = dict(eps=config.layer_norm_eps, **kw)
        init = nnx.initializers.normal(config.initializer_range)
        attn = dict(dropout_rate=config.dropout, kernel_init=init, **kw)
        d, heads = config.d_model, config.num_heads
        self.self_norm = layers.layer_norm(d, **ln)
        self.self_attn = layers.MultiHeadAttention(heads, d, **attn)
        self.cross_norms = nnx.List([layers.layer_norm(d, **ln) for _ in range(memories)])
        self.cross_attns = nnx.List(
            [layers.MultiHeadAttention(heads, d, **attn) for _ in range(memories)]
        )
        self.ff_norm = layers.layer_norm(d, **ln)
        self.ff = FeedForward(config, kernel_init=init, **kw)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(
        self,
        x: Array,
        self_mask: Array | None,
        memories: tuple[tuple[Memory, Array], ...] = (),
        cache: layers.KVCache | None = None,
        cache_index=None,
    ) -> tuple[Array, layers.KVCache | None]:
        """`x: float[B, T, d]`; `memories`: (states `[B, M, d]` or their KVCache, mask
        `bool[B, 1, 1|T, M]`) per cross-attention. Returns `(x, new self-attention cache)`."""
        h = self.self_norm(x)
        if cache is None:
            a = self.self_attn(h, mask=self_mask)
        else:
            a, cache = self.self_attn(h, mask=self_mask, cache=cache, cache_index=cache_index)
        x = x + self.dropout(a)
        for norm, attn, (memory, mask) in zip(self.cross_norms, self.cross_attns, memories):
            x = x + self.dropout(_attend(attn, norm(x), memory, mask))
        return x + self.dropout(self.ff(self.ff_norm(x))), cache


class Livebot(nnx.Module):
    """`model(batch) -> logits float[B, Lr - 1, V]` of `response_ids[:, 1:]` (teacher forcing).

    `batch` (the `livebot` formatter's): frame_feats `float[B, F, frame_dim]`, frame_mask
    `bool[B, F]`, context_ids / context_mask `[B, Lc]`, response_ids / response_mask `[B, Lr]`.
    """

    def __init__(
        self, config: LivebotConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, init = config.d_model, nnx.initializers.normal(config.initializer_range)
        self.frame_proj = (
            # The input axis is a feature width (512 ResNet-18, 2048 ResNet-50), not the stream.
            layers.linear(config.frame_dim, d, axes=(None, layers.EMBED), kernel_init=init, **kw)
            if config.projects_frames
            else None
        )
        self.embedding = layers.embedding(
            config.vocab_size, d, init=nnx.initializers.normal(config.embedding_init_std), **kw
        )
        self.embed_dropout = nnx.Dropout(config.dropout, rngs=rngs)
        n = config.num_layers
        self.video_blocks = nnx.List([Block(config, 0, **kw) for _ in range(n)])
        self.video_norm = layers.layer_norm(d, eps=config.layer_norm_eps, **kw)
        self.text_blocks = nnx.List([Block(config, 1, **kw) for _ in range(n)])
        self.text_norm = layers.layer_norm(d, eps=config.layer_norm_eps, **kw)
        self.decoder_blocks = nnx.List([Block(config, 2, **kw) for _ in range(n)])
        self.decoder_norm = layers.layer_norm(d, eps=config.layer_norm_eps, **kw)
        self.output = layers.linear(
            d, config.vocab_size, axes=(layers.EMBED, layers.VOCAB), kernel_init=init, **kw
        )

    def embed_tokens(self, ids: Array, positions: Array) -> Array:
        """Token embedding + sinusoidal position, dropout: `float[B, T, d]`."""
        x = self.embedding(ids)
        pe = sinusoidal_positions(jnp.broadcast_to(positions, ids.shape), self.config.d_model)
        return self.embed_dropout(x + pe.astype(x.dtype))

    def encode_video(self, frames: Array, frame_mask: Array) -> Array:
        """`float[B, F, frame_dim]`, `bool[B, F]` -> `float[B, F, d]` (no positions, as the
        original)."""
        x = frames if self.frame_proj is None else self.frame_proj(frames)
        mask = layers.padding_mask(frame_mask)
        for block in self.video_blocks:
            x, _ = block(x, mask)
        return self.video_norm(x)

    def encode_text(self, ids: Array, mask: Array, video: Array, frame_mask: Array) -> Array:
        """Context `int[B, Lc]` attending to itself and the video -> `float[B, Lc, d]`."""
        x = self.embed_tokens(ids, jnp.arange(ids.shape[1]))
        memories = ((video, _memory_mask(frame_mask)),)
        self_mask = layers.padding_mask(mask)
        for block in self.text_blocks:
            x, _ = block(x, self_mask, memories)
        return self.text_norm(x)

    def decode(
        self,
        x: Array,
        self_mask: Array | None,
        video: list[Memory],
        frame_mask: Array,
        text: list[Memory],
        context_mask: Array,
        *,
        caches: list[layers.KVCache] | None = None,
        cache_index=None,
    ) -> tuple[Array, list[layers.KVCache] | None]:
        """Decoder stack over embedded tokens `x: float[N, T, d]`; `video` / `text` give each
        block its memory (the encoder states, or that block's precomputed KVCache)."""
        fm, cm = _memory_mask(frame_mask), _memory_mask(context_mask)
        new_caches = None if caches is None else []
        for i, block in enumerate(self.decoder_blocks):
            memories = ((video[i], fm), (text[i], cm))
            if caches is None:
                x, _ = block(x, self_mask, memories)
            else:
                x, cache = block(x, self_mask, memories, caches[i], cache_index)
                new_caches.append(cache)
        return self.decoder_norm(x), new_caches

    def encode(self, batch: Batch) -> tuple[Array, Array]:
        """`(video float[B, F, d], text float[B, Lc, d])` of a batch."""
        video = self.encode_video(batch["frame_feats"], batch["frame_mask"])
        text = self.encode_text(
            batch["context_ids"], batch["context_mask"], video, batch["frame_mask"]
        )
        return video, text

    def __call__(self, batch: Batch) -> Array:
        video, text = self.encode(batch)
        ids = batch["response_ids"][:, :-1]
        n = self.config.num_layers
        x = self.embed_tokens(ids, jnp.arange(ids.shape[1]))
        hidden, _ = self.decode(
            x,
            layers.causal_mask(ids.shape[1]),
            [video] * n,
            batch["frame_mask"],
            [text] * n,
            batch["context_mask"],
        )
        return self.output(hidden)


def _memory_mask(valid: Array) -> Array:
    """`bool[B, M]` -> `bool[B, 1, 1, M]` (every query sees the valid memory slots)."""
    return jnp.asarray(valid).astype(bool)[:, None, None, :]


# --------------------------------------------------------------------------------------------
# Training objective.
# --------------------------------------------------------------------------------------------


def loss_fn(model: Livebot, batch: Batch, rngs: nnx.Rngs | Array | None = None):
    """Token cross-entropy of the response after [CLS] ([SEP] included), mean over real tokens
    of the examples with `example_mask`. Dropout uses the model's stored streams. Returns
    `(loss, {"token_accuracy", "tokens"})`."""
    del rngs
    logits = model(batch).astype(jnp.float32)
    targets = batch["response_ids"][:, 1:]
    return losses.response_cross_entropy(
        logits, targets, batch["response_mask"][:, 1:], batch.get("example_mask")
    )


# --------------------------------------------------------------------------------------------
# Decoding and candidate ranking.
# --------------------------------------------------------------------------------------------


class DecodeState(NamedTuple):
    """caches: per decoder block, self-attention `KVCache [N, S]`; video / text: per block the
    cross-attention keys/values of the encoder states `[N, F]` / `[N, Lc]`; frame_mask
    `bool[N, F]`, context_mask `bool[N, Lc]`."""

    caches: list[layers.KVCache]
    video: list[layers.KVCache]
    text: list[layers.KVCache]
    frame_mask: Array
    context_mask: Array


def search_config(config: LivebotConfig, **overrides) -> decoding.SearchConfig:
    """The original's decoding: greedy (num_beams=1), 20 tokens, no penalties, end at [SEP]."""
    base = dict(
        bos_id=config.bos_id,
        eos_ids=(config.eos_id,),
        pad_id=config.pad_id,
        num_beams=1,
        max_new_tokens=20,
        length_penalty=1.0,
        repetition_penalty=1.0,
    )
    base.update(overrides)
    return decoding.SearchConfig(**base)


def _eval_copy(model: Livebot) -> Livebot:
    """A dropout-free view of `model` sharing its parameters (safe inside jit)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return copy


def _memory_batch(batch: Batch) -> dict[str, Array]:
    keys = ("frame_feats", "frame_mask", "context_ids", "context_mask")
    return {k: batch[k] for k in keys}


def prefill(model: Livebot, batch: Batch, rows: int, max_new_tokens: int) -> DecodeState:
    """Encodes video and context once, projects every decoder block's cross-attention
    keys/values, and repeats them for `rows` search rows per example; empty self-attention
    caches of `max_new_tokens` slots."""
    video, text = model.encode(batch)
    rep = lambda a: jnp.repeat(a, rows, axis=0)  # noqa: E731
    video_kv, text_kv = [], []
    for block in model.decoder_blocks:
        video_kv.append(jax.tree.map(rep, block.cross_attns[0].project_kv(video)))
        text_kv.append(jax.tree.map(rep, block.cross_attns[1].project_kv(text)))
    c = model.config
    n = video.shape[0] * rows
    caches = [
        layers.KVCache.zeros(n, max_new_tokens, c.num_heads, c.d_model // c.num_heads, video.dtype)
        for _ in range(c.num_layers)
    ]
    return DecodeState(
        caches, video_kv, text_kv, rep(batch["frame_mask"]), rep(batch["context_mask"])
    )


def cached_step(model: Livebot, state: DecodeState, tokens: Array, cur_len: Array):
    """`decoding.StepFn`: runs `tokens[:, cur_len - 1]` (cache slot cur_len - 1) -> logits."""
    last = jax.lax.dynamic_slice_in_dim(tokens, cur_len - 1, 1, axis=1)
    x = model.embed_tokens(last, cur_len - 1)
    # The cache masks its unwritten slots; every written one precedes the new token.
    hidden, caches = model.decode(
        x,
        None,
        state.video,
        state.frame_mask,
        state.text,
        state.context_mask,
        caches=state.caches,
        cache_index=cur_len - 1,
    )
    return model.output(hidden[:, 0]), state._replace(caches=caches)


def uncached_step(model: Livebot, batch: Batch, tokens: Array, cur_len: Array):
    """`decoding.StepFn` recomputing everything (encoders included) every step, as the
    original's `generate` did; `batch` holds one row per search row."""
    video, text = model.encode(batch)
    n = model.config.num_layers
    x = model.embed_tokens(tokens, jnp.arange(tokens.shape[1]))
    hidden, _ = model.decode(
        x,
        layers.causal_mask(tokens.shape[1]),
        [video] * n,
        batch["frame_mask"],
        [text] * n,
        batch["context_mask"],
    )
    h = jax.lax.dynamic_index_in_dim(hidden, cur_len - 1, axis=1, keepdims=False)
    return model.output(h), batch


def generate(
    model: Livebot,
    batch: Batch,
    cfg: decoding.SearchConfig,
    *,
    cached: bool = True,
    greedy: bool = True,
) -> decoding.SearchOutput:
    """Greedy (default, the original's) or beam search for every example of `batch`.

    Jit with `nnx.jit(generate, static_argnames=("cfg", "cached", "greedy"))`; runs in eval
    mode whatever the model's mode.
    """
    m = _eval_copy(model)
    memory = _memory_batch(batch)
    b = memory["context_ids"].shape[0]
    rows = 1 if greedy else cfg.num_beams
    if cached:
        state = prefill(m, memory, rows, cfg.max_new_tokens)
        step, reorder = functools.partial(cached_step, m), decoding.default_reorder
    else:
        state = jax.tree.map(lambda a: jnp.repeat(a, rows, axis=0), memory)
        step, reorder = functools.partial(uncached_step, m), lambda s, _: s
    if greedy:
        return decoding.greedy_search(step, state, b, cfg)
    return decoding.beam_search(step, state, b, cfg, reorder)


def score_candidates(
    model: Livebot, batch: Batch, candidate_ids: Array, candidate_mask: Array
) -> Array:
    """Log-likelihood of candidate responses: `float[B, C]`, higher = more likely.

    `candidate_ids: int[B, C, Lr]` are `[CLS] r [SEP]` (padded; `candidate_mask` True on real
    tokens); the score is `sum_t log p(r_t | r_<t, video, context)` over the tokens after [CLS]
    ([SEP] included): minus the original's summed token losses. Video and context are encoded
    once per example; logits are `[B * C, Lr - 1, V]`: chunk C for large vocabularies.
    """
    m = _eval_copy(model)
    b, c, lr = candidate_ids.shape
    video, text = m.encode(_memory_batch(batch))
    rep = lambda a: jnp.repeat(a, c, axis=0)  # noqa: E731
    ids = candidate_ids.reshape(b * c, lr)
    n = m.config.num_layers
    x = m.embed_tokens(ids[:, :-1], jnp.arange(lr - 1))
    hidden, _ = m.decode(
        x,
        layers.causal_mask(lr - 1),
        [rep(video)] * n,
        rep(batch["frame_mask"]),
        [rep(text)] * n,
        rep(batch["context_mask"]),
    )
    logp = jax.nn.log_softmax(m.output(hidden).astype(jnp.float32))
    target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=2)[..., 0]
    valid = candidate_mask.reshape(b * c, lr)[:, 1:].astype(bool)
    return jnp.sum(jnp.where(valid, target, 0.0), axis=1).reshape(b, c)


# --------------------------------------------------------------------------------------------
# The "livebot" model family (tiktalk_jax/models/registry.py).
# --------------------------------------------------------------------------------------------


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` section of the family (the original's shape by default).

    Fields: name; dtype / param_dtype; the LivebotConfig fields (vocab_size and the token ids
    None: the tokenizer's, see `gpt2_inputs.vocab_spec`); frames_dir: a features dataset of a
    frame encoder (`python -m tiktalk_jax.extract`, e.g. ResNet-18: frame_dim 512), joined as
    the "frames" side table. Copy the lengths into `config.input` with
    `livebot_inputs.input_overrides`.
    """
    placeholder = ml_collections.config_dict.placeholder
    base = LivebotConfig()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LivebotConfig)}
    fields.update(
        vocab_size=placeholder(int),
        frame_projection=placeholder(bool),
        pad_id=placeholder(int),
        bos_id=placeholder(int),
        eos_id=placeholder(int),
    )
    config = ml_collections.ConfigDict(
        dict(
            name="livebot",
            dtype="float32",
            param_dtype="float32",
            frames_dir=placeholder(str),
            **fields,
        )
    )
    config.update(overrides)
    return config


def config_from(config: ml_collections.ConfigDict) -> LivebotConfig:
    """The LivebotConfig of a full config (`config.model`; vocabulary from the tokenizer)."""
    m = config.model
    spec = gpt2_inputs.vocab_spec(config)
    names = {f.name for f in dataclasses.fields(LivebotConfig)}
    fields = {k: m[k] for k in names if k in m and m[k] is not None}
    fields.update(
        vocab_size=int(m.get("vocab_size") or spec.vocab_size),
        pad_id=spec.pad_id,
        bos_id=int(m.get("bos_id") if m.get("bos_id") is not None else spec.cls_id),
        eos_id=int(m.get("eos_id") if m.get("eos_id") is not None else spec.sep_id),
    )
    if fields["vocab_size"] < spec.vocab_size:
        raise ValueError(
            f"the tokenizer has {spec.vocab_size} tokens, the model embeds {fields['vocab_size']}"
        )
    return LivebotConfig(**fields)


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Livebot:
    """A randomly initialised Livebot (training mode) of `config.model`'s shape."""
    m = config.model
    return Livebot(
        config_from(config),
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        rngs=rngs,
    )


def side_tables(config: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """The "frames" features table of `config.model.frames_dir` for the train and eval splits;
    fails when its feature width is not `config.model.frame_dim`. Dialogues whose video has no
    features (missing or undecodable media) get no frames (`maria.WithEmptyRecords`), so every
    model of the table scores the same dialogues."""
    from tiktalk_jax import features
    from tiktalk_jax.models.maria import WithEmptyRecords

    frames_dir = config.model.get("frames_dir")
    if not frames_dir:
        raise ValueError("livebot needs config.model.frames_dir (a frame features dataset)")
    if not os.path.isdir(frames_dir):
        raise FileNotFoundError(f"no features dataset at {frames_dir!r}")
    splits = dict.fromkeys([config.input.train_split, *config.input.eval_splits])
    tables = {s: features.FeatureTable(frames_dir, s) for s in splits}
    for table in tables.values():
        width = table.fields["features"]["shape"][-1]
        if width != config.model.frame_dim:
            raise ValueError(
                f"{frames_dir}: frame features are {width}-d, config.model.frame_dim is "
                f"{config.model.frame_dim}"
            )
    out = {}
    for split, table in tables.items():
        try:
            wanted = input_pipeline.dialogue_video_ids(config.input, split)
        except FileNotFoundError:  # no dialogues dataset: the pipeline says so when it opens it
            wanted = set()
        missing = sorted(wanted - set(table.keys))
        if missing:
            logging.warning(
                "%s %s: %d videos of the dialogues have no features; their dialogues get no "
                "frames. First: %s", frames_dir, split, len(missing), missing[:5],
            )  # fmt: skip
        source = WithEmptyRecords(table, missing, int(config.model.frame_dim))
        out[split] = [
            input_pipeline.SideTable(
                name=livebot_inputs.FRAMES, source=source, key="video_id", keys=source.keys
            )
        ]
    return out


def decode_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The family's default `config.decode` section (used when a config has none): the
    original's greedy decoding of 20 tokens without penalties."""
    config = ml_collections.ConfigDict(
        dict(
            num_beams=1,
            max_new_tokens=20,
            length_penalty=1.0,
            repetition_penalty=1.0,
            greedy=True,
            cached=True,
        )
    )
    config.update(overrides)
    return config


def decode_settings(
    config: ml_collections.ConfigDict, model_config: LivebotConfig
) -> tuple[decoding.SearchConfig, dict]:
    """(search config, `generate` options) from `config.decode` (default: `decode_config()`)."""
    d = decode_config()
    d.update(dict(config.get("decode") or {}))
    search = search_config(
        model_config,
        num_beams=int(d.num_beams),
        max_new_tokens=int(d.max_new_tokens),
        length_penalty=float(d.length_penalty),
        repetition_penalty=float(d.repetition_penalty),
    )
    return search, dict(cached=bool(d.cached), greedy=bool(d.greedy))


def family_generate(model: Livebot, batch: Batch, config: ml_collections.ConfigDict) -> Array:
    """Registry `generate`: `int32[B, max_new_tokens]` (words, [SEP], padding). Traceable."""
    search, options = decode_settings(config, model.config)
    return generate(model, batch, search, **options).tokens


def family_score(model: Livebot, batch: Batch, config: ml_collections.ConfigDict) -> Array:
    """Registry `score`: log-likelihood of `batch["candidate_ids"]`, `float32[B, C]`."""
    del config
    return score_candidates(model, batch, batch["candidate_ids"], batch["candidate_mask"])


registry.register(
    registry.ModelFamily(
        name="livebot",
        build=build,
        loss_fn=loss_fn,
        formatter=livebot_inputs.FORMATTER,
        side_tables=side_tables,
        generate=family_generate,
        score=family_score,
    )
)
