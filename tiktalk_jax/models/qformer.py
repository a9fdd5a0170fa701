"""BLIP-2's Querying Transformer (HF `Blip2QFormerModel` + query tokens + language projection).

The Q-Former is a BERT-base-sized, post-LN encoder over `num_query_tokens` (32) learned query
embeddings. Every `cross_attention_frequency`-th layer (0, 2, 4, ... by default) lets the
queries attend to the frozen image encoder's tokens (keys/values projected from the vision width,
1408 for EVA ViT-g); the queries then go through their own FFN (`intermediate_query` /
`output_query`). Text tokens, when given (BLIP-2's image-text matching path; only checkpoints
with `use_qformer_text_input`), share the self-attention with the queries, skip the
cross-attention and use the second FFN (`intermediate` / `output`); an instruction (InstructBLIP:
LLM token embeddings through `InstructionEmbeddings`) takes the same path. A LayerNorm + dropout is
applied to the queries (and text embeddings) before the first layer.

    qf = qformer.from_pretrained("/ckpt/blip2-opt-2.7b", projection_features=896)
    query = qf(image_embeds, image_mask)   # float[B, 32, 768] (HF Blip2QFormerModel output)
    prefix = qf.project(query)             # float[B, 32, 896]: tokens for the LLM

A Q-Former layer is a BERT layer (bert.BertLayer: self-attention sublayer and FFN sublayer,
each `LN(x + dropout(f(x)))`) with the cross-attention sublayer in between and, for the text
path, a second FFN sublayer; `QFormerLayer` subclasses `bert.BertLayer` so the shared parts
(and their parameter names) are BERT's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tiktalk_jax.models import bert, hf_import, layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """HF `Blip2QFormerConfig` fields (+ `num_query_tokens` of `Blip2Config`); defaults: BLIP-2.

    `text_embeddings`: the model has word/position tables for the text path (HF keeps them at the
    top level of `Blip2ForImageTextRetrieval` as `embeddings.*`).
    `instruction_features`: > 0 gives the queries an instruction (InstructBLIP): token embeddings
    of that width (the LLM's) join the queries' self-attention through `InstructionEmbeddings`;
    needs `use_qformer_text_input` (the text FFN they go through).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    use_qformer_text_input: bool = False
    text_embeddings: bool = False
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    instruction_features: int = 0

    def __post_init__(self):
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1: {self}")
        if self.instruction_features and not self.use_qformer_text_input:
            raise ValueError(
                f"an instruction needs use_qformer_text_input (its tokens use the text FFN): {self}"
            )
        _ = self.bert  # validates the shared fields

    @property
    def bert(self) -> bert.BertConfig:
        """The BERT shape of the self-attention / FFN sublayers."""
        return bert.BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.layer_norm_eps,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
        )

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> QFormerConfig:
        """From a `Blip2Config` dict (its `qformer_config`, `num_query_tokens` and the vision
        width) or a bare `Blip2QFormerConfig` dict."""
        q = dict(hf.get("qformer_config", hf) or {})
        kind = q.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"only absolute position embeddings are ported, got {kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in q.items() if k in names and v is not None}
        if "qformer_config" in hf:
            fields["num_query_tokens"] = hf.get("num_query_tokens", 32)
            vision = hf.get("vision_config") or {}
            # Blip2Config sets the cross-attention input width to the vision tower's.
            fields["encoder_hidden_size"] = vision.get("hidden_size", fields.get(
                "encoder_hidden_size", 1408))  # fmt: skip
        fields.update(overrides)
        return cls(**fields)


def _post_ln(norm: nnx.LayerNorm, dropout: nnx.Dropout, x: Array, update: Array) -> Array:
    """BERT's sublayer output: `LN(x + dropout(update))`."""
    return norm(x + dropout(update))


class QFormerLayer(bert.BertLayer):
    """One Q-Former layer.

    Inherited from `bert.BertLayer`: `attention` (+ `attention_dropout`, `attention_norm`), the
    self-attention over queries and text; `mlp` (+ `mlp_dropout`, `mlp_norm`), the QUERY FFN
    (HF `intermediate_query` / `output_query`). Added: `cross_attention` (+ dropout, norm) on
    cross-attention layers, queries -> image tokens; `text_mlp` (+ dropout, norm) with
    `use_qformer_text_input`, the text FFN (HF `intermediate` / `output`).
    """

    def __init__(
        self,
        config: QFormerConfig,
        index: int,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(config.bert, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h = config.hidden_size
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(eps=config.layer_norm_eps, **kw)
        cross = config.has_cross_attention(index)
        self.cross_attention = (
            layers.MultiHeadAttention(
                config.num_attention_heads,
                h,
                kv_features=config.encoder_hidden_size,
                dropout_rate=config.attention_probs_dropout_prob,
                kernel_init=init,
                **kw,
            )
            if cross
            else None
        )
        self.cross_attention_dropout = (
            nnx.Dropout(config.hidden_dropout_prob, rngs=rngs) if cross else None
        )
        self.cross_attention_norm = layers.layer_norm(h, **ln) if cross else None
        text = config.use_qformer_text_input
        self.text_mlp = (
            layers.Mlp(
                h, config.intermediate_size, activation=config.hidden_act, kernel_init=init, **kw
            )
            if text
            else None
        )
        self.text_mlp_dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs) if text else None
        self.text_mlp_norm = layers.layer_norm(h, **ln) if text else None

    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        image: Array | None = None,
        image_mask: Array | None = None,
        num_queries: int = 0,
    ) -> Array:
        """`x: float[B, Q + T, H]` (queries first), `mask: bool[B|1, 1, Q+T, Q+T]`,
        `image: float[B, N, Dv]`, `image_mask: bool[B|1, 1, Q, N]` -> `float[B, Q + T, H]`."""
        x = _post_ln(self.attention_norm, self.attention_dropout, x, self.attention(x, mask=mask))
        if num_queries == 0:
            return self._text_ffn(x)
        q, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attention is not None:
            if image is None:
                raise ValueError("cross-attention layers need the image tokens")
            update = self.cross_attention(q, image, mask=image_mask)
            q = _post_ln(self.cross_attention_norm, self.cross_attention_dropout, q, update)
        q = _post_ln(self.mlp_norm, self.mlp_dropout, q, self.mlp(q))
        if text.shape[1] == 0:
            return q
        return jnp.concatenate([q, self._text_ffn(text)], axis=1)

    def _text_ffn(self, x: Array) -> Array:
        if self.text_mlp is None:
            raise ValueError("text tokens need a Q-Former built with use_qformer_text_input")
        return _post_ln(self.text_mlp_norm, self.text_mlp_dropout, x, self.text_mlp(x))


class TextEmbeddings(nnx.Module):
    """HF `Blip2TextEmbeddings`: word + absolute position embeddings (no LayerNorm: the Q-Former's
    input LayerNorm normalises queries and text together)."""

    def __init__(self, config: QFormerConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        kw = dict(
            dtype=dtype,
            param_dtype=param_dtype,
            init=nnx.initializers.normal(config.initializer_range),
            rngs=rngs,
        )
        self.word_embeddings = layers.embedding(config.vocab_size, config.hidden_size, **kw)
        self.position_embeddings = layers.embedding(
            config.max_position_embeddings, config.hidden_size, axes=(None, layers.EMBED), **kw
        )

    def __call__(self, input_ids: Array) -> Array:
        """`int[B, T] -> float[B, T, H]` (positions 0..T-1)."""
        positions = jnp.arange(input_ids.shape[1])[None, :]
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)


class InstructionEmbeddings(nnx.Module):
    """The instruction's entry into the Q-Former (InstructBLIP's instruction-aware queries).

    InstructBLIP tokenizes the instruction with the Q-Former's own (English BERT) vocabulary. Here
    the instruction is the LLM's prompt, already embedded by the frozen LLM: a trained `projection`
    `[D_llm, H]` maps those embeddings to the Q-Former's width and absolute `position_embeddings`
    `[P, H]` are added (as HF `Blip2TextEmbeddings`). So any LLM tokenizer works (TikTalk's
    prompts are Chinese) and no vocabulary-sized table is trained.
    """

    def __init__(self, config: QFormerConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projection = layers.linear(
            config.instruction_features, config.hidden_size, axes=(None, layers.EMBED),
            kernel_init=init, **kw,
        )  # fmt: skip
        self.position_embeddings = layers.embedding(
            config.max_position_embeddings, config.hidden_size, axes=(None, layers.EMBED),
            init=init, **kw,
        )  # fmt: skip

    def __call__(self, embeds: Array, mask: Array) -> Array:
        """`embeds: float[B, T, D_llm]` (left or right padded), `mask: bool[B, T]` ->
        `float[B, T, H]`; positions count the real tokens only, so padding does not shift them."""
        t, limit = embeds.shape[1], self.position_embeddings.embedding.get_value().shape[0]
        if t > limit:
            raise ValueError(f"the instruction has {t} tokens, the Q-Former {limit} positions")
        positions = layers.positions_from_mask(mask)
        return self.projection(embeds) + self.position_embeddings(positions)


class QFormer(nnx.Module):
    """Query tokens + Q-Former encoder (+ text embeddings) (+ the projection into an LLM).

    Parameters: `query_tokens` `[1, Q, H]`, `layernorm`, `layers/i/...` (see `QFormerLayer`),
    `embeddings` (text path, optional), `instruction` (`InstructionEmbeddings`, optional),
    `language_projection` `[H, D_llm]` (optional).
    """

    def __init__(
        self,
        config: QFormerConfig,
        *,
        projection_features: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        h = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The original BLIP-2 draws the queries from N(0, 0.02) (HF's init zeroes them, which
        # would leave all 32 queries identical, and identical under training, without a
        # checkpoint).
        init = nnx.initializers.normal(config.initializer_range)
        self.query_tokens = nnx.Param(
            layers.partitioned(init, (None, None, layers.EMBED))(
                rngs.params(), (1, config.num_query_tokens, h), param_dtype
            )
        )
        self.layernorm = layers.layer_norm(h, eps=config.layer_norm_eps, **kw)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.layers = nnx.List(
            [QFormerLayer(config, i, **kw) for i in range(config.num_hidden_layers)]
        )
        self.embeddings = TextEmbeddings(config, **kw) if config.text_embeddings else None
        self.instruction = (
            InstructionEmbeddings(config, **kw) if config.instruction_features else None
        )
        self.language_projection = None
        if projection_features:
            self.set_projection(projection_features, **kw)

    @property
    def num_queries(self) -> int:
        return self.config.num_query_tokens

    def set_projection(self, features: int, *, rngs: nnx.Rngs, dtype=None,
                       param_dtype=jnp.float32) -> None:  # fmt: skip
        """A freshly initialised `language_projection` `[H, features]` (N(0, 0.02), zero bias)."""
        # nnx.data: the attribute may have been None (static) before.
        self.language_projection = nnx.data(
            layers.linear(
                self.config.hidden_size,
                features,
                axes=(None, layers.EMBED),
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nnx.initializers.normal(self.config.initializer_range),
                rngs=rngs,
            )
        )

    def add_instruction(self, features: int, *, rngs: nnx.Rngs, dtype=None,
                        param_dtype=jnp.float32) -> list[str]:  # fmt: skip
        """Makes a loaded Q-Former instruction-aware (`QFormerConfig.instruction_features`):
        fresh `InstructionEmbeddings` for `features`-wide token embeddings and, in layers without
        one (BLIP-2 checkpoints made for generation drop it), a text FFN copied from the layer's
        query FFN, the closest trained weights (InstructBLIP starts both from BLIP-2's stage 1).
        Returns the names of what was added, for the caller's log line."""
        added = ["instruction (fresh)"]
        for i, layer in enumerate(self.layers):
            if layer.text_mlp is None:
                layer.text_mlp = nnx.data(nnx.clone(layer.mlp))
                layer.text_mlp_norm = nnx.data(nnx.clone(layer.mlp_norm))
                layer.text_mlp_dropout = nnx.data(
                    nnx.Dropout(self.config.hidden_dropout_prob, rngs=rngs)
                )
                added.append(f"layers/{i}/text_mlp (copied from layers/{i}/mlp)")
        self.config = dataclasses.replace(
            self.config, use_qformer_text_input=True, instruction_features=features
        )
        self.instruction = nnx.data(
            InstructionEmbeddings(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )
        return added

    def encode(
        self,
        embeds: Array,
        attention_mask: Array | None = None,
        image_embeds: Array | None = None,
        image_mask: Array | None = None,
        num_queries: int | None = None,
    ) -> Array:
        """HF `Blip2QFormerModel(query_embeds=embeds, query_length=num_queries, attention_mask,
        encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)`.

        `embeds: float[B, Q + T, H]` (queries first, then text embeddings), `attention_mask:
        [B, Q + T]` (1 = real), `image_embeds: float[B, N, Dv]`, `image_mask: [B, N]`;
        `num_queries` defaults to all of `embeds` -> `float[B, Q + T, H]`.
        """
        num_queries = embeds.shape[1] if num_queries is None else num_queries
        x = self.dropout(self.layernorm(embeds))
        mask = None if attention_mask is None else layers.padding_mask(attention_mask)
        cross_mask = None
        if image_mask is not None:
            cross_mask = layers.padding_mask(image_mask, num_queries=num_queries)
        if image_embeds is not None:
            dtype = self.layernorm.dtype or x.dtype
            image_embeds = image_embeds.astype(dtype)
        for layer in self.layers:
            x = layer(x, mask, image_embeds, cross_mask, num_queries)
        return x

    def queries(self, batch: int) -> Array:
        """The learned queries, `float[batch, Q, H]`."""
        q = self.query_tokens.get_value()
        return jnp.broadcast_to(q, (batch, *q.shape[1:]))

    def __call__(
        self,
        image_embeds: Array,
        image_mask: Array | None = None,
        *,
        input_ids: Array | None = None,
        text_mask: Array | None = None,
        instruction: Array | None = None,
        instruction_mask: Array | None = None,
    ) -> Array:
        """Query outputs `float[B, Q, H]` for `image_embeds: float[B, N, Dv]` (`image_mask: [B, N]`,
        1 = real token). With `input_ids: int[B, T]` (text path, `text_mask: [B, T]`) the text
        shares the self-attention and `float[B, Q + T, H]` is returned (queries first). With
        `instruction: float[B, T, D_llm]` (`instruction_mask: [B, T]`, needs `self.instruction`)
        the instruction shares the self-attention and the query outputs `float[B, Q, H]` are
        returned (InstructBLIP)."""
        b = image_embeds.shape[0]
        q = self.queries(b)
        if instruction is not None:
            if self.instruction is None:
                raise ValueError("this Q-Former takes no instruction (instruction_features = 0)")
            if input_ids is not None:
                raise ValueError("give input_ids or an instruction, not both")
            if instruction_mask is None:
                instruction_mask = jnp.ones(instruction.shape[:2], bool)
            text = self.instruction(instruction, instruction_mask).astype(q.dtype)
            real = jnp.asarray(instruction_mask).astype(bool)
            mask = jnp.concatenate([jnp.ones(q.shape[:2], bool), real], axis=1)
            x = jnp.concatenate([q, text], axis=1)
            out = self.encode(x, mask, image_embeds, image_mask, self.num_queries)
            return out[:, : self.num_queries]
        if input_ids is None:
            return self.encode(q, None, image_embeds, image_mask)
        if self.embeddings is None:
            raise ValueError("this Q-Former has no text embeddings")
        text = self.embeddings(input_ids).astype(q.dtype)
        mask = None
        if text_mask is not None:
            mask = jnp.concatenate([jnp.ones(q.shape[:2], bool), jnp.asarray(text_mask) != 0], 1)
        return self.encode(
            jnp.concatenate([q, text], axis=1), mask, image_embeds, image_mask, self.num_queries
        )

    def project(self, query_output: Array) -> Array:
        """`float[B, Q, H] -> float[B, Q, D_llm]` (`language_projection`)."""
        if self.language_projection is None:
            raise ValueError("this Q-Former has no language projection")
        return self.language_projection(query_output)


# --------------------------------------------------------------------------------------------
# HF checkpoints.
# --------------------------------------------------------------------------------------------

# Parts of BLIP-2 checkpoints that belong to other modules (vision tower, LLM, retrieval heads)
# or are buffers.
_OTHERS = (
    r"^vision_model\.",
    r"^language_model\.",
    r"^(vision_projection|text_projection|itm_head)\.",
    r"embeddings\.position_ids$",
)


def load_hf_weights(model: QFormer, sd: hf_import.StateDict, prefix: str = "qformer.") -> None:
    """Copies `query_tokens`, `{prefix}*` (and `embeddings.*` when the model has text
    embeddings) into `model`; the projection is the caller's business."""
    hf_import.assign(model.query_tokens, sd.get("query_tokens"), "query_tokens")
    hf_import.assign_layer_norm(model.layernorm, sd, f"{prefix}layernorm")
    for i, layer in enumerate(model.layers):
        key = f"{prefix}encoder.layer.{i}"
        blocks = [("attention", layer.attention, layer.attention_norm)]
        if layer.cross_attention is not None:
            blocks.append(("crossattention", layer.cross_attention, layer.cross_attention_norm))
        for name, att, norm in blocks:
            for proj in ("query", "key", "value"):
                hf_import.assign_linear(getattr(att, proj), sd, f"{key}.{name}.attention.{proj}")
            hf_import.assign_linear(att.out, sd, f"{key}.{name}.output.dense")
            hf_import.assign_layer_norm(norm, sd, f"{key}.{name}.output.LayerNorm")
        ffns = [("_query", layer.mlp, layer.mlp_norm)]
        if layer.text_mlp is not None:
            ffns.append(("", layer.text_mlp, layer.text_mlp_norm))
        for suffix, mlp, norm in ffns:
            hf_import.assign_linear(mlp.up, sd, f"{key}.intermediate{suffix}.dense")
            hf_import.assign_linear(mlp.down, sd, f"{key}.output{suffix}.dense")
            hf_import.assign_layer_norm(norm, sd, f"{key}.output{suffix}.LayerNorm")
    if model.embeddings is not None:
        p = "embeddings." if sd.has_prefix("embeddings.") else f"{prefix}embeddings."
        for name in ("word_embeddings", "position_embeddings"):
            emb = getattr(model.embeddings, name).embedding
            hf_import.assign(emb, sd.get(f"{p}{name}.weight"), f"{p}{name}.weight")


def from_pretrained(
    path: str,
    *,
    projection_features: int | None = None,
    instruction_features: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> QFormer:
    """The Q-Former, query tokens and language projection of a local HF BLIP-2 directory
    (`Blip2ForConditionalGeneration`, `Blip2Model`, `Blip2ForImageTextRetrieval`, ...).

    `projection_features`: the width of the LLM the queries feed (None: the checkpoint's). When
    it differs from the checkpoint's projection (a different LLM than the one BLIP-2 was trained
    with), or the checkpoint has none, the projection is freshly initialised and a log line says
    so. Every Q-Former tensor must be used; the vision tower and LLM tensors are ignored.
    `instruction_features` > 0 makes it instruction-aware (`QFormer.add_instruction`: BLIP-2
    checkpoints have no instruction input; a log line names what was added).
    `rngs` seeds dropout and a fresh projection (default `nnx.Rngs(0)`). Returns eval mode.
    """
    hf = hf_import.load_config(path)
    sd = hf_import.StateDict(hf_import.load_state_dict(path), source=path)
    config = QFormerConfig.from_hf(hf, text_embeddings=sd.has_prefix("embeddings.word_embeddings"))
    if not sd.has_prefix("qformer.") or "query_tokens" not in sd:
        raise ValueError(f"{path}: not a BLIP-2 checkpoint (no query_tokens / qformer.* tensors)")
    ckpt_width = None
    if "language_projection.weight" in sd.tensors:
        ckpt_width = int(sd.tensors["language_projection.weight"].shape[0])
    width = projection_features or ckpt_width
    load_projection = width is not None and width == ckpt_width
    model = hf_import.abstract_module(
        lambda: QFormer(
            config,
            projection_features=width if load_projection else None,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    load_hf_weights(model, sd)
    if load_projection:
        hf_import.assign_linear(model.language_projection, sd, "language_projection")
    elif ckpt_width is not None:
        sd.mark_unused_ok(r"^language_projection\.")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if width is not None and not load_projection:
        model.set_projection(width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        logging.warning(
            "BLIP-2 language projection RE-INITIALISED: %s maps the queries to %s-d (the LLM it "
            "was trained with) but this LLM is %d wide; the Q-Former is loaded, the projection "
            "%d -> %d starts from N(0, %g).",
            path, ckpt_width if ckpt_width is not None else "no projection: nothing", width,
            config.hidden_size, width, config.initializer_range,
        )  # fmt: skip
    for pattern in _OTHERS:
        sd.mark_unused_ok(pattern)
    sd.check_all_used()
    hf_import.check_all_set(model, path)
    if instruction_features:
        added = model.add_instruction(
            instruction_features, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        logging.warning(
            "BLIP-2 Q-Former made INSTRUCTION-AWARE (%s has no instruction input): %s.",
            path, ", ".join(added),
        )  # fmt: skip
    nnx.reseed(model, dropout=rngs.dropout())
    model.eval()
    return model
