"""The `maria` batch formatter (numpy only): dialogues + side tables -> Maria's input arrays.

Registered with the input pipeline as "maria" when this module is imported. Side tables (joined
by the pipeline, see `input_pipeline.SideTable`) are read under these record names:

  knowledge  keyed by `dialogue_id`; field `knowledge`: the retrieved C3KG tails, most relevant
             first, as one string joined with ";" (what `tiktalk_jax.knowledge.prepare` writes)
             or as a list of strings (joined here with ";"); "" when nothing was retrieved.
  frames     keyed by `video_id`; field `features`: `float[n, frame_dim]` (one row per frame).
  audio      keyed by `video_id`; field `features`: `float[n, audio_dim]` (one VGGish row per
             0.96 s); zero rows for a video without sound.

Lengths come from `config.input` (set them from the model config with `input_overrides`):
  max_response_len R, max_context_len Lc, max_knowledge_len Lk (0: no knowledge arrays),
  max_frames F (0: no frame arrays), max_audio A (0: no audio arrays), frame_dim, audio_dim.

Outputs (B examples):
  response_ids int32[B, R], response_mask   `[CLS] response [SEP]` (first response; truncated
                                            responses keep their [SEP])
  context_ids int32[B, Lc], context_mask    `turn_1 [SEP] ... turn_n [SEP]`, no [CLS]; the most
                                            recent turns are kept (if the latest alone is too
                                            long, its end)
  knowledge_ids int32[B, Lk], knowledge_mask   `tail_1;tail_2;... [SEP]` (first tokens kept);
                                            all padding when a dialogue has no tails
  frame_feats float32[B, F, frame_dim], frame_mask bool[B, F]    the first F rows
  audio_feats float32[B, A, audio_dim], audio_mask bool[B, A]    the first A rows
  eval, when num_references > 0: references_ids int32[B, refs, R], references_mask.
A formatter configured for a side table fails with a clear error on records that lack it (the
table was not joined), rather than silently feeding zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib

KNOWLEDGE, FRAMES, AUDIO = "knowledge", "frames", "audio"
KNOWLEDGE_FIELD, FEATURES_FIELD = "knowledge", "features"
KNOWLEDGE_SEPARATOR = ";"


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """`{pad_id, cls_id, sep_id, mask_id}` of a tokenizer (MariaConfig fields), from
    `tokenizer.special_ids`."""
    return tokenizer_lib.special_ids(tokenizer).require("pad_id", "cls_id", "sep_id", "mask_id")


def input_overrides(model_config: Any) -> dict[str, int]:
    """The `config.input` fields this formatter reads, from a `maria.MariaConfig`, so the
    arrays have the shapes the model expects (disabled segments get length 0)."""
    c = model_config
    return dict(
        max_response_len=c.max_response_len,
        max_context_len=c.max_context_len,
        max_knowledge_len=c.max_knowledge_len if c.use_knowledge else 0,
        max_frames=c.max_frames if c.use_vision else 0,
        max_audio=c.max_audio if c.use_audio else 0,
        frame_dim=c.frame_dim,
        audio_dim=c.audio_dim,
    )


def _features(record: ip.Record, table: str, limit: int, dim: int, out: np.ndarray) -> int:
    if table not in record:
        raise KeyError(
            f"dialogue {ip.as_text(record.get('dialogue_id', '?'))!r} has no {table!r} side "
            f"record: join the {table} table or set max_{table}=0"
        )
    feats = np.asarray(record[table][FEATURES_FIELD], np.float32)
    if feats.size == 0:
        return 0
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise ValueError(f"{table} features have shape {feats.shape}, expected [n, {dim}]")
    n = min(len(feats), limit)
    out[:n] = feats[:n]
    return n


@ip.register_formatter("maria", batched=True)
class MariaFormatter:
    """Batched formatter (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool):
        self.r = int(config.max_response_len)
        self.lc = int(config.max_context_len)
        self.lk = int(config.get("max_knowledge_len", 0))
        self.f = int(config.get("max_frames", 0))
        self.a = int(config.get("max_audio", 0))
        self.frame_dim = int(config.get("frame_dim", 2048))
        self.audio_dim = int(config.get("audio_dim", 128))
        if self.r < 2 or self.lc < 1 or min(self.lk, self.f, self.a) < 0:
            raise ValueError("need max_response_len >= 2, max_context_len >= 1, others >= 0")
        self.num_references = 0 if train else int(config.get("num_references", 0))
        self.encoder = ip._Encoder(tokenizer)

    def _context(self, turns: list[list[int]], out: np.ndarray) -> int:
        budget, kept = self.lc, []
        for turn in reversed(turns):
            if len(turn) + 1 <= budget:
                kept.append(turn)
                budget -= len(turn) + 1
            else:
                if not kept:  # the latest turn alone is too long: keep its end
                    kept.append(turn[len(turn) - (budget - 1) :] if budget > 1 else [])
                break
        ids = [t for turn in reversed(kept) for t in (*turn, self.encoder.sep_id)]
        out[: len(ids)] = ids
        return len(ids)

    def _response(self, tokens: list[int], out: np.ndarray) -> int:
        ids = [self.encoder.cls_id, *tokens[: self.r - 2], self.encoder.sep_id]
        out[: len(ids)] = ids
        return len(ids)

    def _knowledge(self, tokens: list[int] | None, out: np.ndarray) -> int:
        if not tokens:
            return 0
        ids = [*tokens[: self.lk - 1], self.encoder.sep_id]
        out[: len(ids)] = ids
        return len(ids)

    def __call__(self, records: Sequence[ip.Record]) -> dict[str, np.ndarray]:
        b, n_refs = len(records), max(self.num_references, 1)
        texts: list[str] = []
        spans = []  # per record: (start, turns, responses, has knowledge text)
        for r in records:
            turns = [ip.as_text(t) for t in r["context"]]
            responses = [ip.as_text(t) for t in list(r["responses"])[:n_refs]]
            knowledge = None
            if self.lk:
                if KNOWLEDGE not in r:
                    raise KeyError(
                        f"dialogue {ip.as_text(r.get('dialogue_id', '?'))!r} has no knowledge "
                        "side record: join the knowledge table or set max_knowledge_len=0"
                    )
                value = r[KNOWLEDGE][KNOWLEDGE_FIELD]
                if not isinstance(value, (str, bytes)):
                    value = KNOWLEDGE_SEPARATOR.join(ip.as_text(t) for t in value if t)
                knowledge = ip.as_text(value).strip() or None
            spans.append((len(texts), len(turns), len(responses), knowledge is not None))
            texts += turns + responses + ([knowledge] if knowledge is not None else [])
        tokens = self.encoder.encode(texts)

        pad = self.encoder.pad_id
        context = np.full((b, self.lc), pad, np.int32)
        refs = np.full((b, n_refs, self.r), pad, np.int32)
        context_len = np.zeros((b,), np.int32)
        refs_len = np.zeros((b, n_refs), np.int32)
        knowledge = np.full((b, self.lk), pad, np.int32)
        knowledge_len = np.zeros((b,), np.int32)
        for i, (start, n_turns, n_resp, has_k) in enumerate(spans):
            context_len[i] = self._context(tokens[start : start + n_turns], context[i])
            for j in range(n_resp):
                refs_len[i, j] = self._response(tokens[start + n_turns + j], refs[i, j])
            if has_k:
                knowledge_len[i] = self._knowledge(tokens[start + n_turns + n_resp], knowledge[i])
        refs_mask = np.arange(self.r) < refs_len[..., None]
        batch = {
            "response_ids": refs[:, 0].copy(),
            "response_mask": refs_mask[:, 0].copy(),
            "context_ids": context,
            "context_mask": np.arange(self.lc) < context_len[:, None],
        }
        if self.lk:
            batch["knowledge_ids"] = knowledge
            batch["knowledge_mask"] = np.arange(self.lk) < knowledge_len[:, None]
        for table, limit, dim, name in (
            (FRAMES, self.f, self.frame_dim, "frame"),
            (AUDIO, self.a, self.audio_dim, "audio"),
        ):
            if not limit:
                continue
            feats = np.zeros((b, limit, dim), np.float32)
            lengths = np.array(
                [_features(r, table, limit, dim, feats[i]) for i, r in enumerate(records)]
            )
            batch[f"{name}_feats"] = feats
            batch[f"{name}_mask"] = np.arange(limit) < lengths[:, None]
        if self.num_references:
            batch["references_ids"] = refs
            batch["references_mask"] = refs_mask
        return batch
