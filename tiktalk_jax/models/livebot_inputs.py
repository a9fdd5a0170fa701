"""The `livebot` batch formatter (numpy only): dialogues + frame features -> Livebot's arrays.

Registered with the input pipeline as "livebot" when this module is imported. The frame
features arrive as the "frames" side table (keyed by `video_id`, field `features`:
`float[n, frame_dim]`, one row per sampled frame, e.g.
`features.FeatureTable(dir, split).side_table("frames")`).

Livebot saw the 5 frames nearest the comment's timestamp; TikTalk comments have none, so F
frames are taken evenly over the whole video (in time order; every frame when it has at most F).

Outputs (B examples; lengths from `config.input`, see `input_overrides`):
  frame_feats float32[B, F, frame_dim], frame_mask bool[B, F]
  context_ids int32[B, Lc], context_mask     `[CLS] turn_1 [SEP] ... turn_n [SEP]`, the latest
                                             turns kept (the `dialogue_text` layout; the
                                             original's context was one `BOS words EOS` string)
  response_ids int32[B, Lr], response_mask   `[CLS] response [SEP]`
  eval: references_ids / references_mask (num_references > 0), candidate_ids / candidate_mask
    (num_candidates > 0, from the record's `candidates` texts; see gpt2_inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from tiktalk_jax import input_pipeline as ip
from tiktalk_jax.models import gpt2_inputs

FORMATTER = "livebot"
FRAMES, FEATURES_FIELD = "frames", "features"


def input_overrides(model_config: Any) -> dict[str, int]:
    """The `config.input` fields this formatter reads, from a `livebot.LivebotConfig`."""
    c = model_config
    return dict(
        max_frames=c.max_frames,
        frame_dim=c.frame_dim,
        max_context_len=c.max_context_len,
        max_response_len=c.max_response_len,
    )


def frame_indices(n: int, limit: int) -> np.ndarray:
    """`limit` frame indices spread evenly over `n` frames (all of them when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, limit)).astype(np.int64)


@ip.register_formatter(FORMATTER, batched=True)
class LivebotFormatter:
    """Batched formatter (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool):
        self.f = int(config.max_frames)
        self.frame_dim = int(config.frame_dim)
        if self.f < 1 or self.frame_dim < 1:
            raise ValueError("livebot needs max_frames >= 1 and frame_dim >= 1")
        # The context layout (and its checks) of the generic text formatter.
        self.text = ip.DialogueText(config, tokenizer, train=train)
        self.lc = self.text.max_context_len
        self.slots = gpt2_inputs.TextSlots(config, tokenizer, train=train)
        self.encoder = self.slots.encoder

    def _frames(self, record: ip.Record, out: np.ndarray) -> int:
        if FRAMES not in record:
            raise KeyError(
                f"dialogue {ip.as_text(record.get('dialogue_id', '?'))!r} has no {FRAMES!r} "
                "side record: join the frame features table"
            )
        feats = np.asarray(record[FRAMES][FEATURES_FIELD])
        if feats.size == 0:
            return 0
        if feats.ndim != 2 or feats.shape[1] != self.frame_dim:
            raise ValueError(
                f"frame features have shape {feats.shape}, expected [n, {self.frame_dim}]"
            )
        picked = feats[frame_indices(len(feats), self.f)].astype(np.float32)
        out[: len(picked)] = picked
        return len(picked)

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
            [
                self.text._context(tokens[s : s + n], context[i])
                for i, (s, n) in enumerate(context_spans)
            ]
        )
        frames = np.zeros((b, self.f, self.frame_dim), np.float32)
        n_frames = np.array([self._frames(r, frames[i]) for i, r in enumerate(records)])
        batch = {
            "frame_feats": frames,
            "frame_mask": np.arange(self.f)[None, :] < n_frames[:, None],
            "context_ids": context,
            "context_mask": np.arange(self.lc)[None, :] < lengths[:, None],
        }
        enc = self.encoder
        batch.update(self.slots.responses(tokens, response_spans, enc.cls_id, enc.sep_id))
        return batch
