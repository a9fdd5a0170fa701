"""The bad-input report: what each build skipped and why, plus dataset statistics.

Every stage that drops something calls `Report.skip(split, reason, id)`; things kept but worth
knowing (a video without an audio track) go to `Report.note`. The builder writes the report as
`<data_dir>/tiktalk/<config>/<version>/build_report.json` and logs `format_report` of it.

JSON schema (all counts are ints, all ids strings):

    {"dataset": "tiktalk", "config": str, "version": str, "manual_dir": str,
     "layout": {split: "json" | "jsonl"}, "options": {name: value},
     "splits": {split: {"skipped": {reason: {"count": int, "ids": [id], "details": {id: str}}},
                        "notes":   {reason: {... same ...}},
                        "stats":   {"videos", "dialogues", "turns", "avg_turns_per_dialogue",
                                    "avg_utterance_chars", media only: "frames",
                                    "avg_frames_per_video", "videos_without_audio",
                                    "avg_duration_s", "audio_hours"}}},
     "totals": {"skipped": {reason: count}, "notes": {reason: count}, "stats": {... summed ...}},
     "elapsed_s": float, "videos_per_s": float (media only)}

"details" appears only for reasons that carry a message (decoder errors, the blocked term).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

REPORT_NAME = "build_report.json"

# Reason -> one-line meaning, used by `format_report` and README.md. Keep them in sync.
SKIP_REASONS = {
    "unreadable_file": "a split file could not be opened or is not a JSON object at all",
    "truncated_file": "a split json stops being valid JSON here; every video before it was kept",
    "malformed_record": "a record has a missing field or a field of the wrong type",
    "invalid_utf8": "text holds bytes that are not UTF-8 (or lone surrogate escapes)",
    "unsafe_video_id": "empty video id, path separator, '..' or control character",
    "duplicate_video_id": "video id seen before (same split, or a higher-priority split)",
    "duplicate_comment_id": "comment id seen before in the same video",
    "duplicate_dialogue_id": "jsonl dialogue_id seen before",
    "reply_cycle": "reply_to links form a cycle (or a reply answers itself)",
    "unknown_reply_to": "reply_to names no comment of the same thread",
    "ancestor_dropped": "a comment this reply depends on was dropped",
    "empty_after_cleaning": "nothing left after removing mentions, emoticons and whitespace",
    "blocklisted": "contains a term from blocklist.txt",
    "below_likes_threshold": "comment likes below the config's min_likes",
    "below_video_likes_threshold": "video likes below the config's min_video_likes",
    "no_replies": "video has no surviving reply, so no dialogue",
    "too_few_references": "val/test context with fewer than num_references surviving replies",
    "no_dialogues": "val/test video none of whose contexts has enough references",
    "video_missing": "no file videos/<video_id>.mp4",
    "video_empty": "the video file has zero bytes",
    "video_undecodable": "PyAV could not open or decode the file",
    "video_no_frames": "the file has no decodable video frame",
    "video_timeout": "decoding took longer than the config's decode_timeout_s",
    "video_crashed": "the decoding process died (twice, once alone) on this file",
}
NOTE_REASONS = {
    "no_audio_track": "kept with empty audio and has_audio=False",
    "invalid_title": "title missing, not a string or not UTF-8; stored as ''",
    "empty_split": "the split yielded no examples and is left out of the dataset",
}


class Report:
    """Collects skips, notes and statistics per split; serialises to the schema above."""

    def __init__(self, config: str, version: str, manual_dir: str | os.PathLike[str] = ""):
        self.config = config
        self.version = version
        self.manual_dir = str(manual_dir)
        self.layout: dict[str, str] = {}
        self.options: dict[str, Any] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        # split -> kind ("skipped" | "notes") -> reason -> ordered {id: detail or None}
        self._entries: dict[str, dict[str, dict[str, dict[str, str | None]]]] = (
            collections.defaultdict(
                lambda: {
                    "skipped": collections.defaultdict(dict),
                    "notes": collections.defaultdict(dict),
                }
            )
        )

    def skip(self, split: str, reason: str, item_id: str, detail: str | None = None) -> None:
        """Records that `item_id` was dropped from `split` for `reason`."""
        if reason not in SKIP_REASONS:
            raise KeyError(f"unknown skip reason {reason!r}")
        self._entries[split]["skipped"][reason].setdefault(_printable(item_id), _printable(detail))

    def note(self, split: str, reason: str, item_id: str, detail: str | None = None) -> None:
        """Records something kept but worth knowing (e.g. a video without audio)."""
        if reason not in NOTE_REASONS:
            raise KeyError(f"unknown note reason {reason!r}")
        self._entries[split]["notes"][reason].setdefault(_printable(item_id), _printable(detail))

    def ids(self, split: str, reason: str) -> list[str]:
        """Ids skipped (or noted) in `split` for `reason`, in the order they were recorded."""
        kind = "notes" if reason in NOTE_REASONS else "skipped"
        return list(self._entries[split][kind].get(reason, {}))

    def set_stats(self, split: str, stats: Mapping[str, Any]) -> None:
        self.stats.setdefault(split, {}).update(stats)

    def splits(self) -> list[str]:
        return sorted(set(self._entries) | set(self.stats) | set(self.layout), key=_split_order)

    def to_dict(self) -> dict[str, Any]:
        splits: dict[str, Any] = {}
        totals: dict[str, Any] = {"skipped": collections.Counter(), "notes": collections.Counter()}
        for split in self.splits():
            out: dict[str, Any] = {}
            for kind in ("skipped", "notes"):
                out[kind] = {}
                for reason, items in sorted(self._entries[split][kind].items()):
                    entry: dict[str, Any] = {"count": len(items), "ids": list(items)}
                    details = {k: v for k, v in items.items() if v is not None}
                    if details:
                        entry["details"] = details
                    out[kind][reason] = entry
                    totals[kind][reason] += len(items)
            out["stats"] = dict(self.stats.get(split, {}))
            splits[split] = out
        totals = {k: dict(sorted(v.items())) for k, v in totals.items()}
        totals["stats"] = merge_stats([s["stats"] for s in splits.values()])
        return {
            "dataset": "tiktalk",
            "config": self.config,
            "version": self.version,
            "manual_dir": self.manual_dir,
            "layout": dict(sorted(self.layout.items(), key=lambda kv: _split_order(kv[0]))),
            "options": dict(self.options),
            "splits": splits,
            "totals": totals,
            **self.extra,
        }

    def write(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Writes the JSON report to `path` (a file, or a directory to put REPORT_NAME in)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / REPORT_NAME
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), "utf-8")
        return path


def _printable(value: Any) -> Any:
    """Ids and messages as valid UTF-8: bytes that were not UTF-8 (lone surrogates) become
    visible escapes such as "\\udc80", so the report can always be written and read back."""
    if value is None:
        return None
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _split_order(split: str) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "test": 2}
    return (order.get(split, 3), split)


def text_stats(dialogues: Iterable[Any]) -> dict[str, Any]:
    """Paper-style statistics of a list of `dialogues.Dialogue` (or anything with the fields).

    A dialogue has len(context) + 1 turns (its references are alternatives for one turn); the
    utterance length averages every context turn and every reference, in characters.
    """
    videos: set[str] = set()
    n = turns = chars = utterances = 0
    for d in dialogues:
        n += 1
        videos.add(d.video_id)
        turns += len(d.context) + 1
        for u in (*d.context, *d.responses):
            chars += len(u)
            utterances += 1
    return {
        "videos": len(videos),
        "dialogues": n,
        "turns": turns,
        "avg_turns_per_dialogue": round(turns / n, 4) if n else 0.0,
        "avg_utterance_chars": round(chars / utterances, 4) if utterances else 0.0,
        # Kept so merge_stats can recompute the average exactly.
        "utterances": utterances,
        "utterance_chars": chars,
    }


_SUMMED = (
    "videos",
    "dialogues",
    "turns",
    "utterances",
    "utterance_chars",
    "frames",
    "videos_without_audio",
    "audio_hours",
    "duration_s",
    "media_videos",
)


def merge_stats(per_split: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums the additive statistics of several splits and recomputes the averages."""
    out: dict[str, Any] = {}
    for key in _SUMMED:
        values = [s[key] for s in per_split if key in s]
        if values:
            out[key] = round(sum(values), 4) if isinstance(values[0], float) else sum(values)
    if out.get("dialogues"):
        out["avg_turns_per_dialogue"] = round(out["turns"] / out["dialogues"], 4)
    if out.get("utterances"):
        out["avg_utterance_chars"] = round(out["utterance_chars"] / out["utterances"], 4)
    if out.get("media_videos"):
        out["avg_frames_per_video"] = round(out["frames"] / out["media_videos"], 4)
        out["avg_duration_s"] = round(out["duration_s"] / out["media_videos"], 4)
    return out


def report_path(data_dir: str | os.PathLike[str], config: str, version: str | None = None):
    """`<data_dir>/tiktalk/<config>/<version>/build_report.json`; newest version when None."""
    config_dir = pathlib.Path(data_dir).expanduser() / "tiktalk" / config
    if version is None:
        versions = sorted(
            (p for p in config_dir.glob("*.*.*") if (p / REPORT_NAME).exists()),
            key=lambda p: tuple(int(x) if x.isdigit() else -1 for x in p.name.split(".")),
        )
        if not versions:
            raise FileNotFoundError(f"no {REPORT_NAME} under {config_dir}; build the dataset first")
        return versions[-1] / REPORT_NAME
    return config_dir / version / REPORT_NAME


def load_report(data_dir: str | os.PathLike[str], config: str, version: str | None = None):
    """Reads the build report of `config` (dict in the schema of this module's docstring)."""
    return json.loads(report_path(data_dir, config, version).read_text("utf-8"))


def format_report(report: Mapping[str, Any], max_ids: int = 5) -> str:
    """A human summary: statistics and skip counts per split, with a few example ids."""
    lines = [
        f"TikTalk {report.get('config')} {report.get('version')} build report"
        f" (manual_dir={report.get('manual_dir')})"
    ]
    for split, body in report.get("splits", {}).items():
        st = body.get("stats", {})
        line = (
            f"[{split}] videos={st.get('videos', 0)} dialogues={st.get('dialogues', 0)} "
            f"turns={st.get('turns', 0)} avg_turns={st.get('avg_turns_per_dialogue', 0):.2f} "
            f"avg_utt_chars={st.get('avg_utterance_chars', 0):.1f}"
        )
        if "media_videos" in st:
            line += (
                f" media_videos={st['media_videos']}"
                f" avg_frames={st.get('avg_frames_per_video', 0):.1f}"
                f" no_audio={st.get('videos_without_audio', 0)}"
            )
        lines.append(line)
        for kind in ("skipped", "notes"):
            for reason, entry in body.get(kind, {}).items():
                ids = entry.get("ids", [])
                shown = ", ".join(ids[:max_ids]) + (", ..." if len(ids) > max_ids else "")
                label = "skipped" if kind == "skipped" else "note"
                lines.append(f"    {label} {reason}: {entry.get('count', len(ids))} ({shown})")
    totals = report.get("totals", {})
    skipped = totals.get("skipped", {})
    lines.append(
        f"total skipped: {sum(skipped.values())}"
        + (" (" + ", ".join(f"{k}={v}" for k, v in skipped.items()) + ")" if skipped else "")
    )
    if "videos_per_s" in report:
        lines.append(f"media decoding: {report['videos_per_s']:.2f} videos/s")
    return "\n".join(lines)
