"""BLIP-2's caption stage: (video, caption) records that align the Q-Former to a frozen LLM.

Why a caption stage. BLIP-2 never trains its Q-Former on the downstream task from scratch: its
second pre-training stage (vision-to-language generation) first teaches the Q-Former and the
projection to produce prefixes the frozen LLM turns into a caption of the image, with no text
to lean on. TikTalk's LLM is a Chinese decoder, so a public BLIP-2 projection is re-initialised
(blip2.py) and must be aligned again; on the bundled sample there is no public Q-Former at all.
Training only on dialogues does not do it: a text-fine-tuned LLM already predicts most
train replies from the title and context, so the response loss barely rewards reading the
video (docs/blip2_vision.md measures it). The caption stage repeats BLIP-2's second stage on a
captions file, through the shared loop; the dialogue run then starts from its Q-Former
(`config.model.qformer_run`).

Captions file (`config.input.captions_file`): a JSON object `{video_id: caption | [captions]}`
in UTF-8. Captions that are not non-empty strings are dropped and counted; a file that is not
such an object raises with what was found.

Two uses (configs/blip2.py):
  stage=caption      the train and eval splits ARE the caption records (`split_sources`);
  caption_mix=N      the dialogue stage trains on the dialogues plus every train caption record
                     N times (`MixedSource`), as InstructBLIP / LLaVA mix captions into
                     instruction data: the caption loss keeps the queries about the picture
                     while the dialogue loss teaches the frozen LLM's dialogue use of them.
                     Measured on the sample: the dialogue stage alone turns the Q-Former into
                     one soft prompt for every video (docs/blip2_vision.md).

Records, in the dialogue layout the `llm` / `blip2` formatters read, for the videos of a split's
features table that have captions (the split of a video is the split of its features):
  train split   one record per (video, caption): dialogue_id "<video_id>#<i>"
  eval splits   one record per video, its captions as the references: dialogue_id "<video_id>"
  every record  video_id, title "" (the caption must come from the frames), context
                [`config.input.caption_prompt`], responses [captions]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_PROMPT = "视频里有什么？"  # "what is in the video?"


def read_captions(path: str) -> dict[str, list[str]]:
    """`{video_id: [captions]}` from the captions file (see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"captions file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(
            f"captions file {path}: expected a JSON object {{video_id: caption or [captions]}}, "
            f"got {type(raw).__name__}"
        )
    out, dropped = {}, 0
    for video_id, value in raw.items():
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        kept = [v.strip() for v in values if isinstance(v, str) and v.strip()]
        dropped += (len(values) if isinstance(value, list) else 1) - len(kept)
        if kept:
            out[str(video_id)] = kept
    if dropped:
        logging.warning("captions file %s: %d captions dropped (not non-empty strings)", path,
                        dropped)  # fmt: skip
    return out


def caption_records(
    captions: Mapping[str, list[str]],
    video_ids: Iterable[str],
    *,
    train: bool,
    prompt: str = DEFAULT_PROMPT,
) -> list[dict[str, Any]]:
    """The records of the videos `video_ids` that have captions (module docstring), in order."""
    out = []
    for video_id in video_ids:
        texts = captions.get(video_id)
        if not texts:
            continue
        base = dict(video_id=video_id, title="", context=[prompt])
        if train:
            out += [{**base, "dialogue_id": f"{video_id}#{i}", "responses": [t]}
                    for i, t in enumerate(texts)]  # fmt: skip
        else:
            out.append({**base, "dialogue_id": video_id, "responses": list(texts)})
    return out


def split_sources(
    captions: Mapping[str, list[str]],
    split_videos: Mapping[str, list[str]],
    train_split: str,
    prompt: str = DEFAULT_PROMPT,
) -> dict[str, list[dict[str, Any]]]:
    """Split -> caption records, from each split's video ids (its features table's keys).
    Raises when the train split has no captioned video; logs how many videos have none."""
    out = {}
    for split, videos in split_videos.items():
        records = caption_records(captions, videos, train=split == train_split, prompt=prompt)
        with_captions = len({r["video_id"] for r in records})
        logging.info(
            "caption stage %s: %d of %d videos with features have captions (%d records)",
            split, with_captions, len(videos), len(records),
        )  # fmt: skip
        if split == train_split and not records:
            raise ValueError(
                f"no video of the {split!r} features has a caption: the captions file's keys "
                "must be the video ids of the features table"
            )
        out[split] = records
    return out


class MixedSource(Sequence):
    """The dialogues followed by the caption records repeated `repeats` times: one random-access
    source for the train pipeline (which shuffles it)."""

    def __init__(self, dialogues: Sequence[Any], captions: Sequence[dict], repeats: int):
        if repeats < 1:
            raise ValueError(f"caption repeats must be >= 1, got {repeats}")
        self.dialogues, self.captions, self.repeats = dialogues, list(captions), int(repeats)

    def __len__(self) -> int:
        return len(self.dialogues) + self.repeats * len(self.captions)

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < len(self.dialogues):
            return self.dialogues[index]
        return self.captions[(index - len(self.dialogues)) % len(self.captions)]
