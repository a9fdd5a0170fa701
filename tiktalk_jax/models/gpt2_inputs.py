"""The `gpt2` batch formatter (numpy only) and the vocabulary a config's tokenizer implies.

Registered with the input pipeline as "gpt2" when this module is imported. A dialogue becomes
GPT-2 chit-chat text, `[CLS] turn_1 [SEP] ... turn_n [SEP] response [SEP]` (the layout of Chinese
GPT-2 chit-chat checkpoints, which use a BERT vocabulary), cut into two fixed-size slots:

  context_ids int32[B, Lc], context_mask     `[CLS] turn_1 [SEP] ... turn_n`, LEFT-padded (the
                                             real tokens end at slot Lc - 1); the most recent
                                             turns are kept (if the latest alone is too long,
                                             its end)
  response_ids int32[B, Lr], response_mask   `[SEP] response [SEP]` (first response), right-padded;
                                             the leading [SEP] closes the last turn and is the
                                             decoder's start token; a truncated response keeps
                                             its closing [SEP]
  eval, when num_references > 0: references_ids int32[B, R, Lr], references_mask (all-padding
    rows where a record has fewer responses);
  eval, when num_candidates > 0: candidate_ids int32[B, C, Lr], candidate_mask, from the
    record's `candidates` field (C texts, e.g. `metrics.retrieval_candidates`; ground truths
    first), for retrieval scoring.

Lengths come from `config.input`: max_context_len Lc (>= 2), max_response_len Lr (>= 3),
num_references, num_candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib

FORMATTER = "gpt2"
CANDIDATES = "candidates"


class VocabSpec(NamedTuple):
    """Vocabulary size and the special ids a model family needs (from the config's tokenizer)."""

    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """`{pad_id, cls_id, sep_id}` of a (fast) BERT tokenizer (`tokenizer.special_ids`)."""
    return tokenizer_lib.special_ids(tokenizer).require("pad_id", "cls_id", "sep_id")


def vocab_spec(config: ml_collections.ConfigDict) -> VocabSpec:
    """The vocabulary the pipeline tokenizes `config`'s data with
    (`tokenizer.config_special_ids`: `config.input.tokenizer`, else the vocab.txt trained for
    the data, else the trained vocabulary's conventions). Ids set in
    `config.model.{pad_id, cls_id, sep_id}` win."""
    ids = tokenizer_lib.config_special_ids(config.input)
    spec = VocabSpec(ids.vocab_size, **ids.require("pad_id", "cls_id", "sep_id"))
    # Only the ids: `config.model.vocab_size` is the model's table, which may be larger.
    given = {k: config.model.get(k) for k in ("pad_id", "cls_id", "sep_id")}
    return spec._replace(**{k: int(v) for k, v in given.items() if v is not None})


class TextSlots:
    """Shared token bookkeeping of dialogue formatters: encode a batch's texts in one call and
    lay out responses / references / candidates as `start tokens end` in Lr slots."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool):
        self.lr = int(config.max_response_len)
        self.num_references = 0 if train else int(config.get("num_references", 0))
        self.num_candidates = 0 if train else int(config.get("num_candidates", 0))
        self.encoder = ip._Encoder(tokenizer)

    def texts(self, record: ip.Record) -> tuple[list[str], list[str], list[str]]:
        """(turns, responses, candidates) of a record as strings."""
        turns = [ip.as_text(t) for t in record["context"]]
        n_refs = max(self.num_references, 1)
        responses = [ip.as_text(t) for t in list(record["responses"])[:n_refs]]
        candidates = []
        if self.num_candidates:
            if CANDIDATES not in record:
                raise KeyError(
                    f"dialogue {ip.as_text(record.get('dialogue_id', '?'))!r} has no "
                    f"{CANDIDATES!r} field: add candidates or set num_candidates=0"
                )
            candidates = [ip.as_text(t) for t in record[CANDIDATES]]
            if len(candidates) != self.num_candidates:
                raise ValueError(
                    f"dialogue {ip.as_text(record.get('dialogue_id', '?'))!r} has "
                    f"{len(candidates)} candidates, num_candidates={self.num_candidates}"
                )
        return turns, responses, candidates

    def span(self, tokens: list[int], start: int, end: int, out: np.ndarray) -> int:
        """Writes `start tokens[:Lr - 2] end` into `out[:n]`; returns n."""
        ids = [start, *tokens[: self.lr - 2], end]
        out[: len(ids)] = ids
        return len(ids)

    def responses(
        self, tokens: list[list[int]], spans: list[tuple[int, int, int]], start: int, end: int
    ) -> dict[str, np.ndarray]:
        """`spans[i] = (first, n_responses, n_candidates)` into `tokens` -> response_ids/_mask
        (+ references_* / candidate_* when configured)."""
        b, pad = len(spans), self.encoder.pad_id
        n_refs, n_cand = max(self.num_references, 1), self.num_candidates
        refs = np.full((b, n_refs, self.lr), pad, np.int32)
        refs_len = np.zeros((b, n_refs), np.int32)
        cands = np.full((b, n_cand, self.lr), pad, np.int32)
        cands_len = np.zeros((b, n_cand), np.int32)
        for i, (first, n_resp, n_c) in enumerate(spans):
            for j in range(n_resp):
                refs_len[i, j] = self.span(tokens[first + j], start, end, refs[i, j])
            for j in range(n_c):
                cands_len[i, j] = self.span(tokens[first + n_resp + j], start, end, cands[i, j])
        refs_mask = np.arange(self.lr) < refs_len[..., None]
        out = {"response_ids": refs[:, 0].copy(), "response_mask": refs_mask[:, 0].copy()}
        if self.num_references:
            out["references_ids"], out["references_mask"] = refs, refs_mask
        if n_cand:
            out["candidate_ids"] = cands
            out["candidate_mask"] = np.arange(self.lr) < cands_len[..., None]
        return out


@ip.register_formatter(FORMATTER, batched=True)
class GPT2Formatter:
    """Batched formatter (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool):
        self.lc = int(config.max_context_len)
        if self.lc < 2 or int(config.max_response_len) < 3:
            raise ValueError("gpt2 needs max_context_len >= 2 and max_response_len >= 3")
        self.slots = TextSlots(config, tokenizer, train=train)
        self.encoder = self.slots.encoder

    def _context(self, turns: list[list[int]], out: np.ndarray) -> int:
        """Writes `[CLS] turns joined by [SEP]` right-aligned into `out`; returns its length."""
        # Each kept turn costs its tokens + one [SEP]; the last turn's [SEP] lives in the
        # response slot, which pays for the [CLS] here.
        budget, kept = self.lc, []
        for turn in reversed(turns):
            if len(turn) + 1 <= budget:
                kept.append(turn)
                budget -= len(turn) + 1
            else:
                if not kept:  # the latest turn alone is too long: keep its end
                    kept.append(turn[len(turn) - (budget - 1) :] if budget > 1 else [])
                break
        ids = [self.encoder.cls_id]
        for turn in reversed(kept):
            ids += [*turn, self.encoder.sep_id]
        ids = ids[:-1] if kept else ids
        out[self.lc - len(ids) :] = ids
        return len(ids)

    def __call__(self, records: Sequence[ip.Record]) -> dict[str, np.ndarray]:
        texts: list[str] = []
        context_spans, response_spans = [], []
        for r in records:
            turns, responses, candidates = self.slots.texts(r)
            context_spans.append((len(texts), len(turns)))
            texts += turns
            response_spans.append((len(texts), len(responses), len(candidates)))
            texts += responses + candidates
        tokens = self.encoder.encode(texts)
        b = len(records)
        context = np.full((b, self.lc), self.encoder.pad_id, np.int32)
        lengths = np.array(
            [self._context(tokens[s : s + n], context[i]) for i, (s, n) in enumerate(context_spans)]
        )
        sep = self.encoder.sep_id
        batch = {
            "context_ids": context,
            "context_mask": np.arange(self.lc)[None, :] >= self.lc - lengths[:, None],
        }
        batch.update(self.slots.responses(tokens, response_spans, sep, sep))
        return batch
