r"""Maria's modality ablation (paper Table 7 variants) on the bundled sample: docs/ablation.md.

    python benchmarks/ablation.py --workdir=/tmp/ablation [--variants=t,tv,tva,tvk,tvak] \
        [--seeds=0,1,2] [--steps=800] [--skip_meteor]

Prepares the sample as `make demo` does (release, TFDS build, tiny random-init features,
lexical knowledge, vocab; reused when --workdir already has them), trains the tiny Maria of each
variant and seed for --steps steps, evaluates the final model on the test split and prints
markdown tables: per reply kind (vision / audio / knowledge / text) and overall, each number
the mean over seeds (min-max when several). Runs land in WORKDIR/runs/<variant>_s<seed>/ (scores,
generations, TensorBoard); `python -m tiktalk_jax.main --mode=compare --workdir=...` plots them.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--variants", default="t,tv,tva,tvk,tvak")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=entry.DEMO_STEPS)
    p.add_argument("--skip_meteor", action="store_true")
    args = p.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
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
