r"""Maria's modality ablation (paper Table 7 variants) on the bundled sample: docs/ablation.md.

    python benchmarks/ablation.py --workdir=/tmp/ablation [--variants=t,tv,tva,tvk,tvak] \
        [--seeds=0,1,2] [--steps=800] [--skip_meteor]
    python benchmarks/ablation.py --workdir=/tmp/ablation --probe=runs/tvak_s0

Prepares the sample as `make demo` does (release, TFDS build, tiny random-init features,
lexical knowledge, vocab; reused when --workdir already has them), trains the tiny Maria of each
variant and seed for --steps steps, evaluates the final model on the test split and prints
markdown tables: per reply kind (vision / audio / knowledge / text) and overall, each number
the mean over seeds (min-max when several). Runs land in WORKDIR/runs/<variant>_s<seed>/ (scores,
generations, TensorBoard); `python -m tiktalk_jax.main --mode=compare --workdir=...` plots them.

--probe=RUN: does a trained knowledge variant read its knowledge segment? For every test
dialogue of kind "knowledge" the final checkpoint of RUN generates once with the retrieved
knowledge and once with the knowledge of each other head used in the test split, and the script
counts the replies that take up the swapped-in xAttr tail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiktalk_jax import main as entry  # noqa: E402

METRICS = ("bleu2", "bleu4", "rouge_l", "cider", "recall@1", "mean_rank")


def _features(workdir: str) -> dict[str, tuple[str, int]] | None:
    """The features of an already prepared workdir (None when it has none)."""
    from tiktalk_jax import features

    out = {}
    for table in entry.DEMO_ENCODERS:
        directory = os.path.join(workdir, "data", "features", table)
        if not os.path.isfile(os.path.join(directory, features.METADATA_NAME)):
            return None
        meta = features.read_metadata(directory)
        out[table] = (directory, meta["fields"]["features"]["shape"][-1])
    return out


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(scores: dict[str, list[dict]], group: str | None) -> str:
    """Markdown: rows = variants, columns = METRICS of `group` (a kind, or None: overall)."""
    lines = ["| variant | n | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for variant, runs in scores.items():
        rows = [
            r["per_kind"][group] if group else {**r["nlg_scores"], **r["retrieval"]} for r in runs
        ]
        n = runs[0]["per_kind"][group]["num_examples"] if group else runs[0]["num_examples"]
        cells = [_cell([row[m] for row in rows]) for m in METRICS]
        lines.append(f"| {variant.upper()} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def knowledge_probe(run_dir: str) -> dict[str, int]:
    """The knowledge-swap probe (module docstring): prints each dialogue, returns counts."""
    import jax

    from tiktalk_jax import evaluate, input_pipeline, sharding
    from tiktalk_jax.models import registry

    config = evaluate._with_eval_split(evaluate.load_config(run_dir), "test")
    family = registry.get(config.model.name)
    mesh = sharding.make_mesh(config.mesh)
    side = family.side_tables(config)["test"]
    data = input_pipeline.make_datasets(config, side_tables={"test": side}, train=False)
    loader = evaluate.ModelLoader(config, run_dir, mesh)
    model = loader.load(loader.steps()[-1])
    source, tok = data.eval_sources["test"], data.tokenizer
    kinds = json.load(open(evaluate.find_kinds_file(config), encoding="utf-8"))
    as_text = input_pipeline.as_text

    def joined(i: int) -> dict:
        record = dict(source[i])
        for t in side:
            record[t.name] = t.source[t.index()[as_text(record[t.dialogue_field])]]
        return record

    ids = [
        i for i in range(len(source)) if kinds.get(as_text(source[i]["dialogue_id"])) == "knowledge"
    ]
    records = [joined(i) for i in ids]
    pool = sorted({r["knowledge"]["knowledge"] for r in records if r["knowledge"]["knowledge"]})
    fmt = input_pipeline.get_formatter(config.model.name, config.input, tok, train=False)
    generate = jax.jit(lambda m, b: family.generate(m, b, config))
    backend = tok.backend_tokenizer
    stop = [backend.token_to_id("[SEP]"), backend.token_to_id("[PAD]")]
    counts = dict(swaps=0, took_swapped_tail=0, changed=0)
    for record in records:
        own = record["knowledge"]["knowledge"]
        rows = [record] + [{**record, "knowledge": {"knowledge": k}} for k in pool if k != own]
        batch = {**fmt(rows), "example_mask": np.ones(len(rows), bool)}
        with jax.set_mesh(mesh):
            tokens = np.asarray(generate(model, batch))
        replies = [evaluate.decode_tokens(tok, t, stop) for t in tokens]
        tails = [r["knowledge"]["knowledge"].split(";")[0] for r in rows]
        took = [t for t, reply in zip(tails[1:], replies[1:]) if t and t in reply]
        counts["swaps"] += len(rows) - 1
        counts["took_swapped_tail"] += len(took)
        counts["changed"] += sum(reply != replies[0] for reply in replies[1:])
        print(f"{as_text(record['context'][-1])} [{tails[0]}] -> {replies[0]}; swapped tails used: "
              f"{took}")  # fmt: skip
    print(counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--variants", default="t,tv,tva,tvk,tvak")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=entry.DEMO_STEPS)
    p.add_argument("--skip_meteor", action="store_true")
    p.add_argument("--probe", default=None, help="a run dir (relative to --workdir) to probe")
    args = p.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    if args.probe:
        knowledge_probe(os.path.join(args.workdir, args.probe))
        return
    features = _features(args.workdir) or entry.prepare_sample(args.workdir, seed=0)
    scores: dict[str, list[dict]] = {}
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            config = entry.sample_config(variant, args.workdir, features, args.steps)
            config.seed = config.input.seed = seed
            run_dir = os.path.join(args.workdir, "runs", f"{variant}_s{seed}")
            start = time.perf_counter()
            result, trained, evaluated = entry.train_and_evaluate_variant(
                config, run_dir, args.skip_meteor or None
            )
            print(
                f"{variant} seed {seed}: trained {trained:.0f} s, evaluated {evaluated:.0f} s "
                f"({time.perf_counter() - start:.0f} s) -> {run_dir}",
                flush=True,
            )
            scores.setdefault(variant, []).append(result.scores)
    out = [f"{args.steps} steps, seeds {args.seeds} (mean, min-max over seeds)\n"]
    for kind in entry.ABLATION_KINDS:
        out += [f"\n{kind}\n", table(scores, kind)]
    out += ["\nall test dialogues\n", table(scores, None)]
    text = "\n".join(out)
    with open(os.path.join(args.workdir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
