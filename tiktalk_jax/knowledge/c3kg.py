"""Reading a C3KG-style knowledge TSV (`head<TAB>relation<TAB>tail`) into tails grouped by head.

    kg = c3kg.read_tsv("knowledge.tsv")            # KnowledgeGraph; kg.report lists skipped rows
    kg.heads[i]                                    # "PersonX 每天跑步"
    kg.tails[i]                                    # {"xAttr": ["自律"], "xWant": [...], ...}
    kg.tails_of(i, families=("xAttr",))            # ["自律"]

Tolerance. The file may or may not start with a header; a header names its columns (`head`,
`relation`, `tail`, in any order, extra columns allowed), without one the first three columns
are head, relation, tail and further columns are ignored (ATOMIC-2020 and some C3KG exports carry
scores or ids there). A bad row is skipped and counted by reason in `kg.report` (with the first
few line numbers), never fatal:

  too_few_columns   fewer fields than the head/relation/tail columns need
  empty_field       head, relation or tail empty after stripping
  none_tail         the tail is ATOMIC's "none" placeholder (also "无", "null", "nan", "_")
  duplicate         the same (head, relation, tail) seen earlier

Relation families. Tails are grouped by FAMILY, the unit the retrieval options select. The twelve
ATOMIC relations C3KG keeps are a family each, named as in ATOMIC. C3KG's four dialogue-flow
relations come under the names its construction code (XiaoMi/C3KG, construct_edge.py) gives the
graph edges, or spelled out; names match case-insensitively, "-" and " " read as "_":

  family           relation names
  event            next_sentence, next_utterance, event, event_flow, 事件流
  concept          next_entity, concept, concept_flow, 概念流
  emotion_cause    emotion_cause, emotion_cause_flow, 情感原因流
  emotion_intent   emotion_intent, emotion_intent_flow, intent_<label> (intent_ask,
                   intent_console, intent_describe, intent_opinion, intent_advise,
                   intent_others), 情感意图流
  xNeed ... HasSubEvent   the ATOMIC relation of that name (xneed, XNEED, x_need are xNeed)
  other            any other relation (e.g. ATOMIC-2020's AtLocation, xReason): kept, counted in
                   `report.unknown_relations`, and selectable as "other" but not in ALL_FAMILIES
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Sequence

FLOW_FAMILIES = ("event", "concept", "emotion_cause", "emotion_intent")
ATOMIC_RELATIONS = (
    "xNeed",
    "xAttr",
    "xReact",
    "xEffect",
    "xWant",
    "xIntent",
    "oEffect",
    "oWant",
    "oReact",
    "isBefore",
    "isAfter",
    "HasSubEvent",
)
# Default family set and the order in which a head's tails are joined into knowledge text.
ALL_FAMILIES = FLOW_FAMILIES + ATOMIC_RELATIONS
OTHER = "other"

_FLOW_ALIASES = {
    "event": ("next_sentence", "next_utterance", "event", "event_flow", "事件流"),
    "concept": ("next_entity", "concept", "concept_flow", "概念流"),
    "emotion_cause": ("emotion_cause", "emotion_cause_flow", "情感原因流"),
    "emotion_intent": ("emotion_intent", "emotion_intent_flow", "情感意图流"),
}
_NONE_TAILS = frozenset({"none", "无", "null", "nan", "_", "___"})
_HEADER_ALIASES = {
    "head": ("head", "head_event", "event", "subject", "src"),
    "relation": ("relation", "rel", "relation_type", "edge", "type"),
    "tail": ("tail", "tail_event", "object", "dst"),
}
_MAX_EXAMPLES = 5  # line numbers kept per bad-row reason


def _norm_name(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _build_family_table() -> dict[str, str]:
    table = {}
    for family, names in _FLOW_ALIASES.items():
        for n in names:
            table[_norm_name(n)] = family
    for rel in ATOMIC_RELATIONS:
        table[_norm_name(rel)] = rel
        # "x_need" / "o_react" spellings.
        table[_norm_name(rel[0] + "_" + rel[1:])] = rel
    return table


_FAMILY_OF = _build_family_table()


def relation_family(relation: str) -> str:
    """The family of a relation name (see the module docstring); OTHER when unknown."""
    key = _norm_name(relation)
    if key in _FAMILY_OF:
        return _FAMILY_OF[key]
    if key.startswith("intent_"):  # C3KG labels emotion-intent edges intent_<dialogue act>
        return "emotion_intent"
    return OTHER


def check_families(families: Iterable[str] | None) -> tuple[str, ...]:
    """Canonical family names from `families` (case-insensitive); None means ALL_FAMILIES."""
    if families is None:
        return ALL_FAMILIES
    canonical = {_norm_name(f): f for f in (*ALL_FAMILIES, OTHER)}
    out = []
    for f in families:
        key = _norm_name(f)
        if key not in canonical:
            raise ValueError(f"unknown relation family {f!r}; choose from {[*ALL_FAMILIES, OTHER]}")
        if canonical[key] not in out:
            out.append(canonical[key])
    if not out:
        raise ValueError("at least one relation family is needed")
    return tuple(out)


@dataclasses.dataclass
class ReadReport:
    """What the reader kept and skipped.

    Attributes:
      rows: data rows read (header excluded).
      kept: rows kept as triples.
      skipped: reason -> count.
      examples: reason -> the first line numbers (1-based) of rows skipped for it.
      unknown_relations: relation name -> count of rows put in the OTHER family.
      header: the header row when the file has one.
    """

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    unknown_relations: dict[str, int] = dataclasses.field(default_factory=dict)
    header: list[str] | None = None

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        lines = self.examples.setdefault(reason, [])
        if len(lines) < _MAX_EXAMPLES:
            lines.append(line)

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.rows} rows kept"]
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"{n} {reason} (lines {self.examples[reason]})")
        if self.unknown_relations:
            top = sorted(self.unknown_relations.items(), key=lambda kv: -kv[1])[:5]
            parts.append(f"relations outside the families: {dict(top)}")
        return "; ".join(parts)


@dataclasses.dataclass
class KnowledgeGraph:
    """Tails grouped by head and relation family.

    Attributes:
      heads: unique heads, in order of first appearance.
      tails: per head, family -> tails in file order (families in order of first appearance).
      sha256: hash of the source bytes (the cache key of head embeddings).
      report: the reader's report.
      source: the file read (or a description).
    """

    heads: list[str]
    tails: list[dict[str, list[str]]]
    sha256: str
    report: ReadReport
    source: str = ""

    def __len__(self) -> int:
        return len(self.heads)

    def num_triples(self) -> int:
        return sum(len(v) for groups in self.tails for v in groups.values())

    def families(self) -> list[str]:
        """Families present, ALL_FAMILIES order first."""
        seen = {f for groups in self.tails for f in groups}
        return [f for f in (*ALL_FAMILIES, OTHER) if f in seen]

    def tails_of(
        self, head: int, families: Sequence[str] = ALL_FAMILIES, max_tails: int | None = None
    ) -> list[str]:
        """The tails of head index `head` in the given families (in that family order)."""
        groups = self.tails[head]
        out = [t for f in families for t in groups.get(f, ())]
        return out if max_tails is None else out[:max_tails]

    def has_families(self, families: Sequence[str]) -> list[bool]:
        """Per head: whether it has a tail in any of `families` (heads without one are never
        retrieved, since they would contribute no knowledge)."""
        wanted = set(families)
        return [any(f in wanted for f in groups) for groups in self.tails]


def _is_header(fields: list[str]) -> bool:
    names = {_norm_name(f) for f in fields}
    return all(any(a in names for a in aliases) for aliases in _HEADER_ALIASES.values())


def _header_columns(fields: list[str]) -> tuple[int, int, int]:
    names = [_norm_name(f) for f in fields]
    cols = []
    for key in ("head", "relation", "tail"):
        cols.append(next(i for i, n in enumerate(names) if n in _HEADER_ALIASES[key]))
    return cols[0], cols[1], cols[2]


def parse_lines(lines: Iterable[str], sha256: str = "", source: str = "") -> KnowledgeGraph:
    """Parses TSV lines (see the module docstring) into a KnowledgeGraph."""
    report = ReadReport()
    index: dict[str, int] = {}
    heads: list[str] = []
    groups: list[dict[str, list[str]]] = []
    seen: set[tuple[str, str, str]] = set()
    cols = (0, 1, 2)
    first = True
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if first:
            line = line.lstrip("\ufeff")  # a UTF-8 byte-order mark some editors write
        if not line.strip():
            continue
        fields = line.split("\t")
        if first:
            first = False
            if _is_header(fields):
                report.header = fields
                cols = _header_columns(fields)
                continue
        report.rows += 1
        if len(fields) <= max(cols):
            report.skip("too_few_columns", line_no)
            continue
        head, relation, tail = (fields[c].strip() for c in cols)
        if not head or not relation or not tail:
            report.skip("empty_field", line_no)
            continue
        if tail.lower() in _NONE_TAILS:
            report.skip("none_tail", line_no)
            continue
        family = relation_family(relation)
        key = (head, family if family != OTHER else relation, tail)
        if key in seen:
            report.skip("duplicate", line_no)
            continue
        seen.add(key)
        if family == OTHER:
            report.unknown_relations[relation] = report.unknown_relations.get(relation, 0) + 1
        i = index.get(head)
        if i is None:
            i = index[head] = len(heads)
            heads.append(head)
            groups.append({})
        groups[i].setdefault(family, []).append(tail)
        report.kept += 1
    return KnowledgeGraph(heads=heads, tails=groups, sha256=sha256, report=report, source=source)


def read_tsv(path: str) -> KnowledgeGraph:
    """Reads a knowledge TSV file; logs the report when rows were skipped."""
    with open(path, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    text = data.decode("utf-8", errors="replace")
    kg = parse_lines(io.StringIO(text, newline=None), sha256=sha, source=os.path.abspath(path))
    if kg.report.skipped or kg.report.unknown_relations:
        logging.warning("%s: %s", path, kg.report.summary())
    return kg


def from_triples(
    triples: Iterable[tuple[str, str, str]], source: str = "triples"
) -> KnowledgeGraph:
    """A KnowledgeGraph from in-memory (head, relation, tail) triples (hashed like a TSV file)."""
    lines = ["\t".join(t) for t in triples]
    sha = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    return parse_lines(lines, sha256=sha, source=source)


def family_counts(kg: KnowledgeGraph) -> dict[str, int]:
    """Triples per family (for logs and reports)."""
    counts: collections.Counter = collections.Counter()
    for groups in kg.tails:
        for family, tails in groups.items():
            counts[family] += len(tails)
    return dict(counts)
