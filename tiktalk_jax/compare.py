r"""Compare evaluated checkpoints across runs: a score table, its CSV/markdown copies, a plot.

    python -m tiktalk_jax.main --mode=compare --workdir=runs/t --workdir=runs/tvak [--out=DIR]

Reads every `<workdir>/scores_<split>_step<N>.json` the eval mode wrote (one per evaluated
checkpoint and split), prints one table per split (rows: run x step, columns: metrics, the best
value of each column marked `*`) and writes into `--out` (default: the first workdir):

  compare.md           the same tables in markdown (best values in bold) and the warnings
  compare.csv          one row per (run, split, step), every metric, unformatted
  compare_<split>.png  every metric over steps, one line per run (a row per kind)

A run is labelled by its workdir's name; when two names collide, by the `variant` of its
config.json (or scores metadata), then by more of its path.

Metrics. The numbers are read from every numeric leaf of the scores file except its `metadata`:
the generation scores (`nlg_scores`) and retrieval ranks sit at the top level of the table
(`bleu4`, `recall@1`, ...); any other group, e.g. scores per reply kind, keeps its path
(`per_kind/vision/bleu4`) and gets a table of its own. `mean_rank`, losses and perplexities are
better when lower, everything else when higher. A metric recorded as null (METEOR skipped) shows
as `-` and never wins.

Comparability. Two numbers are only comparable when they were computed the same way, and the
scores files record how (segmenter and its version, aggregation, scorer versions, METEOR or its
absence, decoding settings, retrieval protocol, text lengths, the side tables' encoders and
hashes, the number of examples). Within a split every metadata field is compared across all
listed checkpoints and each differing field is reported with its values and which runs (or
`run@steps`) have them. Not compared: the fields that say which model and checkpoint a number
belongs to (step, model, variant, the model's tokenizer, init) and locations and times. Side
tables are compared only among the runs that join them: that T joins none and T+V+A+K joins
three is the ablation itself (the run list shows it), while two runs joining vision features of
different encoders are flagged. Splits are tabulated separately and never mixed; a run lacking a
split the others have is reported. The tables are printed all the same: the warnings say what
to keep in mind when reading them.

The reader is tolerant: an unreadable or malformed scores file (a hand-edited one, one of an
incompatible older format) is skipped with a message in the report instead of stopping the
comparison of everything else.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tiktalk_jax.metrics import METRIC_KEYS, RECALL_KS

SCORES_NAME = re.compile(r"^scores_(?P<split>.+)_step(?P<step>\d+)\.json$")
HEADLINE_KEYS = METRIC_KEYS + tuple(f"recall@{k}" for k in RECALL_KS) + ("mean_rank",)

# Top-level groups of a scores file whose metrics are the headline numbers (their names are
# unique across groups), so the table says `bleu4` rather than `nlg_scores/bleu4`.
_FLAT_GROUPS = frozenset({"nlg_scores", "nlg", "scores", "retrieval", "metrics"})
# Numeric leaves that describe the evaluation rather than score it.
_NOT_METRICS = frozenset({"step", "checkpoint_step", "num_examples", "examples", "count", "n"})
# Metadata fields (dotted names) that say which model and checkpoint a number belongs to, or where
# its files were: they differ between the runs being compared by design, so they are not checked.
_RUN_FIELDS = frozenset(
    {
        "checkpoint_step",
        "step",
        "split",  # the tables are per split anyway
        "model",
        "variant",
        "init_from",
        "tokenizer",  # the model's own vocabulary; scoring uses the segmenter
        "vocab_size",
        "workdir",
        "data_dir",
        "kinds_file",
        "created",
    }
)
_RUN_LEAVES = frozenset({"dir", "path", "created"})  # locations and times at any depth
# Groups a variant may lack (the T variant joins no side table, and its frames, audio and knowledge
# segments have length 0): their fields are compared only among the checkpoints that have them (a
# value other than absent, 0, {} or null). Which side tables a run joins is the ablation itself;
# the run list shows it.
_OPTIONAL_GROUPS = ("side_tables", "text_lengths")
_LOWER_IS_BETTER = re.compile(r"(rank|loss|perplexity|ppl)$")


class NoScoresError(FileNotFoundError):
    """None of the workdirs holds a readable scores file."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """The scores of one evaluated checkpoint on one split.

    Attributes:
      run: the run's label (see `run_labels`).
      workdir: the run's workdir as given.
      split: the evaluated split, from the file name.
      step: the checkpoint step, from the file name.
      scores: metric name -> value (None when the metric was not computed).
      metadata: the file's metadata block, flattened to dotted field names.
      path: the scores file.
    """

    run: str
    workdir: str
    split: str
    step: int
    scores: dict[str, float | None]
    metadata: dict[str, Any]
    path: str


@dataclasses.dataclass
class Comparison:
    """What `compare` found and wrote.

    Attributes:
      entries: every readable checkpoint's scores, in workdir order, then split, then step.
      warnings: the comparability warnings (empty when everything is comparable).
      skipped: one message per scores file that could not be read.
      text: the printed report (tables, warnings, written files).
      files: kind ("markdown", "csv", "plot:<split>") -> path written.
    """

    entries: list[Entry]
    warnings: list[str]
    skipped: list[str]
    text: str
    files: dict[str, str]


# -- Reading ------------------------------------------------------------------------------------


def find_scores_files(workdir: str) -> list[tuple[str, int, str]]:
    """`(split, step, path)` of every scores file directly in `workdir`, by split then step."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(workdir), "scores_*_step*.json")):
        match = SCORES_NAME.match(os.path.basename(path))
        if match:
            found.append((match["split"], int(match["step"]), path))
    return sorted(found)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten_scores(record: Mapping[str, Any]) -> dict[str, float | None]:
    """Every metric of a scores file as `{name: value}` (see the module docstring for names)."""
    out: dict[str, float | None] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            key = str(key)
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}/", value)
            elif key in _NOT_METRICS:
                continue
            elif _is_number(value):
                out[prefix + key] = float(value)
            elif value is None:  # not computed (METEOR skipped): a column of "-"
                out[prefix + key] = None

    for key, value in record.items():
        if key == "metadata":
            continue
        if isinstance(value, Mapping):
            walk("" if key in _FLAT_GROUPS else f"{key}/", value)
        elif key in HEADLINE_KEYS and (value is None or _is_number(value)):
            out[key] = None if value is None else float(value)
    # A non-finite score (a NaN from an empty kind) cannot win or be drawn; show it as missing.
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in out.items()}


def flatten_metadata(metadata: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metadata as `{dotted.field: value}` so a warning can name the exact field."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten_metadata(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_scores(path: str) -> tuple[dict[str, float | None], dict[str, Any]]:
    """`(scores, flat metadata)` of one scores file.

    Raises:
      ValueError: the file is not JSON, not an object, or holds no metric.
    """
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    scores = flatten_scores(record)
    if not scores:
        raise ValueError("no metric in it")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        metadata = {"metadata": metadata}
    # Fields written next to the metadata block that decide comparability all the same.
    for key in ("split", "num_examples", "tokenize", "decoding"):
        if key in record and key not in metadata:
            metadata = {**metadata, key: record[key]}
    return scores, flatten_metadata(metadata)


def config_variant(workdir: str) -> str | None:
    """The `variant` field of `<workdir>/config.json` (at any depth), or None."""
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None

    def find(node: Any) -> str | None:
        if isinstance(node, Mapping):
            if isinstance(node.get("variant"), str):
                return node["variant"]
            for value in node.values():
                found = find(value)
                if found is not None:
                    return found
        return None

    return find(config)


def run_labels(
    workdirs: Sequence[str], variants: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """A short unique label per workdir: its name, else name[variant], else more of its path."""
    variants = variants or {}
    parts = {w: os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs}
    labels = {w: parts[w][-1] or w for w in workdirs}

    def clashing() -> set[str]:
        counts = collections.Counter(labels.values())
        return {w for w in workdirs if counts[labels[w]] > 1}

    for w in clashing():
        if variants.get(w):
            labels[w] = f"{labels[w]}[{variants[w]}]"
    depth = 2
    while (dups := clashing()) and depth <= max(len(p) for p in parts.values()):
        for w in dups:
            labels[w] = "/".join(parts[w][-depth:])
        depth += 1
    for i, w in enumerate(sorted(clashing(), key=list(workdirs).index)):
        labels[w] = f"{labels[w]}#{i + 1}"
    return labels


def collect(workdirs: Sequence[str]) -> tuple[list[Entry], list[str]]:
    """Every readable scores file of `workdirs` as entries, and a message per skipped file."""
    # The same directory given twice (`runs/t`, `runs/t/`) is one run.
    unique: dict[str, str] = {}
    for w in workdirs:
        unique.setdefault(os.path.realpath(w), w)
    workdirs = list(unique.values())
    variants: dict[str, str | None] = {w: config_variant(w) for w in workdirs}
    raw: list[tuple[str, str, int, dict, dict, str]] = []
    skipped: list[str] = []
    for workdir in workdirs:
        if not os.path.isdir(workdir):
            skipped.append(f"{workdir}: not a directory")
            continue
        for split, step, path in find_scores_files(workdir):
            try:
                scores, metadata = read_scores(path)
            except (OSError, ValueError) as e:
                skipped.append(f"{path}: {e}")
                continue
            if variants[workdir] is None and isinstance(metadata.get("variant"), str):
                variants[workdir] = metadata["variant"]
            raw.append((workdir, split, step, scores, metadata, path))
    labels = run_labels(workdirs, variants)
    entries = [Entry(labels[w], w, sp, st, sc, md, p) for w, sp, st, sc, md, p in raw]
    return entries, skipped


# -- Comparability ------------------------------------------------------------------------------


_ABSENT = object()  # a metadata field one file lacks (an older eval, another model family)


def _short(value: Any, limit: int = 80) -> str:
    text = "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unused(value: Any) -> bool:
    """Absent, null, {} or a length of 0 (False is a value: `random_init: False` is compared)."""
    return value is _ABSENT or value is None or value == {} or (type(value) is int and value == 0)


def _who(entries: Sequence[Entry], all_entries: Sequence[Entry]) -> str:
    """Names the checkpoints in `entries`: `run` for all of a run's, else `run@step,step`."""
    by_run: dict[str, list[int]] = collections.defaultdict(list)
    for e in entries:
        by_run[e.run].append(e.step)
    total = collections.Counter(e.run for e in all_entries)
    parts = []
    for run, steps in by_run.items():
        if len(steps) == total[run]:
            parts.append(run)
        else:
            parts.append(f"{run}@{','.join(str(s) for s in sorted(steps))}")
    return ", ".join(parts)


def comparability_warnings(entries: Sequence[Entry]) -> list[str]:
    """One message per metadata field that differs within a split, and per missing split."""
    warnings = []
    runs = list(dict.fromkeys(e.run for e in entries))
    splits_of = {run: sorted({e.split for e in entries if e.run == run}) for run in runs}
    if len({tuple(s) for s in splits_of.values()}) > 1:
        have = "; ".join(f"{run}: {', '.join(splits)}" for run, splits in splits_of.items())
        warnings.append(
            f"split differs between runs ({have}); each split is tabulated on its own, so the "
            "runs missing one are absent from its table"
        )
    for split in sorted({e.split for e in entries}):
        section = [e for e in entries if e.split == split]
        fields = sorted({k for e in section for k in e.metadata})
        for field in fields:
            if field in _RUN_FIELDS or field.rsplit(".", 1)[-1] in _RUN_LEAVES:
                continue
            optional = field.split(".", 1)[0] in _OPTIONAL_GROUPS
            groups: dict[str, list[Entry]] = {}
            for e in section:
                value = e.metadata.get(field, _ABSENT)
                if optional and _unused(value):
                    continue
                groups.setdefault(_short(value), []).append(e)
            if len(groups) > 1:
                values = "; ".join(f"{v} ({_who(g, section)})" for v, g in groups.items())
                warnings.append(f"[{split}] not comparable: {field} differs: {values}")
    return warnings


def describe_run(entries: Sequence[Entry]) -> str:
    """`workdir (N scores files; model, variant; side tables: ...)` from a run's latest file."""
    md = max(entries, key=lambda e: e.step).metadata
    model = ", ".join(
        f"{k} {md[k]}" for k in ("model", "variant") if isinstance(md.get(k), (str, int))
    )
    tables = sorted({f.split(".")[1] for f in md if f.startswith("side_tables.")})
    parts = [f"{len(entries)} scores files", model]
    if "side_tables" in md or tables:
        parts.append(f"side tables: {', '.join(tables) or 'none'}")
    return f"{os.path.abspath(entries[0].workdir)} ({'; '.join(p for p in parts if p)})"


# -- Tables -------------------------------------------------------------------------------------


def lower_is_better(column: str) -> bool:
    """Ranks, losses and perplexities: the smallest value is the best."""
    return bool(_LOWER_IS_BETTER.search(column.rsplit("/", 1)[-1]))


def metric_columns(entries: Iterable[Entry]) -> list[str]:
    """Every metric name present: headline metrics in the paper's order, then groups by name."""
    names = {k for e in entries for k in e.scores}
    head = [k for k in HEADLINE_KEYS if k in names]
    top = sorted(k for k in names if "/" not in k and k not in HEADLINE_KEYS)

    def order(name: str) -> tuple:
        group, _, leaf = name.rpartition("/")
        rank = HEADLINE_KEYS.index(leaf) if leaf in HEADLINE_KEYS else len(HEADLINE_KEYS)
        return (group, rank, leaf)

    return head + top + sorted((k for k in names if "/" in k), key=order)


def column_groups(columns: Sequence[str]) -> dict[str, list[str]]:
    """`{group: columns}`: "" for the top-level metrics, else the path before the last '/'."""
    groups: dict[str, list[str]] = {}
    for column in columns:
        groups.setdefault(column.rpartition("/")[0], []).append(column)
    return groups


DECIMALS = 2  # of the tables; the best value is chosen among the numbers as printed


def best_values(entries: Sequence[Entry], columns: Sequence[str]) -> dict[str, float]:
    """Best value per column over `entries`, rounded to `DECIMALS`.

    Left out: columns without any value, and columns where every row prints the same number
    (a single row, or BLEU-4 at 0.00 everywhere), where a mark would say nothing.
    """
    best = {}
    for column in columns:
        values = {
            round(e.scores[column], DECIMALS) for e in entries if e.scores.get(column) is not None
        }
        if len(values) > 1:
            best[column] = min(values) if lower_is_better(column) else max(values)
    return best


def format_table(entries: Sequence[Entry], columns: Sequence[str], markdown: bool = False) -> str:
    """Rows run x step, one column per metric; the best value of a column is marked.

    Text: aligned columns, best values followed by `*`. Markdown: a pipe table, best in bold.
    Column headers drop the group prefix they share (the caller titles the table).
    """
    best = best_values(entries, columns)
    header = ["run", "step"] + [c.rpartition("/")[2] for c in columns]
    rows = []
    for e in entries:
        row = [e.run, str(e.step)]
        for column in columns:
            value = e.scores.get(column)
            if value is None:
                row.append("-")
                continue
            cell = f"{value:.{DECIMALS}f}"
            if column in best and round(value, DECIMALS) == best[column]:
                cell = f"**{cell}**" if markdown else f"{cell}*"
            row.append(cell)
        rows.append(row)
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
        lines = ["| " + " | ".join(header) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    # Unmarked values get a trailing space so that digits line up with the `*`-marked ones.
    table = [
        [c if i < 2 or c.endswith("*") else c + " " for i, c in enumerate(row)]
        for row in [header, *rows]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        ).rstrip()
        for row in table
    )


def _section_title(split: str, group: str, columns: Sequence[str], markdown: bool) -> str:
    mark = "bold" if markdown else "*"
    lower = [c.rpartition("/")[2] for c in columns if lower_is_better(c)]
    note = f"; lower is better for {', '.join(lower)}" if lower else ""
    return f"[{split}] {group or 'scores'} (best per column: {mark}{note})"


def format_report(entries: Sequence[Entry], markdown: bool = False) -> str:
    """Every split's tables, one per metric group; text or markdown."""
    blocks = []
    for split in sorted({e.split for e in entries}):
        section = [e for e in entries if e.split == split]
        for group, columns in column_groups(metric_columns(section)).items():
            rows = [e for e in section if any(c in e.scores for c in columns)]
            title = _section_title(split, group, columns, markdown)
            table = format_table(rows, columns, markdown=markdown)
            blocks.append(f"### {title}\n\n{table}" if markdown else f"{title}\n{table}")
    return "\n\n".join(blocks)


def write_csv(entries: Sequence[Entry], path: str) -> None:
    """One row per entry: run, workdir, split, step, then every metric (empty when missing)."""
    columns = metric_columns(entries)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "workdir", "split", "step", *columns])
    for e in entries:
        values = [e.scores.get(c) for c in columns]
        writer.writerow(
            [e.run, e.workdir, e.split, e.step, *("" if v is None else repr(v) for v in values)]
        )
    with open(path, "w", encoding="utf-8") as f:
        f.write(buffer.getvalue())


# -- Plot ---------------------------------------------------------------------------------------


def panel_layout(
    columns: Sequence[str], wrap: int = 4
) -> tuple[int, int, list[tuple[int, int, str]]]:
    """Where each metric's panel goes: `(nrows, ncols, [(row, col, column)])`.

    Top-level metrics only: wrapped `wrap` to a row. With groups (per-kind scores): one row per
    group ("" first), one column per metric name, so a column compares one metric across kinds.
    """
    groups = column_groups(columns)
    if list(groups) == [""] or not groups:
        ncols = max(1, min(wrap, len(columns)))
        cells = [(k // ncols, k % ncols, c) for k, c in enumerate(columns)]
        return max(1, math.ceil(len(columns) / ncols)), ncols, cells
    leaves = list(dict.fromkeys(c.rpartition("/")[2] for c in columns))
    cells = [
        (r, leaves.index(c.rpartition("/")[2]), c)
        for r, group_columns in enumerate(groups.values())
        for c in group_columns
    ]
    return len(groups), len(leaves), cells


def plot(entries: Sequence[Entry], path: str, title: str = "") -> None:
    """A PNG with one panel per metric: value over checkpoint step, one line per run.

    Metrics without any value (METEOR skipped) get no panel; the legend names them.
    """
    # The object-oriented API needs no pyplot state and no backend switch: Figure.savefig draws
    # through the Agg canvas, so this is safe in a headless process that imported pyplot elsewhere.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    all_columns = metric_columns(entries)
    columns = [c for c in all_columns if any(e.scores.get(c) is not None for e in entries)]
    runs = list(dict.fromkeys(e.run for e in entries))
    nrows, ncols, cells = panel_layout(columns)
    fig = Figure(figsize=(2.9 * ncols, 2.3 * nrows + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    used = set()
    for row, col, column in cells:
        ax = axes[row, col]
        used.add((row, col))
        for i, run in enumerate(runs):
            points = sorted(
                (e.step, e.scores[column])
                for e in entries
                if e.run == run and e.scores.get(column) is not None
            )
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3, color=f"C{i % 10}", label=run)
        group, _, leaf = column.rpartition("/")
        name = f"{group.rpartition('/')[2]}: {leaf}" if group else leaf  # "vision: bleu4"
        ax.set_title(name + (" (lower better)" if lower_is_better(column) else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for row in range(nrows):
        for col in range(ncols):
            if (row, col) not in used:
                axes[row, col].set_visible(False)
    handles = [
        Line2D([], [], marker="o", markersize=3, color=f"C{i % 10}", label=run)
        for i, run in enumerate(runs)
    ]
    missing = list(dict.fromkeys(c.rpartition("/")[2] for c in all_columns if c not in columns))
    legend_title = "; ".join(
        t for t in (title, missing and f"not computed: {', '.join(missing)}") if t
    )
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=min(len(runs), 6),
        title=legend_title or None,
    )
    fig.supxlabel("checkpoint step", fontsize=9)
    fig.savefig(path)


# -- Entry --------------------------------------------------------------------------------------


def compare(workdirs: Sequence[str], out: str | None = None) -> Comparison:
    """Collects, tabulates and plots every evaluated checkpoint of `workdirs` (see module doc).

    Args:
      workdirs: the runs' workdirs; each is searched for `scores_<split>_step<N>.json`.
      out: directory for compare.md, compare.csv and compare_<split>.png (default: the first
        workdir); created when missing.

    Returns:
      A `Comparison`; `text` is the report to print.

    Raises:
      NoScoresError: no workdir holds a readable scores file.
    """
    if not workdirs:
        raise ValueError("compare needs at least one workdir")
    entries, skipped = collect(workdirs)
    if not entries:
        detail = "".join(f"\n  skipped {m}" for m in skipped)
        raise NoScoresError(
            f"no readable scores_<split>_step<N>.json in {list(workdirs)}; evaluate the "
            f"checkpoints first (--mode=eval){detail}"
        )
    warnings = comparability_warnings(entries)
    out = out or workdirs[0]
    os.makedirs(out, exist_ok=True)

    files = {"markdown": os.path.join(out, "compare.md"), "csv": os.path.join(out, "compare.csv")}
    for split in sorted({e.split for e in entries}):
        files[f"plot:{split}"] = path = os.path.join(out, f"compare_{split}.png")
        plot([e for e in entries if e.split == split], path, title=f"{split} split")
    write_csv(entries, files["csv"])

    runs: dict[str, list[Entry]] = {}
    for e in entries:
        runs.setdefault(e.run, []).append(e)
    run_lines = [f"  {run}: {describe_run(run_entries)}" for run, run_entries in runs.items()]
    notes = [f"WARNING: {w}" for w in warnings] + [f"skipped {m}" for m in skipped]

    md = [f"# Comparison of {len(runs)} run(s)", "", *(f"- {line.strip()}" for line in run_lines)]
    if notes:
        md += ["", "## Warnings", "", *(f"- {n}" for n in notes)]
    md += ["", format_report(entries, markdown=True), ""]
    with open(files["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(md))

    text = [f"Runs ({len(entries)} evaluated checkpoints):", *run_lines, "", format_report(entries)]
    if notes:
        text += ["", *notes]
    text += ["", "Wrote:", *(f"  {path}" for path in files.values())]
    return Comparison(entries, warnings, skipped, "\n".join(text), files)
