r"""BLIP-2 for video dialogue: a Q-Former adapter in front of a frozen decoder LLM.

The paper's BLIP-2_Img / BLIP-2_Video rows: the 32 learned queries of a Q-Former
(qformer.py) read the frozen ViT-g tokens of the video, a Linear projects them to the LLM's width
and they are PREPENDED to the LLM's token embeddings of the `llm` prompt (llm_inputs.py: the
video title and the dialogue context). The loss is next-token cross-entropy on the response
tokens only; the LLM is frozen (`config.frozen = "^llm/"`), so only the Q-Former (its queries
included), the projection and, for the temporal variant, the frame position embeddings train.

    sequence   [ Q projected queries | prompt (left-padded) | response  end ]
    loss                                        ^ predicts response[0]  ...  end

Variants (`config.model.variant`; the visual tokens come from a vit_g features table, see
blip2_inputs.py):
  img       one stored frame's 257 tokens (`image_features`, a seeded random frame per video).
  video     the frames' tokens averaged (`features`), as the paper's BLIP-2_Video.
  temporal  (beyond the paper) the tokens of F frames spread over the video
            (`frame_features`, extracted with `python -m tiktalk_jax.extract --encoder=vit_g
            --frame_tokens=F`), each frame's 257 tokens plus a learned frame-position embedding
            (`frame_positions float[F, Dv]`, zero-initialised: training starts from plain
            multi-frame BLIP-2), concatenated into F * 257 keys/values the queries attend to,
            so they can pick the moment a comment is about. Storage: F * 257 * 1408 * 2 bytes per
            video in bfloat16 (5.8 MB for F = 8; ~224 GB for TikTalk's 38.7K videos; F = 4
            halves it).

Instruction-aware queries (`config.model.qformer.instruction`, InstructBLIP, beyond the paper):
the prompt's frozen LLM embeddings also enter the Q-Former (`qformer.InstructionEmbeddings`) and
share the queries' self-attention, so what the queries fetch from the frames depends on the title
and the context: on a question about the video the prefix can carry what it asks, on other turns
it can stay out of the LLM's way.

A video without features (missing or undecodable media) gets `visual_mask` all False: its query
tokens are masked out of the LLM's attention and the example is trained on its prompt alone.

Initialisation. `config.model.qformer.init_from` is a local HF BLIP-2 directory: its Q-Former
and query tokens are loaded; its language projection too when its LLM has the width of ours,
otherwise (the usual case: BLIP-2 was trained with OPT / Flan-T5, TikTalk uses a Chinese
decoder) the projection is re-initialised and a log line says so. The LLM is
`config.model.llm` (the `llm` family's section: a local HF checkpoint loaded straight into its
fsdp shards, or a random-init shape) or the model an `llm` run trained (`config.model.llm_run`,
its workdir; LoRA merged): normally the text-only LLM fine-tuned on TikTalk first, as the paper
does with ChatGLM-6B.

Generation runs `llm.generate` (cached greedy / beam / sampling) on the prefix + prompt
embeddings; candidate scoring reuses one prompt cache per example for its candidates.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tiktalk_jax import decoding, input_pipeline

# blip2_inputs registers the "blip2" batch formatter with the input pipeline on import.
from tiktalk_jax.models import (
    blip2_captions,
    blip2_inputs,
    layers,
    llm,
    llm_inputs,
    losses,
    qformer,
    registry,
)

Array = jax.Array
Batch = Mapping[str, Array]

VARIANTS = tuple(blip2_inputs.VARIANT_FIELDS)


class Blip2Dialogue(nnx.Module):
    """Q-Former adapter + decoder LLM.

    Parameters: `qformer/...` (query tokens, Q-Former layers, `language_projection`),
    `frame_positions` `[F, Dv]` (temporal variant only), `llm/...` (the frozen decoder).
    """

    def __init__(
        self,
        qformer_model: qformer.QFormer,
        llm_model: llm.Llm,
        *,
        num_frames: int = 0,
        param_dtype=jnp.float32,
    ):
        if qformer_model.language_projection is None:
            raise ValueError("the Q-Former needs a language projection into the LLM")
        width = qformer_model.language_projection.kernel.get_value().shape[-1]
        if width != llm_model.config.hidden_size:
            raise ValueError(
                f"the projection maps to {width}, the LLM is {llm_model.config.hidden_size} wide"
            )
        self.qformer = qformer_model
        self.llm = llm_model
        dv = qformer_model.config.encoder_hidden_size
        self.frame_positions = (
            nnx.Param(
                layers.partitioned(nnx.initializers.zeros_init(), (None, layers.EMBED))(
                    jax.random.key(0), (num_frames, dv), param_dtype
                )
            )
            if num_frames
            else None
        )

    @property
    def num_queries(self) -> int:
        return self.qformer.num_queries

    @property
    def instructed(self) -> bool:
        """The queries read the prompt (InstructBLIP; `config.model.qformer.instruction`)."""
        return self.qformer.instruction is not None

    def visual_prefix(
        self,
        visual: Array,
        visual_mask: Array,
        instruction: Array | None = None,
        instruction_mask: Array | None = None,
    ) -> tuple[Array, Array]:
        """`visual: float[B, F, N, Dv]`, `visual_mask: bool[B, F]` (and for an instructed
        Q-Former the prompt's LLM embeddings `instruction: float[B, T, D_llm]`,
        `instruction_mask: bool[B, T]`) -> `(float[B, Q, D_llm]` projected query outputs,
        `bool[B, Q]` (False where an example has no frame))."""
        b, f, n, dv = visual.shape
        x = visual.astype(self.qformer.layernorm.dtype or jnp.float32)
        if self.frame_positions is not None:
            if f > self.frame_positions.get_value().shape[0]:
                raise ValueError(
                    f"{f} frames, {self.frame_positions.get_value().shape[0]} positions"
                )
            pos = self.frame_positions.get_value()[:f].astype(x.dtype)
            x = x + pos[None, :, None, :]
        mask = jnp.asarray(visual_mask).astype(bool)
        queries = self.qformer(
            x.reshape(b, f * n, dv),
            jnp.repeat(mask, n, axis=1),
            instruction=instruction,
            instruction_mask=instruction_mask,
        )
        prefix = self.qformer.project(queries)
        valid = jnp.broadcast_to(jnp.any(mask, axis=1)[:, None], (b, self.num_queries))
        return prefix, valid

    def prompt_inputs(self, batch: Batch) -> tuple[Array, Array]:
        """`[prefix | prompt]` embeddings `float[B, Q + Lc, D]` and their mask `bool[B, Q + Lc]`."""
        prompt = self.llm.embed_tokens(batch["prompt_ids"])
        prompt_mask = jnp.asarray(batch["prompt_mask"]).astype(bool)
        instruction = {}
        if self.instructed:  # the frozen LLM's embeddings: nothing to differentiate there
            instruction = dict(instruction=jax.lax.stop_gradient(prompt),
                               instruction_mask=prompt_mask)  # fmt: skip
        prefix, valid = self.visual_prefix(batch["visual"], batch["visual_mask"], **instruction)
        x = jnp.concatenate([prefix.astype(prompt.dtype), prompt], axis=1)
        mask = jnp.concatenate([valid, prompt_mask], axis=1)
        return x, mask

    def response_logits(self, batch: Batch) -> Array:
        """Teacher-forced logits `float32[B, Lr, V]`: slot t predicts `response_ids[:, t]`."""
        x, mask = self.prompt_inputs(batch)
        response = self.llm.embed_tokens(batch["response_ids"])
        x = jnp.concatenate([x, response], axis=1)
        mask = jnp.concatenate([mask, jnp.asarray(batch["response_mask"]).astype(bool)], axis=1)
        hidden, _ = self.llm.hidden_states(attention_mask=mask, inputs_embeds=x)
        start, lr = x.shape[1] - response.shape[1], response.shape[1]
        # Only the Lr slots that predict a response token reach the vocabulary-sized head.
        return self.llm.logits(hidden[:, start - 1 : start + lr - 1]).astype(jnp.float32)


def loss_fn(model: Blip2Dialogue, batch: Batch, rngs: nnx.Rngs | None = None):
    """Next-token cross-entropy on the response tokens (words and end token), mean over the
    tokens of examples with `example_mask`. Dropout (Q-Former) uses the model's stored streams.
    Returns `(loss, {"token_accuracy", "tokens"})`."""
    del rngs
    logits = model.response_logits(batch)
    targets = batch["response_ids"]
    return losses.response_cross_entropy(
        logits, targets, batch["response_mask"], batch.get("example_mask")
    )


# --------------------------------------------------------------------------------------------
# Generation and candidate scoring.
# --------------------------------------------------------------------------------------------


def _eval_copy(model: Blip2Dialogue) -> Blip2Dialogue:
    """A dropout-free view of `model` sharing its parameters (safe inside jit)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return copy


def generate(
    model: Blip2Dialogue,
    batch: Batch,
    cfg: decoding.SearchConfig,
    *,
    method: str = "greedy",
    rng: Array | None = None,
) -> decoding.SearchOutput:
    """Continues `[prefix | prompt]` of every example with `llm.generate` (the LLM's cache).
    Jit with `nnx.jit(generate, static_argnames=("cfg", "method"))`; runs in eval mode."""
    m = _eval_copy(model)
    x, mask = m.prompt_inputs(batch)
    return llm.generate(m.llm, attention_mask=mask, inputs_embeds=x, cfg=cfg, method=method,
                        rng=rng)  # fmt: skip


def score_responses(model: Blip2Dialogue, batch: Batch, ids: Array, mask: Array) -> Array:
    """Log-likelihood `float32[B, C]` of C responses per example (`ids: int[B, C, L]` laid out
    like `response_ids`, `mask` True on real tokens): `sum_t log p(r_t | prefix, prompt, r_<t)`.

    The prefix and prompt run once per example; the cache is copied to its C candidates, which
    then run in one call (logits `[B * C, L, V]`: chunk C for large vocabularies)."""
    m = _eval_copy(model)
    x, valid = m.prompt_inputs(batch)
    b, c, length = ids.shape
    state = llm.prefill(m.llm, None, valid, length, inputs_embeds=x)
    rows = jnp.repeat(jnp.arange(b), c)
    take = lambda a: jnp.take(a, rows, axis=0)  # noqa: E731
    cache = state.cache
    cache = llm.Cache(jax.tree.map(take, cache.kv), take(cache.valid), cache.index)
    flat, real = ids.reshape(b * c, length), mask.reshape(b * c, length).astype(bool)
    logits = [take(state.first_logits)[:, None]]
    if length > 1:
        after, _ = m.llm(flat[:, :-1], real[:, :-1], cache=cache)
        logits.append(after.astype(jnp.float32))
    logp = jax.nn.log_softmax(jnp.concatenate(logits, axis=1))
    target = jnp.take_along_axis(logp, flat[..., None], axis=2)[..., 0]
    return jnp.sum(jnp.where(real, target, 0.0), axis=1).reshape(b, c)


# --------------------------------------------------------------------------------------------
# The "blip2" model family (tiktalk_jax/models/registry.py).
# --------------------------------------------------------------------------------------------


def qformer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """`config.model.qformer`: init_from (a local HF BLIP-2 directory; its config wins over the
    shape fields) or the shape of a random init (`QFormerConfig` fields; the cross-attention
    width is `config.input.visual_dim`), the dropout rates, and `instruction` (InstructBLIP: the
    queries also read the LLM prompt, `qformer.InstructionEmbeddings`)."""
    base = qformer.QFormerConfig()
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "num_query_tokens", "cross_attention_frequency", "hidden_dropout_prob",
             "attention_probs_dropout_prob", "initializer_range")  # fmt: skip
    config = ml_collections.ConfigDict(
        dict(
            init_from=ml_collections.config_dict.placeholder(str),
            instruction=False,
            **{n: getattr(base, n) for n in names},
        )
    )
    config.update(overrides)
    return config


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` section: name, variant (img | video | temporal), qformer
    (`qformer_config`), llm (the `llm` family's section, `llm.model_config`, LoRA off: the LLM
    is frozen), llm_run (a workdir of an `llm` run whose trained LLM to use instead; `llm` is
    then ignored), qformer_run (a workdir of a `blip2` run, normally its caption stage, whose
    Q-Former and projection to start from; `qformer.init_from` is then ignored), dtype /
    param_dtype of the Q-Former side."""
    config = ml_collections.ConfigDict(
        dict(
            name="blip2",
            variant="video",
            llm_run=ml_collections.config_dict.placeholder(str),
            qformer_run=ml_collections.config_dict.placeholder(str),
            dtype="float32",
            param_dtype="float32",
            qformer=qformer_config(),
            llm=llm.model_config(lora=dict(rank=0)),
        )
    )
    config.update(overrides)
    return config


def _llm_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config whose `model` is `config.model.llm`, for the `llm` family's functions."""
    return ml_collections.ConfigDict(
        dict(model=config.model.llm, input=config.input, sharding=config.sharding,
             decode=config.get("decode") or llm.decode_config())
    )  # fmt: skip


def _qformer_model(config: ml_collections.ConfigDict, width: int, rngs: nnx.Rngs):
    m, q = config.model, config.model.qformer
    kw = dict(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
    visual_dim = int(config.input.visual_dim)
    instruction = width if q.get("instruction") else 0
    if q.get("init_from"):
        model = qformer.from_pretrained(
            q.init_from, projection_features=width, instruction_features=instruction, rngs=rngs,
            **kw,
        )  # fmt: skip
        model.train()
        if model.config.encoder_hidden_size != visual_dim:
            raise ValueError(
                f"{q.init_from}: the Q-Former attends to {model.config.encoder_hidden_size}-d "
                f"tokens, the features are {visual_dim}-d (config.input.visual_dim)"
            )
        return model
    names = {f.name for f in dataclasses.fields(qformer.QFormerConfig)}
    fields = {k: v for k, v in q.items() if k in names and v is not None}
    if instruction:
        fields.update(use_qformer_text_input=True, instruction_features=instruction)
    cfg = qformer.QFormerConfig(**fields, encoder_hidden_size=visual_dim)
    return qformer.QFormer(cfg, projection_features=width, rngs=rngs, **kw)


def llm_from_run(config: ml_collections.ConfigDict, workdir: str) -> llm.Llm:
    """The LLM an `llm` family run trained (its latest checkpoint in `workdir`), LoRA adapters
    merged into the base, on the current mesh (else one device). Its tokenizer must be ours."""
    from tiktalk_jax import evaluate, sharding
    from tiktalk_jax.models import lora

    run = evaluate.load_config(workdir)
    if run.model.name != "llm":
        raise ValueError(f"{workdir} is a {run.model.name!r} run, not an 'llm' run")
    ours, theirs = llm_inputs.token_spec(config), llm_inputs.token_spec(run)
    if ours != theirs or config.input.get("tokenizer") != run.input.get("tokenizer"):
        raise ValueError(
            f"{workdir} was trained with another tokenizer ({run.input.get('tokenizer')!r}, "
            f"{theirs}) than this config's ({config.input.get('tokenizer')!r}, {ours})"
        )
    mesh = llm.current_mesh()
    if mesh is None:
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    loader = evaluate.ModelLoader(run, workdir, mesh)
    steps = loader.steps()
    if not steps:
        raise FileNotFoundError(f"{workdir} has no checkpoint")
    model = loader.load(steps[-1])
    merged = lora.merge(model)
    logging.info(
        "BLIP-2 LLM: step %d of the llm run %s (%d LoRA layers merged)", steps[-1], workdir,
        len(merged),
    )  # fmt: skip
    return model


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Blip2Dialogue:
    """The family's model in training mode: the LLM as the `llm` family builds it (from
    `config.model.llm.init_from` onto the current mesh, or a random-init shape) or as an `llm`
    run trained it (`config.model.llm_run`, a workdir: the paper's text-fine-tuned LLM), the
    Q-Former from `config.model.qformer.init_from` or random init, the projection sized to the
    LLM."""
    m = config.model
    if m.variant not in VARIANTS:
        raise ValueError(f"model.variant {m.variant!r} not in {VARIANTS}")
    if int(m.llm.lora.rank) > 0:
        raise ValueError("BLIP-2 keeps its LLM frozen: set model.llm.lora.rank = 0")
    if m.get("llm_run"):
        llm_model = llm_from_run(config, m.llm_run)
    else:
        llm_model = llm.build(_llm_section(config), rngs)
    qf = _qformer_model(config, llm_model.config.hidden_size, rngs)
    frames = int(config.input.visual_frames) if m.variant == "temporal" else 0
    return Blip2Dialogue(qf, llm_model, num_frames=frames, param_dtype=jnp.dtype(m.param_dtype))


def initialize(model: Blip2Dialogue, config: ml_collections.ConfigDict) -> None:
    """`registry.ModelFamily.initialize`: the Q-Former of `config.model.qformer_run`, if set."""
    if config.model.get("qformer_run"):
        adapter_from_run(model, config, config.model.qformer_run)


def adapter_from_run(model: Blip2Dialogue, config: ml_collections.ConfigDict, workdir: str):
    """Loads the Q-Former (queries, layers, `language_projection`) of the latest checkpoint of
    the `blip2` run in `workdir` (normally its caption stage) into `model`, in place. Only that
    subtree is read; the frame positions keep their init. The run must have frozen the same
    LLM (its recorded fingerprint is checked: a projection aligned to another LLM is useless)
    and have a Q-Former of the same shape."""
    from tiktalk_jax import checkpoint, evaluate, optim

    run = evaluate.load_config(workdir)
    if run.model.name != "blip2":
        raise ValueError(f"{workdir} is a {run.model.name!r} run, not a 'blip2' run")
    theirs = bool(run.model.qformer.get("instruction"))
    if theirs != model.instructed:
        raise ValueError(
            f"model.qformer_run={workdir} trained a Q-Former "
            f"{'with' if theirs else 'without'} an instruction input, this config has "
            f"{'one' if model.instructed else 'none'}: set model.qformer.instruction={theirs}"
        )
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = checkpoint.committed_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{workdir} has no checkpoint")
    step = steps[-1]
    frozen_f = optim.frozen_filter(config.frozen)
    adapter_f = nnx.All(nnx.Param, nnx.PathContains("qformer"))
    _, frozen, adapter, _ = nnx.split(model, frozen_f, adapter_f, ...)
    tree, meta = checkpoint.read_state(directory, step, {"params": nnx.to_pure_dict(adapter)})
    try:
        checkpoint.check_frozen(
            meta.get("frozen"),
            checkpoint.frozen_record(frozen, frozen_source(config)),
            f"{directory}/{step}",
        )
    except checkpoint.FrozenWeightsChanged as e:
        raise checkpoint.FrozenWeightsChanged(
            f"model.qformer_run={workdir}: its Q-Former was aligned to another frozen LLM than "
            f"this run's; use the same llm_run / llm.\n{e}"
        ) from e
    nnx.replace_by_pure_dict(adapter, tree["params"])
    nnx.update(model, adapter)
    logging.info("BLIP-2 Q-Former and projection: step %d of the blip2 run %s", step, workdir)


def features_dir(config: ml_collections.ConfigDict) -> str:
    """`config.input.visual_dir`, else the extract CLI's default `<data_dir>/features/vit_g`."""
    cfg = config.input
    if cfg.get("visual_dir"):
        return cfg.visual_dir
    if not cfg.get("data_dir"):
        raise ValueError("set config.input.visual_dir (or config.input.data_dir)")
    return os.path.join(cfg.data_dir, "features", "vit_g")


def side_tables(config: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """`registry.ModelFamily.side_tables`: the vit_g features table (`features_dir`) as the
    "visual" side table of the train and eval splits. Checks that it has the variant's field
    with `config.input.visual_tokens` x `visual_dim` tokens; dialogues whose video has no
    features get no frames (`maria.WithEmptyRecords`) instead of failing the join."""
    from tiktalk_jax import features
    from tiktalk_jax.models.maria import WithEmptyRecords

    cfg = config.input
    directory = features_dir(config)
    fields = features.read_metadata(directory)["fields"]
    field = cfg.visual_field
    if field not in fields:
        hint = " (extract with --frame_tokens=F)" if field == "frame_features" else ""
        raise ValueError(f"{directory} has no {field!r} field{hint}; it has {sorted(fields)}")
    shape = list(fields[field]["shape"][-2:])
    if shape != [int(cfg.visual_tokens), int(cfg.visual_dim)]:
        raise ValueError(
            f"{directory}: {field} tokens are {shape}, config.input.visual_tokens/visual_dim "
            f"are [{cfg.visual_tokens}, {cfg.visual_dim}]"
        )
    out = {}
    for split in dict.fromkeys([cfg.train_split, *cfg.eval_splits]):
        table = features.FeatureTable(directory, split)
        missing = sorted(input_pipeline.dialogue_video_ids(config.input, split) - set(table.keys))
        if missing:
            logging.warning(
                "%s %s: %d videos of the dialogues have no features; their dialogues get no "
                "frames. First: %s", directory, split, len(missing), missing[:5],
            )  # fmt: skip
        source = WithEmptyRecords(table, missing, int(cfg.visual_dim))
        out[split] = [
            input_pipeline.SideTable(
                name=blip2_inputs.VISUAL, source=source, key="video_id", keys=source.keys
            )
        ]
    return out


def frozen_source(config: ml_collections.ConfigDict) -> str | None:
    """`registry.ModelFamily.frozen_source`: the frozen parameters are the LLM's."""
    return config.model.get("llm_run") or config.model.llm.get("init_from")


def caption_sources(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`registry.ModelFamily.sources` (blip2_captions.py). With `config.input.captions_file`:
    `caption_mix` = 0 (the caption stage) gives the caption records of the train and eval
    splits, each split's videos being its features table's; `caption_mix` = N > 0 gives the
    train dialogues plus the train caption records N times. Without: nothing (the dialogues)."""
    from tiktalk_jax import features

    cfg = config.input
    if not cfg.get("captions_file"):
        return {}
    captions = blip2_captions.read_captions(cfg.captions_file)
    directory = features_dir(config)
    mix = int(cfg.get("caption_mix", 0))
    splits = [cfg.train_split] if mix else [cfg.train_split, *cfg.eval_splits]
    videos = {s: list(features.FeatureTable(directory, s).keys) for s in dict.fromkeys(splits)}
    prompt = cfg.get("caption_prompt") or blip2_captions.DEFAULT_PROMPT
    out = blip2_captions.split_sources(captions, videos, cfg.train_split, prompt)
    if not mix:
        return out
    version_dir = input_pipeline.dataset_dir(cfg.data_dir, cfg.dataset)
    dialogues = input_pipeline.open_split(version_dir, cfg.train_split)
    mixed = blip2_captions.MixedSource(dialogues, out[cfg.train_split], mix)
    logging.info(
        "BLIP-2 dialogue stage: %d train dialogues + %d caption records x %d",
        len(dialogues), len(out[cfg.train_split]), mix,
    )  # fmt: skip
    return {cfg.train_split: mixed}


def family_generate(model: Blip2Dialogue, batch: Batch, config) -> Array:
    """Registry `generate`: `int32[B, max_new_tokens]` (the response, its end token, padding),
    decoding as the `llm` family does (`config.decode`, `llm.decode_settings`)."""
    search, method, seed = llm.decode_settings(_llm_section(config), model.llm.config)
    rng = None
    if method == "sample":
        first = jnp.asarray(batch["record_index"])[0] if "record_index" in batch else 0
        rng = jax.random.fold_in(jax.random.key(seed), first)
    return generate(model, batch, search, method=method, rng=rng).tokens


def family_score(model: Blip2Dialogue, batch: Batch, config) -> Array:
    """Registry `score`: log-likelihood `float32[B, C]` of `batch["candidate_ids"]`, laid out
    like `response_ids` (`response end`; `llm_inputs.encode_candidates`, as the `llm` family)."""
    del config
    ids, mask = batch["candidate_ids"], jnp.asarray(batch["candidate_mask"]).astype(bool)
    return score_responses(model, batch, ids, mask)


registry.register(
    registry.ModelFamily(
        name="blip2",
        build=build,
        loss_fn=loss_fn,
        formatter=blip2_inputs.FORMATTER,
        frozen_source=frozen_source,
        side_tables=side_tables,
        sources=caption_sources,
        initialize=initialize,
        generate=family_generate,
        score=family_score,
        decode_text=llm_inputs.decode_text,
        encode_candidates=llm_inputs.encode_candidates,
    )
)
