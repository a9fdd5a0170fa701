r"""The entry point: `python -m tiktalk_jax.main [--mode=MODE] --workdir=DIR [--config=...]`.

Modes:
  train  (default) Train and periodically evaluate the model of --config; restarting the same
         command in the same workdir resumes. Configs are `get_config(arg)` files:
           python -m tiktalk_jax.main --config=configs/maria.py:variant=tvak,size=tiny \
               --workdir=/tmp/maria --config.total_steps=200
         After training, the final model is evaluated on config.eval.split (config.eval.at_end).
  eval   Evaluate checkpoints of a run (tiktalk_jax/evaluate.py): generations and scores files
         in the workdir, scalars to its TensorBoard. The config defaults to DIR/config.json:
           python -m tiktalk_jax.main --mode=eval --workdir=/tmp/maria [--eval_split=test] \
               [--checkpoint_step=latest|all|N] [--skip_meteor]
  demo   The bundled sample end to end (`run_demo`): generate the synthetic release, build both
         TFDS configs, extract features with tiny RANDOM-INIT encoders, retrieve knowledge
         (lexical encoder), train the tiny T+V+A+K and T Maria, evaluate both on the test split
         and print the score tables (per reply kind too), generations next to their
         references, and where the TensorBoard logs and plots are. In --workdir:
           DIR/raw/       the sample release (raw layout of tfds_builder/tiktalk/README.md)
           DIR/data/      the TFDS data_dir (tiktalk/dialogues/..., tiktalk/media/...,
                          features/{frames,audio}, dialogues' vocab.txt and knowledge/)
           DIR/runs/<v>/  one run per variant: checkpoints, tensorboard/, scores, generations
           DIR/compare.*  the comparison table (markdown, csv) and plots
  build  Build one TFDS config from a release: --manual_dir=... --data_dir=... --tfds_config=...
  compare  Tabulate and plot the scores of every evaluated checkpoint of one or more runs
         (tiktalk_jax/compare.py); --workdir once per run, files into --out (default: the first):
           python -m tiktalk_jax.main --mode=compare --workdir=runs/t --workdir=runs/tvak

`make demo` runs `--mode=demo --workdir=demo_out`.

Multi-host (launch/README.md): every host runs the same command; `--distributed=auto` (the
default) calls `jax.distributed.initialize` when SLURM, a multi-host TPU environment or the
flags below say the job has several processes (tiktalk_jax/distributed.py):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]
Only process 0 writes config.json, metrics.jsonl, summaries and eval files; checkpoints by all
processes into the shared workdir (a shared file system or gs://). Resuming on another host
count restores model and optimizer state and stops at the data iterator unless
`--data_resume=restart`.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_MODES = ("train", "eval", "demo", "build", "compare")

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "train", _MODES, "What to run.")
flags.DEFINE_multi_string(
    "workdir", None, "Directory for everything the run writes (given once; compare: once per run)."
)
config_flags.DEFINE_config_file(
    "config", None, "train: config file, path.py[:arg].", lock_config=True
)
flags.DEFINE_string("manual_dir", None, "build: the raw release directory.")
flags.DEFINE_string("data_dir", None, "build: the TFDS data_dir (default: WORKDIR/data).")
flags.DEFINE_string("tfds_config", "dialogues", "build: the TFDS config, dialogues or media.")
flags.DEFINE_integer("sample_seed", 0, "demo: seed of the generated sample release.")
flags.DEFINE_integer("demo_steps", None, "demo: train steps per variant (default DEMO_STEPS).")
flags.DEFINE_string("eval_split", None, "eval: the split (default: config.eval.split).")
flags.DEFINE_string("checkpoint_step", "latest", "eval: 'latest', 'all' or a step number.")
flags.DEFINE_bool(
    "skip_meteor", False, "train/eval/demo: no METEOR (needs Java); the scores file says so."
)
flags.DEFINE_string(
    "out", None, "compare: directory for the table and plot (default: 1st workdir)."
)
flags.DEFINE_enum(
    "distributed",
    "auto",
    ("auto", "on", "off"),
    "jax.distributed.initialize: auto (when the environment or the flags below name several "
    "processes), on (always; JAX detects the cluster), off.",
)
flags.DEFINE_string("coordinator_address", None, "Multi-process: process 0's HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_string(
    "local_device_ids", None, "Multi-process: comma-separated local devices of this process."
)
flags.DEFINE_enum(
    "data_resume", "exact", ("exact", "restart"),
    "train: resuming where the data iterator states do not fit (another host count or global "
    "batch size): exact stops with the reason, restart starts the iterators afresh.",
)  # fmt: skip


def _banner(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def build_dataset(manual_dir: str, data_dir: str, config: str) -> None:
    """Builds one TFDS config and prints its bad-input report (statistics included)."""
    import tensorflow_datasets as tfds

    from tfds_builder import tiktalk
    from tfds_builder.tiktalk import report

    tfds.disable_progress_bar()

    start = time.perf_counter()
    tiktalk.build(manual_dir, data_dir, config)
    seconds = time.perf_counter() - start
    _banner(f"tiktalk/{config}: built in {seconds:.1f} s")
    print(report.format_report(report.load_report(data_dir, config)), flush=True)


def show_examples(data_dir: str, split: str, count: int) -> None:
    """Prints a few records of the built dialogues dataset, read back through the pipeline's
    random-access reader (the same path training uses)."""
    from tiktalk_jax import input_pipeline

    source = input_pipeline.open_split(input_pipeline.dataset_dir(data_dir), split)
    _banner(f"tiktalk/dialogues[{split}]: {len(source)} records, the first {count}")

    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    for i in range(min(count, len(source))):
        record = source[i]
        print(f"  {text(record['dialogue_id'])}  title: {text(record['title'])}")
        for turn in record["context"]:
            print(f"    context : {text(turn)}")
        for reply in record["responses"]:
            print(f"    response: {text(reply)}")


# ---------------------------------------------------------------------------------------------
# The demo: the bundled sample end to end.
# ---------------------------------------------------------------------------------------------

DEMO_VARIANTS = ("tvak", "t")
# Enough for the tiny model to name colours and sounds and to start copying knowledge tails
# (docs/ablation.md: at 800 steps it barely copies; make demo takes 7 min 53 s on 2 cores).
DEMO_STEPS = 1600
# Tiny random-init encoders: their features separate the sample's colours and sounds once
# standardized (maria.StandardizedFeatures); 64-d frames also separate most shapes.
DEMO_ENCODERS = {
    "frames": ("resnet18", dict(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1],
                                layer_type="basic")),
    "audio": ("vggish", dict(conv_widths=[4, 4, 8, 8, 8, 8], fc_widths=[16, 16],
                             embedding_size=8)),
}  # fmt: skip
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extract_sample_features(data_dir: str) -> dict[str, tuple[str, int]]:
    """Features of every media split with the tiny RANDOM-INIT `DEMO_ENCODERS`:
    `{"frames" | "audio": (features dir, feature width)}` under `<data_dir>/features/`."""
    from tiktalk_jax import encoders, extract

    media = extract.media_dir(data_dir)
    sources = {s: extract.open_media(media, s) for s in extract.media_splits(media)}
    out = {}
    for table, (name, model_config) in DEMO_ENCODERS.items():
        encoder = encoders.build_encoder(name, model_config=model_config)
        directory = os.path.join(data_dir, "features", table)
        start = time.perf_counter()
        report = extract.extract_dataset(
            encoder, sources, directory, progress=False, media=dict(dir=media)
        )
        written = {s: r["written"] for s, r in report["splits"].items()}
        width = encoder.metadata["fields"]["features"]["shape"][-1]
        print(
            f"  {table}: {name} RANDOM-INIT (seed 0, {width}-d, no pretrained weights: smoke "
            f"features only) -> {directory}  videos {written}  "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
        out[table] = (directory, width)
    return out


def write_sample_vocab(raw_dir: str, data_dir: str) -> str:
    """The WordPiece vocab of the dialogues dataset, trained on the train split AND the
    knowledge graph's text (knowledge tails of val/test-only heads never occur in train
    dialogues: without them they would be [UNK]); written where the pipeline looks for it."""
    from tiktalk_jax import input_pipeline
    from tiktalk_jax import tokenizer as tokenizer_lib
    from tiktalk_jax.knowledge import c3kg

    version_dir = input_pipeline.dataset_dir(data_dir)
    kg = c3kg.read_tsv(os.path.join(raw_dir, "knowledge.tsv"))
    extra = list(kg.heads) + [";".join(ts) for groups in kg.tails for ts in groups.values()]
    texts = tokenizer_lib.dialogue_texts(input_pipeline.open_split(version_dir, "train"), extra)
    path = os.path.join(version_dir, tokenizer_lib.VOCAB_FILENAME)
    tokenizer_lib.write_vocab(tokenizer_lib.train_wordpiece_vocab(texts), path)
    return path


def prepare_sample_knowledge(raw_dir: str, data_dir: str) -> str:
    """Knowledge side tables of every split (lexical retrieval over knowledge.tsv)."""
    from tiktalk_jax import input_pipeline
    from tiktalk_jax.knowledge import prepare

    prepare.main(
        [f"--data_dir={data_dir}", f"--kg={os.path.join(raw_dir, 'knowledge.tsv')}",
         "--encoder=lexical", "--no_progress"]
    )  # fmt: skip
    return os.path.join(input_pipeline.dataset_dir(data_dir), "knowledge")


def sample_config(variant: str, workdir: str, features: dict[str, tuple[str, int]], steps: int):
    """The tiny Maria config of `variant` over the demo's sample data in `workdir`."""
    import sys

    if _REPO not in sys.path:
        sys.path.insert(0, _REPO)  # configs/ is a top-level directory of the repo
    from configs import maria as maria_config

    (frames_dir, frame_dim), (audio_dir, audio_dim) = features["frames"], features["audio"]
    config = maria_config.get_config(
        f"variant={variant},size=tiny,data_dir={os.path.join(workdir, 'data')},"
        f"frames_dir={frames_dir},audio_dir={audio_dir},frame_dim={frame_dim},"
        f"audio_dim={audio_dim},kinds_file={os.path.join(workdir, 'raw', 'sample_kinds.json')}"
    )
    config.total_steps = steps
    config.checkpoint_every = steps
    config.log_every = max(1, min(100, steps // 4))
    config.optim.warmup_steps = max(1, min(config.optim.warmup_steps, steps // 10))
    return config


def train_and_evaluate_variant(
    config, run_dir: str, skip_meteor: bool | None = None, datasets=None
):
    """Trains `config` in `run_dir` (on `datasets` when given, else the config's) and evaluates
    the final model on config.eval.split."""
    from tiktalk_jax import evaluate, train

    start = time.perf_counter()
    result = train.train_and_evaluate(config, run_dir, datasets=datasets)
    trained = time.perf_counter() - start
    (scores,) = evaluate.evaluate(
        config, run_dir, model=result.model, model_step=result.step, skip_meteor=skip_meteor
    )
    return scores, trained, time.perf_counter() - start - trained


def print_generations(runs: dict[str, str], per_kind: int = 1) -> None:
    """Hypotheses of each run next to the references, `per_kind` dialogues of every kind."""
    import json

    lines = {}
    for name, path in runs.items():
        with open(path, encoding="utf-8") as f:
            lines[name] = {g["dialogue_id"]: g for g in map(json.loads, f)}
    first = next(iter(lines.values()))
    shown: dict[str, int] = {}
    for dialogue_id, g in first.items():
        kind = g.get("kind") or "-"
        if shown.get(kind, 0) >= per_kind:
            continue
        shown[kind] = shown.get(kind, 0) + 1
        print(f"  [{kind}] context: {' / '.join(g['context'])}")
        for name, by_id in lines.items():
            print(f"    {name:>8}: {by_id[dialogue_id]['hypothesis'] or '<empty>'}")
        print(f"    {'refs':>8}: {' | '.join(g['references'][:3])}")


def prepare_sample(workdir: str, seed: int) -> dict[str, tuple[str, int]]:
    """Everything the sample runs read, in `workdir`: the release (raw/), both TFDS configs,
    random-init features, knowledge side tables and the vocab (data/). Returns the features
    (`extract_sample_features`)."""
    from tiktalk_jax import sample

    raw_dir = os.path.join(workdir, "raw")
    data_dir = os.path.join(workdir, "data")
    _banner(f"Generating the bundled sample release in {raw_dir}")
    summary = sample.write_sample(raw_dir, seed=seed)
    for split, counts in summary["splits"].items():
        print(f"  {split}: {counts}")
    print(f"  knowledge.tsv rows: {summary['knowledge_rows']}")
    print(f"  deliberately bad items: {summary['bad']}")
    for config in ("dialogues", "media"):
        build_dataset(raw_dir, data_dir, config)
    show_examples(data_dir, split="test", count=3)

    _banner("Features: tiny RANDOM-INIT encoders (no pretrained weights exist offline)")
    features = extract_sample_features(data_dir)
    _banner("Knowledge: lexical retrieval over knowledge.tsv; vocabulary")
    prepare_sample_knowledge(raw_dir, data_dir)
    print(f"  vocab (train split + knowledge text): {write_sample_vocab(raw_dir, data_dir)}")
    return features


ABLATION_KINDS = ("vision", "audio", "knowledge", "text")
ABLATION_METRICS = ("bleu2", "rouge_l", "cider", "recall@1", "mean_rank")


def print_ablation(results: dict[str, object]) -> None:
    """Per reply kind, the variants side by side; `*` marks the best (mean_rank: lowest)."""
    variants = list(results)
    print(f"  {'kind':<10}{'metric':<10}" + "".join(f"{v.upper():>9}" for v in variants))
    for kind in ABLATION_KINDS:
        for m in ABLATION_METRICS:
            values = [results[v].scores["per_kind"].get(kind, {}).get(m) for v in variants]
            if any(x is None for x in values):
                continue
            best = (min if m == "mean_rank" else max)(values)
            cells = "".join(f"{x:>8.1f}{'*' if x == best else ' '}" for x in values)
            print(f"  {kind:<10}{m:<10}{cells}")


def run_demo(
    workdir: str,
    seed: int,
    *,
    steps: int | None = None,
    variants: tuple[str, ...] = DEMO_VARIANTS,
    skip_meteor: bool | None = None,
) -> dict[str, object]:
    """The end-to-end demo on the bundled sample (see the module docstring).

    `steps` (default `DEMO_STEPS`) trains each variant; tests pass a few. Returns the scores
    of each variant's final model.
    """
    from tiktalk_jax import compare

    steps = DEMO_STEPS if steps is None else steps
    features = prepare_sample(workdir, seed)
    results, runs = {}, {}
    for variant in variants:
        run_dir = os.path.join(workdir, "runs", variant)
        _banner(f"Maria {variant.upper()} (tiny): {steps} steps, then eval on test")
        config = sample_config(variant, workdir, features, steps)
        scores, trained, evaluated = train_and_evaluate_variant(config, run_dir, skip_meteor)
        print(f"  trained in {trained:.0f} s, evaluated in {evaluated:.0f} s -> {run_dir}")
        results[variant], runs[variant] = scores, run_dir

    _banner("Scores on the sample test split (x100; mean_rank: 1 is best)")
    comparison = compare.compare(list(runs.values()), out=workdir)
    print(comparison.text, flush=True)
    _banner("Per reply kind: does each kind's source of information help? (* = best)")
    print_ablation(results)
    print("  docs/ablation.md: every variant, 800 and 1600 steps, and how the sample makes "
          "knowledge something only the retrieved C3KG text can give")  # fmt: skip
    _banner("Generations next to references (test split)")
    print_generations({v: r.generations_path for v, r in results.items()})
    _banner("Done")
    data_dir = os.path.join(workdir, "data")
    print(f"Dataset: {data_dir}/tiktalk/{{dialogues,media}}; reports: build_report.json there.")
    print(f"Scores and generations: {os.path.join(workdir, 'runs', '<variant>')}/"
          "scores_test_step*.json, generations_test_step*.jsonl")  # fmt: skip
    print(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'runs')}")
    plots = [p for k, p in comparison.files.items() if k.startswith("plot:")]
    print(f"Comparison: {', '.join([comparison.files['markdown'], *plots])}")
    return results


def _evaluate(config, workdir: str, **kwargs) -> None:
    from tiktalk_jax import evaluate

    results = evaluate.evaluate(
        config, workdir, split=FLAGS.eval_split, skip_meteor=FLAGS.skip_meteor or None, **kwargs
    )
    for r in results:
        if r.scores is not None:
            print(evaluate.format_scores(r.scores), flush=True)
            print(f"  {r.scores_path}\n  {r.generations_path}", flush=True)


def start_distributed() -> bool:
    """`distributed.initialize` from the flags (before anything touches a device)."""
    from tiktalk_jax import distributed

    return distributed.initialize(
        FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        local_device_ids=FLAGS.local_device_ids,
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if FLAGS.mode == "compare":
        from tiktalk_jax import compare

        logging.set_verbosity(logging.WARNING)
        try:
            result = compare.compare(FLAGS.workdir, out=FLAGS.out)
        except compare.NoScoresError as e:
            raise SystemExit(f"--mode=compare: {e}") from None
        print(result.text, flush=True)
        return
    if len(FLAGS.workdir) > 1:
        raise app.UsageError(
            f"--mode={FLAGS.mode} takes one --workdir, got {len(FLAGS.workdir)}: {FLAGS.workdir}"
        )
    workdir = FLAGS.workdir[0]
    if FLAGS.mode in ("train", "eval"):
        start_distributed()
    if FLAGS.mode == "train":
        if FLAGS.config is None:
            raise app.UsageError("--mode=train needs --config=path.py[:arg]")
        from tiktalk_jax import train

        logging.set_verbosity(logging.INFO)
        result = train.train_and_evaluate(FLAGS.config, workdir, data_resume=FLAGS.data_resume)
        if FLAGS.config.get("eval", {}).get("at_end") and not result.preempted:
            _evaluate(FLAGS.config, workdir, model=result.model, model_step=result.step)
        return
    if FLAGS.mode == "eval":
        from tiktalk_jax import evaluate

        logging.set_verbosity(logging.INFO)
        config = FLAGS.config if FLAGS.config is not None else evaluate.load_config(workdir)
        step = FLAGS.checkpoint_step
        _evaluate(config, workdir, steps=int(step) if step.isdigit() else step)
        return
    logging.set_verbosity(logging.WARNING)
    if FLAGS.mode == "demo":
        run_demo(
            workdir,
            FLAGS.sample_seed,
            steps=FLAGS.demo_steps,
            skip_meteor=FLAGS.skip_meteor or None,
        )
    elif FLAGS.mode == "build":
        if not FLAGS.manual_dir:
            raise app.UsageError("--mode=build needs --manual_dir")
        data_dir = FLAGS.data_dir or os.path.join(workdir, "data")
        build_dataset(FLAGS.manual_dir, data_dir, FLAGS.tfds_config)


if __name__ == "__main__":
    app.run(main)
