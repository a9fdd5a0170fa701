"""BERT (HF `BertModel` / `BertForMaskedLM`) in Flax NNX, built on `layers`.

A port of transformers' `modeling_bert.py` (absolute positions, post-LN layers) that also takes a
full per-example attention mask, runs its encoder on embeddings built elsewhere (Maria appends
projected video/audio tokens that get no position or segment embedding) and decodes through a
static key/value cache.

    model = bert.from_pretrained("/path/to/bert-base-chinese")    # BertModel, eval mode
    hidden = model(input_ids, token_type_ids, attention_mask)      # float[B, T, H]
    logits = model.mlm_logits(hidden)                              # float[B, T, V] (MLM head)

    x = model.embed(input_ids, token_type_ids, position_ids)       # float[B, T, H]
    x = jnp.concatenate([x, frame_tokens], axis=1)
    hidden, _ = model.encode(x, full_mask)                         # full_mask: bool[B, T', T']

Dropout follows the NNX convention: modules are built in training mode; `model.eval()` /
`model.train()` switch (from_pretrained returns eval mode, like HF).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tiktalk_jax.models import hf_import, layers

Array = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of HF `BertConfig` that shape the network (defaults: bert-base-chinese)."""

    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    tie_word_embeddings: bool = True

    def __post_init__(self):
        layers.get_activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        """Builds the config from a parsed HF `config.json` (missing fields take HF defaults)."""
        kind = hf.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"only absolute position embeddings are ported, got {kind!r}")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("BERT decoder / cross-attention checkpoints are not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})


class BertEmbeddings(nnx.Module):
    """word + position + token type embeddings -> LayerNorm -> dropout."""

    def __init__(self, config: BertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, init=init, rngs=rngs)
        h = config.hidden_size
        self.word_embeddings = layers.embedding(config.vocab_size, h, **kw)
        small = (None, layers.EMBED)
        self.position_embeddings = layers.embedding(
            config.max_position_embeddings, h, axes=small, **kw
        )
        self.token_type_embeddings = layers.embedding(config.type_vocab_size, h, axes=small, **kw)
        self.norm = layers.layer_norm(
            h, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, input_ids: Array, token_type_ids=None, position_ids=None) -> Array:
        """`input_ids: int[B, T]`; token types default to 0, positions to 0..T-1."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.norm(x))


class BertLayer(nnx.Module):
    """Post-LN encoder layer: `x = LN(x + drop(attn(x)))`, `x = LN(x + drop(mlp(x)))`."""

    def __init__(self, config: BertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        h = config.hidden_size
        init = nnx.initializers.normal(config.initializer_range)
        ln = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = layers.MultiHeadAttention(
            config.num_attention_heads,
            h,
            dropout_rate=config.attention_probs_dropout_prob,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=init,
            rngs=rngs,
        )
        self.attention_dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.attention_norm = layers.layer_norm(h, **ln)
        self.mlp = layers.Mlp(
            h,
            config.intermediate_size,
            activation=config.hidden_act,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=init,
            rngs=rngs,
        )
        self.mlp_dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.mlp_norm = layers.layer_norm(h, **ln)

    def __call__(self, x: Array, mask=None, cache=None, cache_index=None):
        """`x: float[B, T, H]`, `mask: bool[B, 1|heads, T, Tk]` -> `(float[B, T, H], cache)`."""
        if cache is None:
            a = self.attention(x, mask=mask)
        else:
            a, cache = self.attention(x, mask=mask, cache=cache, cache_index=cache_index)
        x = self.attention_norm(x + self.attention_dropout(a))
        x = self.mlp_norm(x + self.mlp_dropout(self.mlp(x)))
        return x, cache


class BertMLMHead(nnx.Module):
    """`cls.predictions`: dense -> act -> LayerNorm -> decoder (tied to word embeddings) + bias."""

    def __init__(self, config: BertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        h, v = config.hidden_size, config.vocab_size
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense = layers.linear(h, h, axes=(layers.EMBED, layers.MLP), kernel_init=init, **kw)
        self._act = layers.get_activation(config.hidden_act)
        self.norm = layers.layer_norm(h, eps=config.layer_norm_eps, **kw)
        # The tied decoder reads the word embedding table at call time (passed in, not held, so
        # the module tree has no shared references); an untied checkpoint gets its own kernel.
        self.decoder = (
            None
            if config.tie_word_embeddings
            else layers.linear(
                h, v, axes=(layers.EMBED, layers.VOCAB), use_bias=False, kernel_init=init, **kw
            )
        )
        self.bias = nnx.Param(
            layers.partitioned(nnx.initializers.zeros_init(), (layers.VOCAB,))(
                rngs.params(), (v,), param_dtype
            )
        )

    def __call__(self, hidden: Array, word_embeddings: nnx.Embed) -> Array:
        """`hidden: float[..., H]` -> logits `float[..., V]`."""
        x = self.norm(self._act(self.dense(hidden)))
        logits = word_embeddings.attend(x) if self.decoder is None else self.decoder(x)
        return logits + self.bias.value.astype(logits.dtype)


class BertModel(nnx.Module):
    """BERT encoder with optional pooler and optional MLM head.

    Call: `model(input_ids: int[B, T], token_type_ids=None, attention_mask=None,
    position_ids=None) -> float[B, T, H]`, where `attention_mask` is a padding mask `[B, T]`,
    a full mask `[B, T, T]` or `[B, 1|heads, T, T]` (True/1 = may attend).
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        add_pooling_layer: bool = True,
        add_mlm_head: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = BertEmbeddings(config, **kw)
        self.layers = nnx.List([BertLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        h = config.hidden_size
        init = nnx.initializers.normal(config.initializer_range)
        self.pooler = (
            layers.linear(h, h, axes=(layers.EMBED, layers.MLP), kernel_init=init, **kw)
            if add_pooling_layer
            else None
        )
        self.mlm = BertMLMHead(config, **kw) if add_mlm_head else None

    def embed(self, input_ids: Array, token_type_ids=None, position_ids=None) -> Array:
        """Token embeddings (word + position + type, LayerNorm, dropout): `float[B, T, H]`."""
        return self.embeddings(input_ids, token_type_ids, position_ids)

    def encode(
        self,
        embeddings: Array,
        attention_mask=None,
        *,
        caches: list[layers.KVCache] | None = None,
        cache_index=None,
    ) -> tuple[Array, list[layers.KVCache] | None]:
        """Runs the encoder layers on `embeddings: float[B, T, H]`.

        With `caches` (one `KVCache` per layer, see `init_caches`) the T tokens' keys/values are
        written at slots [cache_index, cache_index + T) and the mask is over cache slots:
        `[B, 1|heads, T, S]`. Returns `(hidden float[B, T, H], new caches or None)`.
        """
        mask = layers.as_attention_mask(attention_mask)
        x = embeddings
        new_caches = None if caches is None else []
        for i, layer in enumerate(self.layers):
            if caches is None:
                x, _ = layer(x, mask)
            else:
                x, cache = layer(x, mask, caches[i], cache_index)
                new_caches.append(cache)
        return x, new_caches

    def init_caches(self, batch: int, length: int, dtype=jnp.float32) -> list[layers.KVCache]:
        """Empty key/value caches of `length` slots for every layer."""
        c = self.config
        return [
            layers.KVCache.zeros(batch, length, c.num_attention_heads, c.head_dim, dtype)
            for _ in range(c.num_hidden_layers)
        ]

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None):
        x = self.embed(input_ids, token_type_ids, position_ids)
        return self.encode(x, attention_mask)[0]

    def pool(self, hidden: Array) -> Array:
        """HF pooler: `tanh(dense(hidden[:, 0]))` -> `float[B, H]`."""
        if self.pooler is None:
            raise ValueError("this BertModel was built without a pooler")
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: Array) -> Array:
        """MLM head over `hidden: float[..., H]` -> `float[..., vocab]`."""
        if self.mlm is None:
            raise ValueError("this BertModel was built without an MLM head")
        return self.mlm(hidden, self.embeddings.word_embeddings)


# --------------------------------------------------------------------------------------------
# HF checkpoint import.
# --------------------------------------------------------------------------------------------

# Tensors a BERT checkpoint may carry that no module here consumes: the position_ids buffer and
# the next-sentence-prediction head of BertForPreTraining-style checkpoints (bert-base-chinese).
_IGNORED = (r"embeddings\.position_ids$", r"^cls\.seq_relationship\.")


def _legacy_renamed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted checkpoints name LayerNorm parameters gamma/beta (as HF renames them)."""
    out = {}
    for k, v in tensors.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        out[k] = v
    return out


def bert_prefix(sd: hf_import.StateDict) -> str:
    """ "bert." for task-head checkpoints (BertForMaskedLM, ...), "" for a bare BertModel."""
    return "bert." if sd.has_prefix("bert.embeddings.") else ""


def load_hf_weights(model: BertModel, sd: hf_import.StateDict, prefix: str | None = None) -> None:
    """Copies BERT weights (and the `cls.predictions` MLM head when the model has one) from `sd`
    into `model`. `prefix` defaults to `bert_prefix(sd)`."""
    p = bert_prefix(sd) if prefix is None else prefix
    emb = model.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        key = f"{p}embeddings.{name}.weight"
        hf_import.assign(getattr(emb, name).embedding, sd.get(key), key)
    hf_import.assign_layer_norm(emb.norm, sd, f"{p}embeddings.LayerNorm")
    for i, layer in enumerate(model.layers):
        key = f"{p}encoder.layer.{i}"
        att = layer.attention
        for name, proj in (("query", att.query), ("key", att.key), ("value", att.value)):
            # [in, heads * head_dim] -> [in, heads, head_dim]: assign_linear reshapes to the kernel.
            hf_import.assign_linear(proj, sd, f"{key}.attention.self.{name}")
        hf_import.assign_linear(att.out, sd, f"{key}.attention.output.dense")
        hf_import.assign_layer_norm(layer.attention_norm, sd, f"{key}.attention.output.LayerNorm")
        hf_import.assign_linear(layer.mlp.up, sd, f"{key}.intermediate.dense")
        hf_import.assign_linear(layer.mlp.down, sd, f"{key}.output.dense")
        hf_import.assign_layer_norm(layer.mlp_norm, sd, f"{key}.output.LayerNorm")
    if model.pooler is not None:
        hf_import.assign_linear(model.pooler, sd, f"{p}pooler.dense")
    if model.mlm is not None:
        _load_mlm_head(model, sd)


def hf_state_dict(model: BertModel, prefix: str = "bert.") -> dict[str, np.ndarray]:
    """The inverse of `load_hf_weights`: `model` as HF tensors (float32 numpy) by HF name, the
    `BertForMaskedLM` layout with the default `prefix` (the MLM head, when the model has one, as
    `cls.predictions.*`; tied decoder weights are not written, HF ties them on load)."""
    p, emb = prefix, model.embeddings
    out = {
        f"{p}embeddings.{name}.weight": np.asarray(getattr(emb, name).embedding.value, np.float32)
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    out.update(hf_import.layer_norm_tensors(emb.norm, f"{p}embeddings.LayerNorm"))
    for i, layer in enumerate(model.layers):
        key = f"{p}encoder.layer.{i}"
        att = layer.attention
        for name, proj in (("query", att.query), ("key", att.key), ("value", att.value)):
            out.update(hf_import.linear_tensors(proj, f"{key}.attention.self.{name}"))
        out.update(hf_import.linear_tensors(att.out, f"{key}.attention.output.dense", in_dims=2))
        out.update(
            hf_import.layer_norm_tensors(layer.attention_norm, f"{key}.attention.output.LayerNorm")
        )
        out.update(hf_import.linear_tensors(layer.mlp.up, f"{key}.intermediate.dense"))
        out.update(hf_import.linear_tensors(layer.mlp.down, f"{key}.output.dense"))
        out.update(hf_import.layer_norm_tensors(layer.mlp_norm, f"{key}.output.LayerNorm"))
    if model.pooler is not None:
        out.update(hf_import.linear_tensors(model.pooler, f"{p}pooler.dense"))
    if model.mlm is not None:
        head, key = model.mlm, "cls.predictions"
        out.update(hf_import.linear_tensors(head.dense, f"{key}.transform.dense"))
        out.update(hf_import.layer_norm_tensors(head.norm, f"{key}.transform.LayerNorm"))
        bias = np.asarray(head.bias.value, np.float32)
        # transformers 5 reads `decoder.bias`; older versions `cls.predictions.bias`: write both.
        out[f"{key}.bias"], out[f"{key}.decoder.bias"] = bias, bias.copy()
        if head.decoder is not None:
            out.update(hf_import.linear_tensors(head.decoder, f"{key}.decoder"))
    return out


def _load_mlm_head(model: BertModel, sd: hf_import.StateDict) -> None:
    head, key = model.mlm, "cls.predictions"
    hf_import.assign_linear(head.dense, sd, f"{key}.transform.dense")
    hf_import.assign_layer_norm(head.norm, sd, f"{key}.transform.LayerNorm")
    # HF applies `decoder.bias`; with tied weights it is the same tensor as `{key}.bias`, untied
    # (transformers 5) the two are separate and `{key}.bias` is left unused by the forward pass.
    bias_key = f"{key}.decoder.bias" if f"{key}.decoder.bias" in sd else f"{key}.bias"
    hf_import.assign(head.bias, sd.get(bias_key), bias_key)
    if f"{key}.bias" in sd:
        sd.get(f"{key}.bias")
    if head.decoder is not None:
        hf_import.assign_linear(head.decoder, sd, f"{key}.decoder")
    elif f"{key}.decoder.weight" in sd:
        # Tied: the decoder is the word embedding table; a copy saved next to it (.bin files
        # keep both) must be that table, or the checkpoint is not what its config says.
        table = np.asarray(model.embeddings.word_embeddings.embedding.value)
        if not np.array_equal(np.asarray(sd.get(f"{key}.decoder.weight"), table.dtype), table):
            raise ValueError(
                f"{sd.source}: tie_word_embeddings but {key}.decoder.weight differs from the "
                "word embeddings"
            )


def from_pretrained(
    path: str,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> BertModel:
    """Reads a local HF `BertModel` / `BertForMaskedLM` (/ `BertForPreTraining`) directory.

    Builds the pooler when the checkpoint has one and the MLM head when it has
    `cls.predictions.*`; fails if any checkpoint tensor is left unused (the position_ids buffer
    and the NSP head excepted). Returns the module in eval mode. `rngs` seeds dropout
    (default `nnx.Rngs(0)`).
    """
    config = BertConfig.from_hf(hf_import.load_config(path))
    sd = hf_import.StateDict(_legacy_renamed(hf_import.load_state_dict(path)), source=path)
    p = bert_prefix(sd)
    model = BertModel(
        config,
        add_pooling_layer=sd.has_prefix(f"{p}pooler."),
        add_mlm_head=sd.has_prefix("cls.predictions."),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
    )
    load_hf_weights(model, sd, p)
    for pattern in _IGNORED:
        sd.mark_unused_ok(pattern)
    sd.check_all_used()
    model.eval()
    return model
