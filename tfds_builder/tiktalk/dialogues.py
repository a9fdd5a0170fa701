"""Comment trees -> dialogues, and the 5-reference rule of the val/test splits (paper 3.2).

Train: every surviving reply is one example; its context is the chain of its ancestors (level-1
comment first) and its response is the reply. Val/test: a context whose last turn has at least
`num_references` surviving direct replies is one example whose responses are the
`num_references` most-liked replies (ties by id); other contexts are dropped and counted.

A comment is dropped (with its whole subtree, since every reply below it would lose a context
turn) when its text is not UTF-8, has fewer likes than `min_likes`, contains a blocklisted term or
is empty after cleaning. Every drop is recorded in the report with its reason.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from . import cleaning, raw
from .report import Report, text_stats

EVAL_SPLITS = ("val", "test")
# A video (or jsonl dialogue) found in several splits is kept in the first split of this order:
# held-out data must stay held out, and test is the scarcest.
SPLIT_PRIORITY = ("test", "val", "train")


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """The text half of the builder config."""

    min_likes: int = 0
    min_video_likes: int = 0
    max_repeat: int = cleaning.DEFAULT_MAX_REPEAT
    num_references: int = 5
    blocklist: cleaning.Blocklist = dataclasses.field(default_factory=cleaning.Blocklist)


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """One `tiktalk/dialogues` record (see docs/architecture.md for the field contract)."""

    dialogue_id: str
    video_id: str
    title: str
    category: str
    context: tuple[str, ...]
    responses: tuple[str, ...]
    emoticons: tuple[str, ...]

    def to_example(self) -> dict[str, Any]:
        return {
            "dialogue_id": self.dialogue_id,
            "video_id": self.video_id,
            "title": self.title,
            "category": self.category,
            "context": list(self.context),
            "responses": list(self.responses),
            "emoticons": list(self.emoticons),
        }


def id_sort_key(comment_id: str) -> tuple[int, int, str]:
    """Numeric ids compare as numbers (Douyin ids are digit strings), others as strings."""
    if comment_id.isdigit():
        return (0, int(comment_id), "")
    return (1, 0, comment_id)


@dataclasses.dataclass
class _Node:
    comment: raw.RawComment
    parent: str | None
    text: str = ""
    emoticons: tuple[str, ...] = ()


def _thread_nodes(
    video_id: str, comment: raw.RawComment, seen: set[str], split: str, report: Report
) -> dict[str, _Node] | None:
    """The nodes of one level-1 comment's thread, duplicates removed; None if the root is a dup."""
    if comment.id in seen:
        report.skip(split, "duplicate_comment_id", f"{video_id}/{comment.id}")
        for r in comment.replies:
            report.skip(
                split, "ancestor_dropped", f"{video_id}/{r.id}", f"under duplicate {comment.id}"
            )
        return None
    seen.add(comment.id)
    nodes = {comment.id: _Node(comment, parent=None)}
    for r in comment.replies:
        if r.id in seen:
            report.skip(split, "duplicate_comment_id", f"{video_id}/{r.id}")
            continue
        seen.add(r.id)
        # A reply with no reply_to answers the level-1 comment.
        nodes[r.id] = _Node(r, parent=r.reply_to if r.reply_to is not None else comment.id)
    return nodes


def _reachable(root: str, nodes: dict[str, _Node]) -> list[str]:
    """Node ids reachable from the root through reply links, in breadth-first order."""
    children: dict[str, list[str]] = collections.defaultdict(list)
    for nid, node in nodes.items():
        if node.parent is not None:
            children[node.parent].append(nid)
    order, queue = [], collections.deque([root])
    while queue:
        nid = queue.popleft()
        order.append(nid)
        queue.extend(children.get(nid, ()))
    return order


def _on_cycle(nid: str, nodes: dict[str, _Node]) -> bool:
    cur = nodes[nid].parent
    for _ in range(len(nodes)):
        if cur == nid:
            return True
        if cur is None or cur not in nodes:
            return False
        cur = nodes[cur].parent
    return False


def _drop_reason(node: _Node, opts: TextOptions) -> tuple[str | None, str | None]:
    """Applies the per-comment rules; fills node.text/emoticons when it survives."""
    c = node.comment
    if cleaning.has_invalid_unicode(c.text) or cleaning.has_invalid_unicode(c.id):
        return "invalid_utf8", None
    if c.likes < opts.min_likes:
        return "below_likes_threshold", f"{c.likes} < {opts.min_likes}"
    term = opts.blocklist.match(cleaning.strip_mentions(c.text)) if opts.blocklist else None
    if term is not None:
        return "blocklisted", term
    cleaned = cleaning.clean_text(c.text, opts.max_repeat)
    if not cleaned.text:
        return "empty_after_cleaning", None
    node.text, node.emoticons = cleaned.text, cleaned.emoticons
    return None, None


def _context(
    kept: dict[str, _Node], chain: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The cleaned turns of a chain of comment ids, and their emoticons in order."""
    turns = tuple(kept[i].text for i in chain)
    return turns, tuple(e for i in chain for e in kept[i].emoticons)


def video_dialogues(
    video: raw.RawVideo, split: str, opts: TextOptions, report: Report
) -> list[Dialogue]:
    """All dialogues of one video in `split`; every comment left out is reported."""
    vid = video.video_id
    if opts.min_video_likes and video.likes is not None and video.likes < opts.min_video_likes:
        report.skip(
            split, "below_video_likes_threshold", vid, f"{video.likes} < {opts.min_video_likes}"
        )
        return []
    title = cleaning.clean_text(video.title, opts.max_repeat).text
    is_eval = split in EVAL_SPLITS and opts.num_references > 0
    seen: set[str] = set()
    dialogues: list[Dialogue] = []
    num_replies = 0
    for comment in video.comments:
        nodes = _thread_nodes(vid, comment, seen, split, report)
        if nodes is None:
            continue
        order = _reachable(comment.id, nodes)
        reachable = set(order)
        for nid, node in nodes.items():
            if nid in reachable:
                continue
            if node.parent not in nodes:
                report.skip(split, "unknown_reply_to", f"{vid}/{nid}", f"reply_to={node.parent}")
            elif _on_cycle(nid, nodes):
                report.skip(split, "reply_cycle", f"{vid}/{nid}", f"reply_to={node.parent}")
            else:
                report.skip(split, "ancestor_dropped", f"{vid}/{nid}", f"reply_to={node.parent}")

        kept: dict[str, _Node] = {}
        kids: dict[str, list[_Node]] = collections.defaultdict(list)
        chains: dict[str, tuple[str, ...]] = {}
        for nid in order:
            node = nodes[nid]
            if node.parent is not None and node.parent not in kept:
                report.skip(split, "ancestor_dropped", f"{vid}/{nid}", f"reply_to={node.parent}")
                continue
            reason, detail = _drop_reason(node, opts)
            if reason is not None:
                report.skip(split, reason, f"{vid}/{nid}", detail)
                continue
            kept[nid] = node
            chains[nid] = (chains[node.parent] if node.parent is not None else ()) + (nid,)
            if node.parent is not None:
                kids[node.parent].append(node)
                num_replies += 1

        for nid in kept:  # breadth-first order: level-1 first, deterministic
            if is_eval:
                replies = kids.get(nid, [])
                if not replies:
                    continue
                if len(replies) < opts.num_references:
                    report.skip(
                        split, "too_few_references", f"{vid}/{nid}", f"{len(replies)} replies"
                    )
                    continue
                refs = sorted(replies, key=lambda n: (-n.comment.likes, id_sort_key(n.comment.id)))
                refs = refs[: opts.num_references]
                turns, emoticons = _context(kept, chains[nid])
                dialogues.append(
                    Dialogue(
                        dialogue_id=f"{vid}/{nid}",
                        video_id=vid,
                        title=title,
                        category=video.category,
                        context=turns,
                        responses=tuple(r.text for r in refs),
                        emoticons=emoticons + tuple(e for r in refs for e in r.emoticons),
                    )
                )
            elif kept[nid].parent is not None:
                node = kept[nid]
                turns, emoticons = _context(kept, chains[node.parent])
                dialogues.append(
                    Dialogue(
                        dialogue_id=f"{vid}/{nid}",
                        video_id=vid,
                        title=title,
                        category=video.category,
                        context=turns,
                        responses=(node.text,),
                        emoticons=emoticons + node.emoticons,
                    )
                )
    if num_replies == 0:
        report.skip(split, "no_replies", vid)
    elif not dialogues:
        report.skip(split, "no_dialogues", vid)
    return dialogues


def jsonl_dialogues(
    records: list[raw.RawDialogue], split: str, opts: TextOptions, report: Report
) -> list[Dialogue]:
    """Cleans pre-split dialogues; the same rules as the json layout, per turn.

    A context turn that is blocklisted or empty after cleaning drops the dialogue; a response
    that is drops only that response (id `<dialogue_id>#response<i>`). Val/test keep the first
    `num_references` surviving responses (the file's order is taken as most-liked first) and drop
    dialogues with fewer. A train line with several responses becomes one example per response,
    with ids `<dialogue_id>#<i>`.
    """
    is_eval = split in EVAL_SPLITS and opts.num_references > 0
    out: list[Dialogue] = []
    for rec in records:
        did = rec.dialogue_id
        context: list[str] = []
        emoticons: list[str] = []
        dropped = False
        for i, turn in enumerate(rec.context):
            term = opts.blocklist.match(cleaning.strip_mentions(turn)) if opts.blocklist else None
            cleaned = cleaning.clean_text(turn, opts.max_repeat)
            if term is not None or not cleaned.text:
                reason = "blocklisted" if term is not None else "empty_after_cleaning"
                report.skip(split, reason, did, term if term is not None else f"context turn {i}")
                dropped = True
                break
            context.append(cleaned.text)
            emoticons.extend(cleaned.emoticons)
        if dropped:
            continue
        responses: list[cleaning.Cleaned] = []
        for j, turn in enumerate(rec.responses):
            term = opts.blocklist.match(cleaning.strip_mentions(turn)) if opts.blocklist else None
            cleaned = cleaning.clean_text(turn, opts.max_repeat)
            if term is not None:
                report.skip(split, "blocklisted", f"{did}#response{j}", term)
            elif not cleaned.text:
                report.skip(split, "empty_after_cleaning", f"{did}#response{j}")
            else:
                responses.append(cleaned)
        if not responses:
            report.skip(split, "no_replies", did)
            continue
        title = cleaning.clean_text(rec.title, opts.max_repeat).text
        common = dict(video_id=rec.video_id, title=title, category=rec.category)
        if is_eval:
            if len(responses) < opts.num_references:
                report.skip(split, "too_few_references", did, f"{len(responses)} responses")
                continue
            refs = responses[: opts.num_references]
            out.append(
                Dialogue(
                    dialogue_id=did,
                    context=tuple(context),
                    responses=tuple(r.text for r in refs),
                    emoticons=tuple(emoticons) + tuple(e for r in refs for e in r.emoticons),
                    **common,
                )
            )
        else:
            for j, r in enumerate(responses):
                out.append(
                    Dialogue(
                        dialogue_id=did if len(responses) == 1 else f"{did}#{j}",
                        context=tuple(context),
                        responses=(r.text,),
                        emoticons=tuple(emoticons) + r.emoticons,
                        **common,
                    )
                )
    return out


def prepare(layout: raw.Layout, opts: TextOptions, report: Report) -> dict[str, list[Dialogue]]:
    """Reads every split of the release and returns its dialogues, split -> list.

    Splits are read in SPLIT_PRIORITY order so a video id (or jsonl dialogue_id) present in
    several splits stays in the held-out one; the other copies are reported as duplicates.
    """
    video_owner: dict[str, str] = {}
    dialogue_owner: dict[str, str] = {}
    out: dict[str, list[Dialogue]] = {}
    for split in SPLIT_PRIORITY:
        if split not in layout.split_files:
            continue
        path, fmt = layout.split_files[split], layout.formats[split]
        report.layout[split] = fmt
        if fmt == "json":
            dialogues: list[Dialogue] = []
            for video in raw.read_split_json(path, split, report):
                owner = video_owner.setdefault(video.video_id, split)
                if owner != split:
                    report.skip(split, "duplicate_video_id", video.video_id, f"kept in {owner}")
                    continue
                dialogues.extend(video_dialogues(video, split, opts, report))
        else:
            records, seen = [], set()
            for rec in raw.read_split_jsonl(path, split, report):
                owner = dialogue_owner.setdefault(rec.dialogue_id, split)
                if owner != split or rec.dialogue_id in seen:
                    report.skip(split, "duplicate_dialogue_id", rec.dialogue_id, f"kept in {owner}")
                    continue
                seen.add(rec.dialogue_id)
                video_split = video_owner.setdefault(rec.video_id, split)
                if video_split != split:
                    report.skip(split, "duplicate_video_id", rec.video_id, f"kept in {video_split}")
                    continue
                records.append(rec)
            dialogues = jsonl_dialogues(records, split, opts, report)
        out[split] = dialogues
        report.set_stats(split, text_stats(dialogues))
    return {s: out[s] for s in raw.SPLITS if s in out}
