"""A Markdown model card for every evaluated checkpoint: config, data, steps, scores, samples.

    write_model_card(workdir, split, step)  ->  <workdir>/model_card_<split>_step<step>.md

`tiktalk_jax.evaluate.evaluate` writes one after each scores file. Everything on the card is
read from files the run wrote, so a card can be (re)made for any evaluated checkpoint: the
config (`config.json`, or the config passed in), the scores file (`scores_<split>_step<N>.json`:
scores, per-kind scores and the comparability metadata: side tables, decoding, tokenizer), the
generations file (sample hypotheses next to their references) and the train metrics
(`metrics.jsonl`: the train loss logged at or before the step).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

NUM_SAMPLES = 6
_MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "vocab_size")  # fmt: skip
_OPTIM_FIELDS = ("lr", "warmup_steps", "weight_decay", "clip_norm", "end_lr_fraction")


def model_card_path(workdir: str, split: str, step: int) -> str:
    return os.path.join(workdir, f"model_card_{split}_step{step}.md")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _train_loss(workdir: str, step: int) -> tuple[int, float] | None:
    """(logged step, train loss) of the last train loss logged at or before `step`."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    best = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            s, loss = row.get("step"), row.get("train/loss")
            if loss is not None and s is not None and s <= step and (best is None or s >= best[0]):
                best = (int(s), float(loss))
    return best


def _samples(generations: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """Up to `n` generations: one of each reply kind first (in file order), then the rest."""
    picked, seen = [], set()
    for g in generations:
        if g.get("kind") not in seen:
            seen.add(g.get("kind"))
            picked.append(g)
    picked += [g for g in generations if g not in picked]
    return picked[:n]


def render(
    config: Mapping[str, Any],
    scores: Mapping[str, Any],
    generations: Sequence[Mapping[str, Any]],
    train_loss: tuple[int, float] | None = None,
) -> str:
    """The card's Markdown (`config` as a plain dict, `scores` as the scores file)."""
    from tiktalk_jax import metrics

    model, inp = config.get("model", {}), config.get("input", {})
    meta = scores.get("metadata", {})
    split, step = scores["split"], scores["step"]
    name = model.get("name", "?")
    variant = model.get("variant")
    title = f"{name} {variant}" if variant else name
    out = [f"# Model card: {title}, step {step}, {split} split", ""]
    out += [
        "Made by `tiktalk_jax.model_card` from the run's config, scores and generations files.",
        "",
        "## Model",
        "",
        f"- family: `{name}`" + (f", variant `{variant}`" if variant else ""),
        f"- initialised from: {model.get('init_from') or 'random initialisation'}",
    ]
    shape = model.get("bert") or {}
    if shape:
        fields = [f"{k} {shape[k]}" for k in _MODEL_FIELDS if shape.get(k) is not None]
        out.append("- shape: " + ", ".join(fields))
    out.append(f"- compute / param dtype: {model.get('dtype')} / {model.get('param_dtype')}")

    out += ["", "## Data", ""]
    out.append(f"- dataset: `{inp.get('dataset', '?')}` in `{inp.get('data_dir')}`")
    out.append(f"- trained on split `{inp.get('train_split')}`, evaluated on `{split}` "
               f"({scores['num_examples']} dialogues)")  # fmt: skip
    vocab = meta.get("vocab_size")
    out.append(f"- tokenizer: {meta.get('tokenizer') or inp.get('tokenizer') or '?'}"
               + (f" ({vocab} tokens)" if vocab else ""))  # fmt: skip
    if meta.get("text_lengths"):
        out.append(
            "- text lengths: " + ", ".join(f"{k} {v}" for k, v in meta["text_lengths"].items())
        )
    for table, info in (meta.get("side_tables") or {}).items():
        if "encoder" in info and "kg" not in info:
            line = f"- {table}: encoder `{info['encoder']}`, weights {info.get('weights')}"
            if info.get("random_init"):
                line += " (**RANDOM-INIT encoder: smoke features, no pretrained knowledge**)"
            if info.get("normalization"):
                line += f"; {info['normalization']}"
        else:
            line = f"- {table}: KG `{info.get('kg')}`, retrieval encoder `{info.get('encoder')}`"
        out.append(line)

    out += ["", "## Training", ""]
    out.append(f"- checkpoint step {step} of {config.get('total_steps', '?')} configured steps, "
               f"batch size {inp.get('batch_size')}, seed {config.get('seed')}")  # fmt: skip
    optim = config.get("optim", {})
    if optim:
        out.append(
            "- optimizer: " + ", ".join(f"{k} {optim[k]}" for k in _OPTIM_FIELDS if k in optim)
        )
    if train_loss:
        out.append(f"- train loss {train_loss[1]:.4f} (logged at step {train_loss[0]})")

    out += ["", f"## Scores ({split}, step {step})", ""]
    columns = [*metrics.METRIC_KEYS, *(f"recall@{k}" for k in metrics.RECALL_KS), "mean_rank"]
    overall = {**scores.get("nlg_scores", {}), **scores.get("retrieval", {})}
    rows = [["all", scores["num_examples"], *(_fmt(overall.get(c)) for c in columns)]]
    for kind, values in sorted((scores.get("per_kind") or {}).items()):
        rows.append([kind, values.get("num_examples"), *(_fmt(values.get(c)) for c in columns)])
    out += _table(["examples", "n", *columns], rows)
    decoding = meta.get("decoding") or config.get("decode") or {}
    notes = [
        "NLG scores x100 against the references (per-reference average, "
        f"tokenize `{meta.get('tokenize', '?')}`); retrieval: rank of the best reference among "
        f"{meta.get('retrieval', {}).get('num_negatives', '?')} negatives (mean_rank: 1 is best).",
        "METEOR: " + str(meta.get("meteor", "computed")),
        "Decoding: " + ", ".join(f"{k} {v}" for k, v in decoding.items()),
    ]
    out += [""] + [f"- {n}" for n in notes]

    out += ["", "## Sample generations", ""]
    for g in _samples(generations, NUM_SAMPLES):
        kind = f" [{g['kind']}]" if g.get("kind") else ""
        out.append(f"- **{g.get('dialogue_id')}**{kind}")
        out.append(f"  - context: {' / '.join(g.get('context', []))}")
        out.append(f"  - model: {g.get('hypothesis') or '<empty>'}")
        out.append(f"  - references: {' / '.join(g.get('references', [])[:3])}")
        if g.get("best_reference_rank") is not None:
            out.append(f"  - best reference rank: {g['best_reference_rank']}")

    workdir = meta.get("workdir", "WORKDIR")
    out += [
        "",
        "## Use",
        "",
        "```",
        f"python -m tiktalk_jax.respond --workdir={workdir} --checkpoint_step={step} "
        "--video=clip.mp4 --context=...",
        f"python -m tiktalk_jax.export --workdir={workdir} --checkpoint_step={step} --out=DIR",
        "```",
        "",
    ]
    return "\n".join(out)


def write_model_card(workdir: str, split: str, step: int, *, config: Any = None) -> str:
    """Writes the card of checkpoint `step` on `split` from the files in `workdir`; returns its
    path. `config`: the run's config (default: `<workdir>/config.json`)."""
    from tiktalk_jax import evaluate

    if config is None:
        config = evaluate.load_config(workdir)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    with open(evaluate.scores_path(workdir, split, step), encoding="utf-8") as f:
        scores = json.load(f)
    generations = []
    path = evaluate.generations_path(workdir, split, step)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            generations = [json.loads(line) for line in f if line.strip()]
    text = render(config, scores, generations, _train_loss(workdir, step))
    out = model_card_path(workdir, split, step)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(out + ".tmp", out)
    return out
