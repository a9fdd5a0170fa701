"""Text cleaning rules for TikTalk comments and titles (paper section 3.2).

The paper names the rules but not their exact regular expressions; the choices made here are
documented in README.md ("Cleaning decisions"). `clean_text` is a pure function so every rule can
be tested on its own; the builder applies it to titles, comments and pre-split jsonl turns alike.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

# Douyin inserts mentions as "@nickname" followed by a space; a nickname never contains
# whitespace, another "@", or the punctuation that ends a clause. Both ASCII and full-width "@".
# An optional leading "回复" ("reply") belongs to the mention: "回复 @小明: 好的" -> "好的".
# An "@" right after a Latin letter or digit is an e-mail address, not a mention.
_MENTION = re.compile(
    r"(?:回复\s*)?(?<![A-Za-z0-9._%+-])[@＠][^\s@＠，。！？、,.!?:：;；\[\]【】()（）]+\s*[:：]?",
)

# Douyin's emoticon codes are a short word in square brackets: [捂脸], [666], [比心], [emm].
# Unicode emoji: the pictographic blocks, dingbats and misc symbols, plus the modifiers that glue
# a sequence into one glyph (ZWJ, variation selector 16, skin tones, keycap, tag characters).
_EMOJI_BASE = (
    "\U0001f000-\U0001faff"  # mahjong .. symbols & pictographs extended-A (incl. flags, tones)
    "\u2600-\u27bf"  # misc symbols, dingbats
    "\u2300-\u23ff"  # misc technical (watch, hourglass, ...)
    "\u2b00-\u2bff"  # arrows & stars (⭐ ⬛)
    "\u3030\u303d\u3297\u3299"  # CJK-block emoji (wavy dash, circled ideographs)
)
_EMOJI_MOD = "\ufe0f\ufe0e\u20e3\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f"
# One alternation keeps bracket codes and emoji in their order of appearance. Bracket codes come
# first: their inner text never holds emoji, but "[" must not be left behind.
_EMOTICON = re.compile(
    r"\[[\u4e00-\u9fffA-Za-z0-9]{1,6}\]"  # Douyin codes
    r"|[0-9#*]\ufe0f?\u20e3"  # keycaps
    r"|[\U0001f1e6-\U0001f1ff]{2}"  # regional-indicator flags
    rf"|[{_EMOJI_BASE}][{_EMOJI_MOD}]*(?:\u200d[{_EMOJI_BASE}][{_EMOJI_MOD}]*)*"
)

# Zero-width and bidi marks that survive emoji removal; they are invisible but break matching.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")

_WHITESPACE = re.compile(r"\s+")

# A unit of 1-4 characters repeated more than `max_repeat` times ("哈哈哈哈哈", "2333333",
# "hahahaha", "啊啊啊啊"). The lazy unit makes the shortest period win, so "哈哈哈哈" is unit "哈".
_REPEAT = re.compile(r"(.{1,4}?)\1+", re.DOTALL)

DEFAULT_MAX_REPEAT = 3


@dataclasses.dataclass(frozen=True)
class Cleaned:
    """A cleaned utterance: plain `text` and the emoticons removed from it, in order."""

    text: str
    emoticons: tuple[str, ...]


def has_invalid_unicode(text: str) -> bool:
    """True when `text` holds lone surrogates, i.e. bytes that were not valid UTF-8.

    Both raw layouts are decoded with `surrogateescape`, and JSON escapes like "\\udc80" also
    produce lone surrogates, so this one test covers every way non-UTF-8 text can arrive.
    """
    return any("\ud800" <= c <= "\udfff" for c in text)


def strip_mentions(text: str) -> str:
    """Removes "@nickname" mentions (and a "回复 @nickname:" reply prefix)."""
    return _MENTION.sub("", text)


def extract_emoticons(text: str) -> Cleaned:
    """Moves Douyin bracket codes and Unicode emoji out of `text`, in order of appearance.

    They are replaced by nothing (not a space): "哈哈[捂脸]哈哈" must become one laughter run.
    """
    found: list[str] = []

    def _take(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return ""

    text = _EMOTICON.sub(_take, text)
    return Cleaned(text=text, emoticons=tuple(found))


def collapse_repeats(text: str, max_repeat: int = DEFAULT_MAX_REPEAT) -> str:
    """Collapses a unit repeated more than `max_repeat` times to exactly `max_repeat` repeats.

    "哈哈哈哈哈哈" -> "哈哈哈", "2333333" -> "2333", "hahahaha" -> "hahaha". Units made only of
    digits that contain "0" are left alone so amounts like "1000000" keep their meaning, and
    whitespace runs are handled by whitespace normalisation instead.
    """

    def _collapse(match: re.Match[str]) -> str:
        unit, run = match.group(1), match.group(0)
        if len(run) // len(unit) <= max_repeat or unit.isspace():
            return run
        if unit.isdigit() and "0" in unit:
            return run
        return unit * max_repeat

    return _REPEAT.sub(_collapse, text)


def normalize_whitespace(text: str) -> str:
    """Drops invisible marks and control characters, collapses whitespace runs, strips ends."""
    text = _INVISIBLE.sub("", text)
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    return _WHITESPACE.sub(" ", text).strip()


def clean_text(text: str, max_repeat: int = DEFAULT_MAX_REPEAT) -> Cleaned:
    """Applies every rule in order: mentions, emoticons, invisible chars, repeats, whitespace.

    Emoticons are removed before collapsing repeats so "哈哈[捂脸]哈哈哈" becomes one run.
    """
    text = strip_mentions(text)
    extracted = extract_emoticons(text)
    text = normalize_whitespace(extracted.text)
    text = collapse_repeats(text, max_repeat)
    return Cleaned(text=text, emoticons=extracted.emoticons)


class Blocklist:
    """Terms from `<manual_dir>/blocklist.txt`; a comment containing any of them is dropped.

    Matching is a case-insensitive substring test on the text with @mentions removed (callers
    pass `strip_mentions(raw)`), so a nickname never drops a comment but an emoticon code can.
    """

    def __init__(self, terms: list[str] | tuple[str, ...] = ()):
        self.terms = tuple(sorted({t.strip().casefold() for t in terms if t.strip()}))

    @classmethod
    def from_text(cls, text: str) -> Blocklist:
        """One term per line; blank lines are ignored."""
        return cls(text.splitlines())

    def __bool__(self) -> bool:
        return bool(self.terms)

    def match(self, text: str) -> str | None:
        """The first blocked term found in `text`, or None."""
        folded = text.casefold()
        for term in self.terms:
            if term in folded:
                return term
        return None
