"""Model families: what the train loop needs to know about a model, looked up by name.

A family module registers itself when imported:

    # tiktalk_jax/models/maria.py
    registry.register(registry.ModelFamily(
        name="maria", build=build, loss_fn=loss_fn, formatter="maria",
        frozen_source=lambda config: config.model.get("init_from"),
    ))

`get(name)` imports `tiktalk_jax.models.<name>` on first use, so `config.model.name = "maria"`
is all a config needs. The loop never looks inside a model or a batch; the contract is:

  build(config, rngs) -> nnx.Module
      Builds the model from the full config (sizes in `config.model`, compute dtype
      `config.model.dtype`, parameter dtype `config.model.param_dtype`), loading pretrained
      weights where the config says so. Runs eagerly, outside jit; the loop shards the result.
      Parameters carry logical axis names (tiktalk_jax/models/layers.py). Submodules that must
      stay in inference mode while training (a frozen tower's dropout) are built deterministic.
  loss_fn(model, batch, rngs) -> (loss, aux)
      `batch`: the formatter's arrays as global `jax.Array`s `[B, ...]` (plus `example_mask:
      bool[B]`, `record_index: int32[B]`). `rngs`: `nnx.Rngs(dropout=...)`, a fresh stream per
      step (and per micro-batch). Returns `loss: float32[]`, the mean over the examples where
      `example_mask` is True, and `aux: dict[str, float32[]]` of scalars to log (averaged over
      steps like the loss). Runs inside jit: no Python side effects, no host syncs. In eval the
      loop passes a view of the model with `deterministic=True` set everywhere.
  formatter: the `input_pipeline` formatter that makes this family's batches.
  frozen_source(config) -> str | None   (optional)
      Where the frozen parameters (`config.frozen`) come from, recorded in checkpoints next to
      their fingerprint so a changed frozen tower is reported by path.
  side_tables(config) -> {split: [input_pipeline.SideTable]}   (optional)
      Side tables (features per video, knowledge per dialogue) the pipeline joins.
  initialize(model, config) -> None   (optional)
      Fills trainable weights from elsewhere before training starts (BLIP-2's `qformer_run`).
      Called by `train.init_state` only: a model rebuilt to load a checkpoint (evaluation) gets
      those weights from the checkpoint.
  sources(config) -> {split: Sequence[record]}   (optional)
      Records that replace the TFDS dialogues of some splits (e.g. BLIP-2's caption pairs in
      its caption stage); an empty mapping (the usual case) keeps the dialogues.
  generate(model, batch, config) -> int32[B, T] token ids   (optional; eval of generation)
  score(model, batch, config) -> float32[B, N] candidate scores   (optional; retrieval eval)
      The batch carries `candidate_ids int32[B, N, R]`, `candidate_mask bool[B, N, R]` as the
      family's `encode_candidates` lays them out.
  decode_text(config, tokenizer, tokens int[N, T]) -> [str] * N   (optional; eval)
      Generated ids -> hypothesis text. Default (`evaluate.decode_texts`): BERT conventions,
      stop at [SEP] / [PAD], WordPiece pieces joined without spaces. Families on an LLM's own
      tokenizer decode with it (byte-level BPE, stop at eos / the chat template's end token).
  encode_candidates(config, tokenizer, texts [N][C]) -> (int32[N, C, R], bool[N, C, R])
      (optional; retrieval eval) Candidate texts in the layout `score` reads, R =
      `config.input.max_response_len`. Default (`evaluate.encode_candidates`): `[CLS] r [SEP]`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

Batch = Mapping[str, jax.Array]
DecodeTextFn = Callable[[ml_collections.ConfigDict, Any, np.ndarray], list[str]]
EncodeCandidatesFn = Callable[
    [ml_collections.ConfigDict, Any, Sequence[Sequence[str]]], tuple[np.ndarray, np.ndarray]
]
BuildFn = Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
LossFn = Callable[[nnx.Module, Batch, nnx.Rngs], tuple[jax.Array, Mapping[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family (see the module docstring for the contract of each field)."""

    name: str
    build: BuildFn
    loss_fn: LossFn
    formatter: str
    frozen_source: Callable[[ml_collections.ConfigDict], str | None] | None = None
    side_tables: Callable[[ml_collections.ConfigDict], Mapping[str, Sequence[Any]]] | None = None
    sources: Callable[[ml_collections.ConfigDict], Mapping[str, Sequence[Any]]] | None = None
    initialize: Callable[[nnx.Module, ml_collections.ConfigDict], None] | None = None
    generate: Callable[..., jax.Array] | None = None
    score: Callable[..., jax.Array] | None = None
    decode_text: DecodeTextFn | None = None
    encode_candidates: EncodeCandidatesFn | None = None

    def data_inputs(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """`input_pipeline.make_datasets` keyword arguments: the side tables and sources."""
        return dict(
            side_tables=self.side_tables(config) if self.side_tables else None,
            sources=self.sources(config) if self.sources else None,
        )


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily, *, override: bool = False) -> ModelFamily:
    """Registers `family` under `family.name` (again only with `override=True`)."""
    if family.name in _FAMILIES and not override:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get(name: str) -> ModelFamily:
    """The family `name`, importing `tiktalk_jax.models.<name>` if it is not registered yet."""
    if name not in _FAMILIES:
        try:
            importlib.import_module(f"tiktalk_jax.models.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tiktalk_jax.models.{name}":
                raise
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; registered: {names()}")
    return _FAMILIES[name]


def names() -> list[str]:
    return sorted(_FAMILIES)
