"""The raw release on disk: the manual_dir layout check and readers of both raw layouts.

Layout (README.md has the full description):

    <manual_dir>/train.json, val.json, test.json    split json, keyed by video id (any subset)
    <manual_dir>/<split>.jsonl                       or pre-split dialogues, one per line
    <manual_dir>/videos/<video_id>.mp4               needed by the `media` config only
    <manual_dir>/knowledge.tsv, blocklist.txt        optional

The readers never raise on bad content: they record the problem in a `report.Report` and go on
with the next record. Types are checked here so that later stages can trust them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

from . import cleaning
from .report import Report

SPLITS = ("train", "val", "test")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".flv", ".avi")
KNOWLEDGE_NAME = "knowledge.tsv"
BLOCKLIST_NAME = "blocklist.txt"
VIDEOS_NAME = "videos"

# Names people commonly use for the same split.
_SPLIT_ALIASES = {
    "training": "train",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "eval": "val",
    "testing": "test",
}
_ARCHIVE_SUFFIXES = (".gz", ".zip", ".bz2", ".xz", ".tar", ".tgz", ".7z", ".rar", ".zst")
_EXPECTED_LAYOUT = """\
expected layout:
  <manual_dir>/train.json, val.json, test.json   (any subset; or <split>.jsonl)
  <manual_dir>/videos/<video_id>.mp4             (media config only)
  <manual_dir>/knowledge.tsv, blocklist.txt      (optional)"""


class LayoutError(ValueError):
    """The manual_dir does not hold a TikTalk release in the documented layout."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What `check_layout` found: the split files (and their format), videos and extras."""

    manual_dir: pathlib.Path
    split_files: dict[str, pathlib.Path]
    formats: dict[str, str]  # split -> "json" | "jsonl"
    videos_dir: pathlib.Path | None
    knowledge: pathlib.Path | None
    blocklist: pathlib.Path | None


def _entries(directory: pathlib.Path) -> list[pathlib.Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _describe(paths: list[pathlib.Path], limit: int = 20) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    if not names:
        return "(nothing: the directory is empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _canonical_name(name: str) -> str | None:
    """The documented name an entry was probably meant to have, or None if it is unrelated."""
    lower = name.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return None
    stem, dot, ext = lower.partition(".")
    stem = _SPLIT_ALIASES.get(stem, stem)
    candidate = f"{stem}{dot}{ext}"
    known = {f"{s}.json" for s in SPLITS} | {f"{s}.jsonl" for s in SPLITS}
    known |= {VIDEOS_NAME, KNOWLEDGE_NAME, BLOCKLIST_NAME, "video"}
    if candidate in known:
        return VIDEOS_NAME if candidate == "video" else candidate
    return None


def _has_split_files(directory: pathlib.Path) -> bool:
    return any((directory / f"{s}.{e}").is_file() for s in SPLITS for e in ("json", "jsonl"))


def check_layout(manual_dir: str | pathlib.Path, need_videos: bool) -> Layout:
    """Checks the manual_dir before any work and says exactly what is wrong.

    Args:
      manual_dir: the directory given as `--manual_dir` / `DownloadConfig(manual_dir=...)`.
      need_videos: whether `videos/` is required (the `media` config).

    Returns:
      The `Layout` found.

    Raises:
      LayoutError: listing every missing or misnamed entry, what was found instead, and the
        path to use when the release sits one directory level deeper.
    """
    root = pathlib.Path(manual_dir).expanduser()
    if not root.exists():
        parent = root.parent
        hint = (
            f" Its parent {parent} contains: {_describe(_entries(parent))}."
            if parent.is_dir()
            else ""
        )
        raise LayoutError(f"manual_dir {root} does not exist.{hint}\n{_EXPECTED_LAYOUT}")
    if not root.is_dir():
        raise LayoutError(f"manual_dir {root} is a file, not a directory.\n{_EXPECTED_LAYOUT}")

    entries = _entries(root)
    problems: list[str] = []
    split_files: dict[str, pathlib.Path] = {}
    formats: dict[str, str] = {}
    for split in SPLITS:
        found = [
            root / f"{split}.{e}" for e in ("json", "jsonl") if (root / f"{split}.{e}").is_file()
        ]
        if len(found) == 2:
            problems.append(f"both {split}.json and {split}.jsonl exist: keep one layout per split")
        elif found:
            split_files[split] = found[0]
            formats[split] = found[0].suffix[1:]

    # Misnamed entries: a case or alias variant of a documented name ("Train.json",
    # "train.JSON", "valid.json", "Videos/") is never read, so silently ignoring it would lose
    # data. Compressed split files must be decompressed first.
    videos_misnamed = split_misnamed = False
    for entry in entries:
        canonical = _canonical_name(entry.name)
        if canonical == VIDEOS_NAME and not need_videos:
            continue  # the dialogues config never reads videos
        if canonical and canonical != entry.name and not (root / canonical).exists():
            problems.append(
                f"found {entry.name!r}: rename it to {canonical!r} (names are case-sensitive)"
            )
            videos_misnamed |= canonical == VIDEOS_NAME
            split_misnamed |= canonical.endswith((".json", ".jsonl"))
        lower = entry.name.lower()
        if lower.endswith(_ARCHIVE_SUFFIXES):
            if any(lower.startswith(f"{s}.json") for s in SPLITS):
                problems.append(f"found {entry.name!r}: decompress it into the manual_dir first")
            elif need_videos and lower.startswith(VIDEOS_NAME):
                problems.append(
                    f"found {entry.name!r}: extract it so files are videos/<video_id>.mp4"
                )
                videos_misnamed = True

    nested: list[pathlib.Path] = []
    if not split_files and not split_misnamed:
        nested += [d for d in entries if d.is_dir() and _has_split_files(d)]
        nested += [
            dd
            for d in entries
            if d.is_dir()
            for dd in _entries(d)
            if dd.is_dir() and _has_split_files(dd)
        ]
        if nested:
            problems.append(
                "no split file at the top level, but the release is one level deeper: use "
                + " or ".join(f"--manual_dir={d}" for d in nested[:3])
            )
        else:
            problems.append(
                "no split file found: expected train.json, val.json and/or test.json "
                "(or train.jsonl, val.jsonl, test.jsonl)"
            )

    videos_dir = root / VIDEOS_NAME
    if not videos_dir.is_dir():
        videos_dir_found = None
        if need_videos and not nested:  # a nested release has its videos/ down there too
            loose = [e for e in entries if e.suffix.lower() in VIDEO_EXTENSIONS]
            if loose:
                problems.append(
                    f"videos/ is missing, but {len(loose)} video files sit directly in manual_dir "
                    f"(e.g. {loose[0].name}): move them into {videos_dir}/"
                )
            elif not videos_misnamed:
                problems.append(
                    f"videos/ is missing (the media config needs {videos_dir}/<video_id>.mp4)"
                )
    else:
        videos_dir_found = videos_dir
        if need_videos:
            inner = _entries(videos_dir)
            if not any(e.is_file() for e in inner):
                nested_videos = [
                    d
                    for d in inner
                    if d.is_dir() and any(x.suffix.lower() in VIDEO_EXTENSIONS for x in _entries(d))
                ]
                if nested_videos:
                    problems.append(
                        f"videos/ holds no files but {nested_videos[0].name}/ inside it does: "
                        f"move the files up so they are {videos_dir}/<video_id>.mp4"
                    )
                else:
                    problems.append(f"videos/ is empty: found {_describe(inner)}")

    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise LayoutError(
            f"TikTalk manual_dir check failed for {root}:\n{lines}\n"
            f"found instead: {_describe(entries)}\n{_EXPECTED_LAYOUT}"
        )
    knowledge = root / KNOWLEDGE_NAME
    blocklist = root / BLOCKLIST_NAME
    return Layout(
        manual_dir=root,
        split_files=split_files,
        formats=formats,
        videos_dir=videos_dir_found,
        knowledge=knowledge if knowledge.is_file() else None,
        blocklist=blocklist if blocklist.is_file() else None,
    )


def index_videos(videos_dir: pathlib.Path | None) -> dict[str, pathlib.Path]:
    """Maps video id -> file, listing the directory once (38K stat calls would be slower).

    `.mp4` wins when a video exists under several extensions.
    """
    index: dict[str, pathlib.Path] = {}
    if videos_dir is None:
        return index
    for entry in _entries(videos_dir):
        suffix = entry.suffix.lower()
        if suffix not in VIDEO_EXTENSIONS:
            continue
        stem = entry.name[: -len(entry.suffix)]
        if stem not in index or suffix == ".mp4":
            index[stem] = entry
    return index


# --------------------------------------------------------------------------------------------
# Records. Types are validated here; text is still raw (cleaning happens in dialogues.py).


@dataclasses.dataclass
class RawComment:
    """A level-1 comment (reply_to is None) or a reply in its thread."""

    id: str
    text: str
    likes: int
    reply_to: str | None = None
    replies: list[RawComment] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RawVideo:
    video_id: str
    title: str
    category: str
    likes: int | None
    comments: list[RawComment]


@dataclasses.dataclass
class RawDialogue:
    """One line of a pre-split `<split>.jsonl`."""

    dialogue_id: str
    video_id: str
    title: str
    category: str
    context: list[str]
    responses: list[str]


class Malformed(ValueError):
    """A record is not in the documented schema; the message says which field."""


_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]|^\.\.?$|\.\.")


def video_id_problem(video_id: Any) -> str | None:
    """Why `video_id` cannot name a file under videos/ (None when it is safe)."""
    if not isinstance(video_id, str):
        return f"video id is {type(video_id).__name__}, not a string"
    if not video_id.strip():
        return "empty video id"
    if cleaning.has_invalid_unicode(video_id):
        return "video id is not valid UTF-8"
    if _UNSAFE_ID.search(video_id):
        return f"path separator, '..' or control character in {video_id!r}"
    return None


def _as_id(value: Any, what: str) -> str:
    # Douyin ids are numbers; exporters write them as JSON ints or strings. Both are accepted.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Malformed(f"{what} id is {type(value).__name__}, not a string")
    value = str(value)
    if not value.strip():
        raise Malformed(f"{what} id is empty")
    return value


def _as_likes(value: Any, what: str) -> int:
    if value is None:
        return 0  # missing likes: treated as 0, which the default min_likes keeps
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise Malformed(f"{what} likes is {type(value).__name__}, not a number")
    if value < 0:
        raise Malformed(f"{what} likes is negative ({value})")
    return int(value)


def _as_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Malformed(
            f"{what} text is {type(value).__name__ if value is not None else 'missing'}"
        )
    return value


def parse_comment(obj: Any, level1: bool) -> RawComment:
    """Validates one comment (with its replies when `level1`); raises Malformed."""
    what = "comment" if level1 else "reply"
    if not isinstance(obj, dict):
        raise Malformed(f"{what} is {type(obj).__name__}, not an object")
    cid = _as_id(obj.get("id"), what)
    comment = RawComment(
        id=cid, text=_as_text(obj.get("text"), what), likes=_as_likes(obj.get("likes"), what)
    )
    if level1:
        replies = obj.get("replies")
        if replies is not None and not isinstance(replies, list):
            raise Malformed(f"replies of comment {cid} is {type(replies).__name__}, not a list")
        comment.replies = replies or []  # validated one by one by the caller
    else:
        reply_to = obj.get("reply_to")
        comment.reply_to = None if reply_to is None else _as_id(reply_to, "reply_to")
    return comment


def parse_video(video_id: str, obj: Any, split: str, report: Report) -> RawVideo | None:
    """Validates one video record; bad comments are reported and left out, not the video."""
    if not isinstance(obj, dict):
        report.skip(split, "malformed_record", video_id, f"video record is {type(obj).__name__}")
        return None
    comments_raw = obj.get("comments")
    if comments_raw is None:
        comments_raw = []
    if not isinstance(comments_raw, list):
        report.skip(split, "malformed_record", video_id, "comments is not a list")
        return None
    title = obj.get("title")
    if not isinstance(title, str) or cleaning.has_invalid_unicode(title):
        report.note(split, "invalid_title", video_id)
        title = ""
    category = obj.get("category")
    category = (
        category if isinstance(category, str) and not cleaning.has_invalid_unicode(category) else ""
    )
    try:
        likes = None if obj.get("likes") is None else _as_likes(obj.get("likes"), "video")
    except Malformed:
        likes = None  # an unusable video likes count only disables the video threshold
    comments = []
    for i, c in enumerate(comments_raw):
        try:
            comment = parse_comment(c, level1=True)
        except Malformed as e:
            n = len(c.get("replies") or []) if isinstance(c, dict) else 0
            detail = f"{e} (its thread of {n} replies is dropped with it)" if n else str(e)
            report.skip(split, "malformed_record", f"{video_id}/{_guess_id(c, i)}", detail)
            continue
        replies = []
        for j, r in enumerate(comment.replies):
            try:
                replies.append(parse_comment(r, level1=False))
            except Malformed as e:
                report.skip(
                    split, "malformed_record", f"{video_id}/{_guess_id(r, j, comment.id)}", str(e)
                )
        comment.replies = replies
        comments.append(comment)
    return RawVideo(
        video_id=video_id, title=title, category=category, likes=likes, comments=comments
    )


def _guess_id(obj: Any, index: int, parent: str | None = None) -> str:
    """A printable id for a malformed record: its own id if usable, else its position."""
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("id"), (str, int))
        and str(obj.get("id")).strip()
    ):
        return str(obj["id"])
    return f"{parent}/#{index}" if parent else f"#{index}"


def _read_text(path: pathlib.Path) -> str:
    # surrogateescape keeps invalid bytes as lone surrogates: the record holding them is dropped
    # (cleaning.has_invalid_unicode), every other record in the file survives.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def iter_json_object(text: str) -> Iterator[tuple[str, Any]]:
    """Yields the (key, value) pairs of a top-level JSON object one at a time.

    Unlike `json.loads`, this keeps duplicate keys (so they can be reported) and lets the caller
    keep every pair parsed before a truncation or syntax error. Raises ValueError with the
    character offset of the first error.
    """
    pos = _WS.match(text, 0).end()
    if text[pos : pos + 1] != "{":
        raise ValueError(
            f"offset {pos}: the file is not a JSON object (starts with {text[pos : pos + 1]!r})"
        )
    pos = _WS.match(text, pos + 1).end()
    if text[pos : pos + 1] == "}":
        return
    while True:
        if text[pos : pos + 1] != '"':
            raise ValueError(f"offset {pos}: expected a video id string")
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, pos).end()
        if text[pos : pos + 1] != ":":
            raise ValueError(f"offset {pos}: expected ':' after key {key!r}")
        pos = _WS.match(text, pos + 1).end()
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"offset {e.pos}: {e.msg} in the record of {key!r}") from None
        yield key, value
        pos = _WS.match(text, pos).end()
        sep = text[pos : pos + 1]
        if sep == "}":
            return
        if sep != ",":
            raise ValueError(f"offset {pos}: expected ',' or '}}' after the record of {key!r}")
        pos = _WS.match(text, pos + 1).end()


def read_split_json(path: pathlib.Path, split: str, report: Report) -> list[RawVideo]:
    """Reads `<split>.json`; duplicate keys and unsafe ids are reported, first occurrence wins."""
    try:
        text = _read_text(path)
    except OSError as e:
        report.skip(split, "unreadable_file", path.name, str(e))
        return []
    videos: list[RawVideo] = []
    seen: set[str] = set()
    try:
        for video_id, obj in iter_json_object(text):
            problem = video_id_problem(video_id)
            if problem:
                report.skip(split, "unsafe_video_id", video_id, problem)
                continue
            if video_id in seen:
                report.skip(split, "duplicate_video_id", video_id, f"repeated in {path.name}")
                continue
            seen.add(video_id)
            video = parse_video(video_id, obj, split, report)
            if video is not None:
                videos.append(video)
    except ValueError as e:
        reason = "truncated_file" if videos else "unreadable_file"
        report.skip(split, reason, path.name, f"{e}; {len(videos)} videos read before it")
    return videos


def _parse_dialogue(obj: Any) -> RawDialogue:
    if not isinstance(obj, dict):
        raise Malformed(f"line is a JSON {type(obj).__name__}, not an object")
    did = _as_id(obj.get("dialogue_id"), "dialogue")
    video_id = obj.get("video_id")
    if isinstance(video_id, int) and not isinstance(video_id, bool):
        video_id = str(video_id)
    if not isinstance(video_id, str):
        raise Malformed(f"video_id is {type(video_id).__name__}, not a string")
    lists = {}
    for field in ("context", "responses"):
        value = obj.get(field)
        if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
            raise Malformed(f"{field} must be a non-empty list of strings")
        lists[field] = value
    title = obj.get("title")
    category = obj.get("category")
    return RawDialogue(
        dialogue_id=did,
        video_id=video_id,
        title=title if isinstance(title, str) else "",
        category=category if isinstance(category, str) else "",
        context=lists["context"],
        responses=lists["responses"],
    )


def read_split_jsonl(path: pathlib.Path, split: str, report: Report) -> list[RawDialogue]:
    """Reads `<split>.jsonl`: one dialogue per line; bad lines are reported and skipped.

    Ids of lines that cannot be parsed are `<file>:<line number>`.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        report.skip(split, "unreadable_file", path.name, str(e))
        return []
    out: list[RawDialogue] = []
    for lineno, raw_line in enumerate(data.splitlines(), start=1):
        line = raw_line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff").strip()
        if not line:
            continue
        where = f"{path.name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.skip(split, "malformed_record", where, f"not JSON: {e.msg} at column {e.colno}")
            continue
        try:
            dialogue = _parse_dialogue(obj)
        except Malformed as e:
            report.skip(split, "malformed_record", where, str(e))
            continue
        problem = video_id_problem(dialogue.video_id)
        if problem:
            report.skip(split, "unsafe_video_id", dialogue.dialogue_id, problem)
            continue
        if cleaning.has_invalid_unicode(dialogue.title):
            report.note(split, "invalid_title", dialogue.dialogue_id)
            dialogue.title = ""
        if cleaning.has_invalid_unicode(dialogue.category):
            dialogue.category = ""  # as in the json layout: an unusable category is just absent
        texts = [dialogue.dialogue_id, *dialogue.context, *dialogue.responses]
        if any(cleaning.has_invalid_unicode(t) for t in texts):
            bad_id = dialogue.dialogue_id
            if cleaning.has_invalid_unicode(bad_id):
                bad_id = where
            report.skip(split, "invalid_utf8", bad_id, where)
            continue
        out.append(dialogue)
    return out


def read_blocklist(path: pathlib.Path | None) -> cleaning.Blocklist:
    """The blocklist file (one term per line), or an empty blocklist when absent."""
    if path is None:
        return cleaning.Blocklist()
    return cleaning.Blocklist.from_text(path.read_bytes().decode("utf-8", errors="replace"))
