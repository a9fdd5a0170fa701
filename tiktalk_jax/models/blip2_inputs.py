"""The `blip2` batch formatter (numpy only): the `llm` formatter's prompt and response plus the
visual tokens the Q-Former attends to.

Registered with the input pipeline as "blip2" when this module is imported. The text fields are
exactly the `llm` formatter's (llm_inputs.py: a chat-style prompt from the title and the
context, LEFT-padded; the response and its end token, right-padded), so BLIP-2 and the text-only
LLM see the same prompts. The visual tokens come from a vit_g features table (tiktalk_jax.extract)
joined as the "visual" side table by `video_id`; `config.input.visual_field` picks the field:

  img       image_features float[257, Dv]      one stored frame's tokens (BLIP-2_Img)
  video     features float[257, Dv]            the frames' tokens averaged (BLIP-2_Video)
  temporal  frame_features float[K, 257, Dv]   K frames' tokens (extract --frame_tokens=K)

Outputs on top of the `llm` formatter's (F = `visual_frames`, 1 unless temporal; N =
`visual_tokens`, 257 for 224 px ViT-g; Dv = `visual_dim`):
  visual       float[B, F, N, Dv] (`visual_dtype`, default float32)  frames in time order; when a
               record has more than F frames, F spread evenly over them are taken
  visual_mask  bool[B, F]  real frames; all False for a video without features (missing or
               undecodable media: the model then sees the prompt alone)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np

from tiktalk_jax import input_pipeline as ip
from tiktalk_jax.encoders import spread_frames
from tiktalk_jax.models import llm_inputs

FORMATTER = "blip2"
VISUAL = "visual"  # side-table name
VARIANT_FIELDS = {"img": "image_features", "video": "features", "temporal": "frame_features"}


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@ip.register_formatter(FORMATTER, batched=True)
class Blip2Formatter:
    """Batched formatter (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool):
        self.text = llm_inputs.LlmFormatter(config, tokenizer, train=train)
        self.field = str(config.visual_field)
        self.frames = int(config.get("visual_frames", 1))
        self.tokens, self.dim = int(config.visual_tokens), int(config.visual_dim)
        self.dtype = _dtype(str(config.get("visual_dtype", "float32")))
        if min(self.frames, self.tokens, self.dim) < 1:
            raise ValueError("blip2 needs visual_frames, visual_tokens and visual_dim >= 1")

    def _visual(self, record: ip.Record, out: np.ndarray) -> int:
        """Writes the record's frames into `out[F, N, Dv]`; returns how many."""
        if VISUAL not in record:
            raise KeyError(
                f"dialogue {ip.as_text(record.get('dialogue_id', '?'))!r} has no {VISUAL!r} "
                "side record: join the vit_g features table"
            )
        tokens = record[VISUAL].get(self.field)
        if tokens is None or np.size(tokens) == 0:
            return 0
        tokens = np.asarray(tokens)
        if tokens.ndim == 2:  # one frame (img / video)
            tokens = tokens[None]
        if tokens.shape[1:] != (self.tokens, self.dim):
            raise ValueError(
                f"{self.field} has shape {tokens.shape}, expected [frames, {self.tokens}, "
                f"{self.dim}] (config.input.visual_tokens / visual_dim)"
            )
        picked = tokens[spread_frames(len(tokens), self.frames)]
        out[: len(picked)] = picked.astype(self.dtype)
        return len(picked)

    def __call__(self, records: Sequence[ip.Record]) -> dict[str, np.ndarray]:
        batch = self.text(records)
        b = len(records)
        visual = np.zeros((b, self.frames, self.tokens, self.dim), self.dtype)
        n = np.array([self._visual(r, visual[i]) for i, r in enumerate(records)])
        batch["visual"] = visual
        batch["visual_mask"] = np.arange(self.frames)[None, :] < n[:, None]
        return batch
