r"""The paper's Table 3: every baseline and Maria ablation trained, evaluated, tabulated.

    # the bundled sample, tiny models (prepared as `make demo` does; docs/table3.md):
    python benchmarks/table3.py --workdir=/tmp/table3 --steps=300
    # the real release, the paper's sizes:
    python benchmarks/table3.py --workdir=runs/table3 --data_dir=DATA --size=base \
        --features=frames=DATA/features/resnet101,audio=DATA/features/vggish,\
livebot=DATA/features/resnet18,vit_g=DATA/features/vit_g --knowledge_dir=KNOWLEDGE \
        --set=@maria:tokenizer=/ckpt/bert-base-chinese,init_from=/ckpt/bert-base-chinese \
        --set=dialogpt:tokenizer=/ckpt/gpt2-chitchat,init_from=/ckpt/gpt2-chitchat \
        --set=@llm:tokenizer=/ckpt/Qwen2.5-7B-Instruct \
        --set=chatglm:init_from=/ckpt/Qwen2.5-7B-Instruct --set=@blip2:qformer=/ckpt/blip2-opt-2.7b

Rows, in the paper's order (`ROWS`; --rows takes their keys), each a config of configs/:

  T baselines      dialogpt     DialoGPT       configs/dialogpt.py
                   chatglm      ChatGLM-6B     configs/llm_text.py (a decoder LLM fine-tuned on
                                               text: GLM-4 / Qwen / Llama ports, not ChatGLM-6B;
                                               the tiny random-init one without LoRA)
  V+T baselines    livebot      Livebot        configs/livebot.py
                   blip2_img    BLIP-2_Img     configs/blip2.py:variant=img   } over the frozen
                   blip2_video  BLIP-2_Video   configs/blip2.py:variant=video } chatglm run's LLM
                   maria        Maria          configs/maria.py:variant=tv
  V+T+A baseline   maria_audio  Maria+Audio    configs/maria.py:variant=tva
  V+T+K baseline   maria_c3kg   Maria+C3KG     configs/maria.py:variant=tvk
  Maria ablations  text         text           configs/maria.py:variant=t
                   audio_text   Audio+text     configs/maria.py:variant=ta
                   c3kg_text    C3KG+text      configs/maria.py:variant=tk

Each row trains in WORKDIR/runs/<key> (`tiktalk_jax.train`) and its final model is evaluated on
the test split (`tiktalk_jax.evaluate`: scores and generations files there), as
`main.train_and_evaluate_variant` does for the demo. A run whose scores file for its final step
already exists is read back instead of retrained (delete the run directory to redo it). BLIP-2
freezes the LLM of the chatglm run, as the paper freezes its text-fine-tuned ChatGLM-6B: that run
is trained first (also when its row is not asked for) unless `--set=@blip2:llm_run=DIR` names one.

Data: without --data_dir, the bundled sample is prepared in WORKDIR as `make demo` prepares it
(`tiktalk_jax.main.prepare_sample`: release, TFDS build, tiny random-init frame/audio features,
lexical knowledge, vocab; reused when WORKDIR has it) plus tiny random-init EVA ViT-g features for
BLIP-2, and the rows use the tiny sizes. With --data_dir (a TFDS data dir built from the release,
README "Building the real dataset"), --features names the features datasets of
`python -m tiktalk_jax.extract` (defaults: DATA/features/resnet101, vggish, resnet18 and vit_g,
the extract CLI's own), --knowledge_dir the side tables of `python -m tiktalk_jax.knowledge.prepare`
(default: its own), and --set passes further config arguments to a row (`KEY:args`) or to every
row of a config (`@maria:args`, `@llm` = chatglm and both BLIP-2 rows, which must share the LLM's
tokenizer). Feature widths are read from the features' metadata.json. --steps overrides every
row's train steps (default: each config's own schedule).

Columns: the paper's BLEU-2, BLEU-4, METEOR, ROUGE-L, CIDEr, Dist-2, Dist-3 (x100, the paper's
per-reference average over the 5 references), then the retrieval Recall@1/5/10 and MeanRank over
5 references + 95 negatives (not in the paper's Table 3; `tiktalk_jax.metrics`). The best value
of each column is bold. METEOR needs Java; --skip_meteor leaves it out ("-").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)  # configs/ is a top-level directory of the repo

from tiktalk_jax import main as entry  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of Table 3: paper name, its group (the paper's "Type"), config file and args."""

    key: str
    name: str
    group: str
    config: str  # configs/<config>.py
    arg: str = ""  # fixed config arguments (the variant)


ROWS = (
    Row("dialogpt", "DialoGPT", "T baselines", "dialogpt"),
    Row("chatglm", "ChatGLM-6B", "T baselines", "llm_text"),
    Row("livebot", "Livebot", "V+T baselines", "livebot"),
    Row("blip2_img", "BLIP-2_Img", "V+T baselines", "blip2", "variant=img"),
    Row("blip2_video", "BLIP-2_Video", "V+T baselines", "blip2", "variant=video"),
    Row("maria", "Maria", "V+T baselines", "maria", "variant=tv"),
    Row("maria_audio", "Maria+Audio", "V+T+A baseline", "maria", "variant=tva"),
    Row("maria_c3kg", "Maria+C3KG", "V+T+K baseline", "maria", "variant=tvk"),
    Row("text", "text", "Maria ablations", "maria", "variant=t"),
    Row("audio_text", "Audio+text", "Maria ablations", "maria", "variant=ta"),
    Row("c3kg_text", "C3KG+text", "Maria ablations", "maria", "variant=tk"),
)
ROW_KEYS = tuple(r.key for r in ROWS)
LLM_ROW = "chatglm"  # the run whose LLM BLIP-2 freezes
TIMES_FILE = "table3_times.json"  # in each run dir: its train and eval seconds

# (column title, scores key): the paper's Table 3, then retrieval.
COLUMNS = (
    ("BLEU-2", "bleu2"),
    ("BLEU-4", "bleu4"),
    ("METEOR", "meteor"),
    ("ROUGE-L", "rouge_l"),
    ("CIDEr", "cider"),
    ("Dist-2", "dist2"),
    ("Dist-3", "dist3"),
    ("R@1", "recall@1"),
    ("R@5", "recall@5"),
    ("R@10", "recall@10"),
    ("MeanRank", "mean_rank"),
)
LOWER_IS_BETTER = frozenset({"mean_rank"})

# Features tables: name -> (the extract CLI's default dir under DATA/features, the field read).
FEATURE_TABLES = {
    "frames": "resnet101",  # Maria's vision segment
    "audio": "vggish",  # Maria's audio segment
    "livebot": "resnet18",  # Livebot's frames
    "vit_g": "vit_g",  # BLIP-2
}
# The sample's tiny random-init EVA ViT-g: 224 px / patch 14 keeps BLIP-2's 257 tokens.
SAMPLE_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@dataclasses.dataclass
class Data:
    """Where the rows read their data: the TFDS data dir and `{table: (features dir, width)}`."""

    data_dir: str
    features: dict[str, tuple[str, int]]
    knowledge_dir: str | None = None
    kinds_file: str | None = None
    sample: bool = False


@dataclasses.dataclass
class Result:
    """What `main` returns: the Markdown table, each row's scores file and the written path."""

    text: str
    scores: dict[str, dict[str, Any]]
    path: str


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def feature_width(directory: str) -> int:
    """The width of a features dataset's `features` field (its metadata.json)."""
    from tiktalk_jax import features

    return int(features.read_metadata(directory)["fields"]["features"]["shape"][-1])


def _has_features(directory: str) -> bool:
    from tiktalk_jax import features

    return os.path.isfile(os.path.join(directory, features.METADATA_NAME))


def extract_sample_vit(data_dir: str) -> tuple[str, int]:
    """BLIP-2's features of the sample: a tiny RANDOM-INIT EVA ViT-g over every media split
    (`SAMPLE_VIT`), in `<data_dir>/features/vit_g` (the extract CLI's default dir)."""
    from tiktalk_jax import encoders, extract

    directory = os.path.join(data_dir, "features", "vit_g")
    if not _has_features(directory):
        media = extract.media_dir(data_dir)
        sources = {s: extract.open_media(media, s) for s in extract.media_splits(media)}
        encoder = encoders.build_encoder("vit_g", model_config=SAMPLE_VIT)
        extract.extract_dataset(encoder, sources, directory, progress=False, media=dict(dir=media))
        print(f"  vit_g: RANDOM-INIT (seed 0, smoke features only) -> {directory}", flush=True)
    return directory, feature_width(directory)


def prepare_sample(workdir: str, seed: int, vit: bool) -> Data:
    """The bundled sample in `workdir`, prepared as `make demo` does (reused when present)."""
    from tiktalk_jax import input_pipeline, tokenizer

    data_dir = os.path.join(workdir, "data")
    tables = {t: os.path.join(data_dir, "features", t) for t in entry.DEMO_ENCODERS}
    try:
        vocab = os.path.join(input_pipeline.dataset_dir(data_dir), tokenizer.VOCAB_FILENAME)
    except FileNotFoundError:
        vocab = None
    if vocab and os.path.isfile(vocab) and all(map(_has_features, tables.values())):
        found = {t: (d, feature_width(d)) for t, d in tables.items()}
    else:
        found = dict(entry.prepare_sample(workdir, seed))
    found["livebot"] = found["frames"]  # the sample has one frame encoder
    if vit:
        found["vit_g"] = extract_sample_vit(data_dir)
    kinds = os.path.join(workdir, "raw", "sample_kinds.json")
    return Data(data_dir, found, kinds_file=kinds if os.path.isfile(kinds) else None, sample=True)


def real_data(data_dir: str, features: str, knowledge_dir: str | None) -> Data:
    """A built release: `features` is `name=dir,...` over `FEATURE_TABLES` (defaults: the
    extract CLI's dirs); tables that do not exist are left out (their rows then fail)."""
    dirs = {t: os.path.join(data_dir, "features", d) for t, d in FEATURE_TABLES.items()}
    for item in filter(None, (features or "").split(",")):
        name, _, directory = item.partition("=")
        if name not in FEATURE_TABLES:
            raise ValueError(f"--features: unknown table {name!r}; known: {list(FEATURE_TABLES)}")
        dirs[name] = directory
    found = {t: (d, feature_width(d)) for t, d in dirs.items() if _has_features(d)}
    return Data(data_dir, found, knowledge_dir=knowledge_dir)


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------


def _selected(selector: str, row: Row) -> bool:
    """`--set` selectors: a row key, `@config` (its rows) or `@llm` (chatglm and BLIP-2)."""
    if selector == "@llm":
        return row.config in ("llm_text", "blip2")
    if selector.startswith("@"):
        return row.config == selector[1:]
    return selector == row.key


def config_arg(
    row: Row, data: Data, *, size: str, llm_size: str, llm_run: str, extra: Sequence[str] = ()
) -> str:
    """The row's `get_config` argument: its variant, size, data and features, then the `--set`
    arguments that select it (later ones win)."""
    args: dict[str, Any] = dict(data_dir=data.data_dir)
    f = data.features
    if row.config == "maria":
        args["size"] = size
        for table, dim in (("frames", "frame_dim"), ("audio", "audio_dim")):
            if table in f:
                args[f"{table}_dir"], args[dim] = f[table]
        if data.knowledge_dir:
            args["knowledge_dir"] = data.knowledge_dir
    elif row.config == "livebot":
        args["size"] = size
        if "livebot" in f:
            args["frames_dir"], args["frame_dim"] = f["livebot"]
    elif row.config == "dialogpt":
        args["size"] = size
    elif row.config == "llm_text":
        args["size"] = llm_size
        if llm_size == "tiny":
            args["lora"] = False  # adapters on a random-init base learn little: train it all
    elif row.config == "blip2":
        args.update(size=llm_size, llm_run=llm_run)
        if "vit_g" in f:
            args["visual_dir"], args["visual_dim"] = f["vit_g"]
    if data.kinds_file:
        args["kinds_file"] = data.kinds_file
    parts = [row.arg, *(f"{k}={v}" for k, v in args.items()), *extra]
    return ",".join(p for p in parts if p)


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"not a boolean: {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float)):
        return type(current)(text)
    return text


def apply_overrides(config, overrides: Sequence[str]) -> list[str]:
    """`path.to.field=value` (as --config.path.to.field=value) for the fields `config` has,
    typed like their current value; returns the overrides applied."""
    applied = []
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--override wants path.to.field=value, got {item!r}")
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node.get(name) if hasattr(node, "get") else None
        if node is None or not hasattr(node, "get") or leaf not in node:
            continue
        node[leaf] = _parse_value(text, node[leaf])
        applied.append(item)
    return applied


def load_config(row: Row, arg: str, steps: int | None, overrides: Sequence[str] = ()):
    """`configs/<row.config>.py:get_config(arg)`, with `steps` train steps when given (short
    warmup, one checkpoint at the end, as the demo's `main.sample_config`), then `overrides`."""
    import importlib

    config = importlib.import_module(f"configs.{row.config}").get_config(arg)
    if steps is not None:
        config.total_steps = steps
        config.checkpoint_every = steps
        config.log_every = max(1, min(100, steps // 4))
        config.optim.warmup_steps = max(1, min(config.optim.warmup_steps, steps // 10))
    apply_overrides(config, overrides)
    return config


# ---------------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------------


def _scores_file(config, run_dir: str) -> str:
    from tiktalk_jax import evaluate

    return evaluate.scores_path(run_dir, config.eval.split, int(config.total_steps))


def check_run_dir(config, run_dir: str) -> bool:
    """True when `run_dir` holds a run of exactly `config` (False: no run there yet); raises
    when it holds another config's run, which training would otherwise resume."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored != json.loads(config.to_json_best_effort(sort_keys=True)):
        raise ValueError(
            f"{run_dir} holds a run of another config (other steps, sizes, data or overrides): "
            "delete it or choose another --workdir"
        )
    return True


def run_row(config, run_dir: str, skip_meteor: bool | None) -> tuple[dict[str, Any], str]:
    """Trains and evaluates one row, or reads back the scores of its finished run (same config,
    same METEOR setting): (scores, note)."""
    path = _scores_file(config, run_dir)
    times = os.path.join(run_dir, TIMES_FILE)
    if check_run_dir(config, run_dir) and os.path.isfile(path) and os.path.isfile(times):
        with open(path, encoding="utf-8") as f:
            scores = json.load(f)
        with open(times, encoding="utf-8") as f:
            note = json.load(f)["note"]
        if bool(scores["metadata"].get("skip_meteor")) == bool(skip_meteor):
            return scores, f"{note} (read back)"
    result, trained, evaluated = entry.train_and_evaluate_variant(config, run_dir, skip_meteor)
    note = f"trained {trained:.0f} s, evaluated {evaluated:.0f} s"
    with open(times, "w", encoding="utf-8") as f:
        json.dump({"trained_s": trained, "evaluated_s": evaluated, "note": note}, f)
    return result.scores, note


def ensure_trained(config, run_dir: str) -> None:
    """Trains `config` in `run_dir` up to its total steps (a finished run is left as it is)."""
    from tiktalk_jax import train

    check_run_dir(config, run_dir)
    train.train_and_evaluate(config, run_dir)


# ---------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------


def _value(scores: Mapping[str, Any], key: str) -> float | None:
    value = {**scores.get("nlg_scores", {}), **scores.get("retrieval", {})}.get(key)
    return None if value is None else float(value)


def format_table(rows: Sequence[Row], scores: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown in the layout of the paper's Table 3: the group named on its first row, one
    column per `COLUMNS` entry, the best printed value of each column in bold."""
    cells = {r.key: {k: _value(scores[r.key], k) for _, k in COLUMNS} for r in rows}
    best = {}
    for _, k in COLUMNS:
        printed = [round(v, 2) for r in rows if (v := cells[r.key][k]) is not None]
        if len(set(printed)) > 1:  # no mark when a single value or a tie of every row
            best[k] = (min if k in LOWER_IS_BETTER else max)(printed)
    lines = [
        "| Type | Methods | " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    group = None
    for r in rows:
        row_cells = []
        for _, k in COLUMNS:
            v = cells[r.key][k]
            text = "-" if v is None else f"{v:.2f}"
            row_cells.append(
                f"**{text}**" if v is not None and round(v, 2) == best.get(k) else text
            )
        label = r.group if r.group != group else ""
        group = r.group
        lines.append(f"| {label} | {r.name} | " + " | ".join(row_cells) + " |")
    return "\n".join(lines)


def _describe(data: Data, rows: Sequence[Row], scores, steps: int | None, size: str) -> str:
    def values(get) -> str:
        return "/".join(str(v) for v in sorted({get(scores[r.key]) for r in rows}, key=str))

    where = "the bundled sample" if data.sample else f"`{data.data_dir}`"
    trained = f"{steps} steps each" if steps is not None else "each config's own schedule"
    n = values(lambda s: s["num_examples"])
    negatives = values(lambda s: s["metadata"]["retrieval"]["num_negatives"])
    refs = values(lambda s: s["metadata"]["retrieval"].get("num_positives", 5))
    import jax

    devices = f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)"
    return (
        f"Test split of {where} ({n} dialogues), size={size}, {trained} on {devices}. Scores "
        f"x100; retrieval ranks the {refs} references among {negatives} negatives (MeanRank: 1 "
        "is best); the best value of each column in bold. Times below: wall seconds."
    )


def _parse_sets(values: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for value in values:
        selector, sep, args = value.partition(":")
        if not sep or not args:
            raise ValueError(f"--set wants SELECTOR:key=value,..., got {value!r}")
        if not any(_selected(selector, r) for r in ROWS):
            raise ValueError(f"--set: {selector!r} selects no row (keys: {list(ROW_KEYS)})")
        out.append((selector, args))
    return out


def main(argv: Sequence[str] | None = None) -> Result:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/table3", help="runs/ and (sample) raw/, data/")
    p.add_argument("--rows", default=",".join(ROW_KEYS), help="comma-separated row keys")
    p.add_argument("--steps", type=int, default=None, help="train steps of every row")
    p.add_argument("--out", default=os.path.join(_REPO, "docs", "table3.md"))
    p.add_argument("--data_dir", default=None, help="a built TFDS data dir (default: sample)")
    p.add_argument("--features", default="", help="name=dir,... (frames, audio, livebot, vit_g)")
    p.add_argument("--knowledge_dir", default=None, help="knowledge.prepare's output")
    p.add_argument("--size", choices=("tiny", "base"), default=None, help="default: tiny on the "
                   "sample, base with --data_dir")  # fmt: skip
    p.add_argument("--llm_size", default=None, help="chatglm / BLIP-2 LLM shape (llm.SHAPES; "
                   "default tiny, or qwen2.5-7b with size=base)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], help="SELECTOR:key=value,... (module doc)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="path.to.field=value "
        "for every row whose config has the field (e.g. decode.max_new_tokens=8)",
    )
    p.add_argument("--seed", type=int, default=0, help="sample release seed")
    p.add_argument("--skip_meteor", action="store_true", help="no METEOR (needs Java)")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/table3.py", *(sys.argv[1:] if argv is None else argv)])
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(ROW_KEYS))
    if unknown or not keys:
        raise ValueError(f"--rows: unknown {unknown}; known: {list(ROW_KEYS)}")
    rows = [r for r in ROWS if r.key in keys]  # the paper's order whatever the flag's
    sets = _parse_sets(args.set)
    size = args.size or ("base" if args.data_dir else "tiny")
    llm_size = args.llm_size or ("tiny" if size == "tiny" else "qwen2.5-7b")
    needs_blip2 = any(r.config == "blip2" for r in rows)
    if args.data_dir:
        data = real_data(args.data_dir, args.features, args.knowledge_dir)
    else:
        data = prepare_sample(args.workdir, args.seed, vit=needs_blip2)

    def run_dir(row: Row) -> str:
        return os.path.join(args.workdir, "runs", row.key)

    llm_row = next(r for r in ROWS if r.key == LLM_ROW)

    def config_of(row: Row):
        extra = [a for selector, a in sets if _selected(selector, row)]
        arg = config_arg(
            row, data, size=size, llm_size=llm_size, llm_run=run_dir(llm_row), extra=extra
        )
        return load_config(row, arg, args.steps, args.override)

    configs = {r.key: config_of(r) for r in rows}
    for item in args.override:
        if not any(
            apply_overrides(c.copy_and_resolve_references(), [item]) for c in configs.values()
        ):
            raise ValueError(f"--override {item!r}: no selected row's config has that field")

    # BLIP-2 freezes the chatglm run's LLM: train it first unless every BLIP-2 row names one.
    if needs_blip2 and LLM_ROW not in keys:
        blip2_rows = [r for r in rows if r.config == "blip2"]
        if any(configs[r.key].model.llm_run == run_dir(llm_row) for r in blip2_rows):
            print(f"== {llm_row.name} (the LLM BLIP-2 freezes) -> {run_dir(llm_row)}", flush=True)
            ensure_trained(config_of(llm_row), run_dir(llm_row))

    scores, notes = {}, []
    skip_meteor = args.skip_meteor or None
    for row in rows:
        config = configs[row.key]
        print(f"== {row.name}: configs/{row.config}.py, {config.total_steps} steps", flush=True)
        start = time.perf_counter()
        scores[row.key], note = run_row(config, run_dir(row), skip_meteor)
        print(f"   {note} ({time.perf_counter() - start:.0f} s) -> {run_dir(row)}", flush=True)
        variant = f":{row.arg}" if row.arg else ""
        n = scores[row.key]["num_examples"]
        notes.append(
            f"- {row.name}: `configs/{row.config}.py{variant}`, {n} test dialogues, {note}"
        )
        for _, k in COLUMNS:
            v = _value(scores[row.key], k)
            if v is not None and not math.isfinite(v):
                raise FloatingPointError(f"{row.name}: {k} = {v}")

    table = format_table(rows, scores)
    text = "\n".join(
        [
            "# The paper's Table 3 (benchmarks/table3.py)",
            "",
            f"`{command}`",
            "",
            _describe(data, rows, scores, args.steps, size),
            "",
            table,
            "",
            *notes,
            "",
        ]
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(table, flush=True)
    print(f"-> {args.out}", flush=True)
    return Result(text, scores, args.out)


if __name__ == "__main__":
    main()
