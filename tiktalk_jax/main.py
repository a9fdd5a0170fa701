r"""The entry point: `python -m tiktalk_jax.main [--mode=MODE] --workdir=DIR [--config=...]`.

Modes:
  train  (default) Train and periodically evaluate the model of --config; restarting the same
         command in the same workdir resumes. Configs are `get_config(arg)` files:
           python -m tiktalk_jax.main --config=configs/maria.py:variant=tvak,size=tiny \
               --workdir=/tmp/maria --config.total_steps=200
  demo   Generate the bundled synthetic sample release, build both TFDS configs from it and
         print the dataset statistics and the bad-input report. Everything lands in --workdir:
           DIR/raw/    the sample release (raw layout of tfds_builder/tiktalk/README.md)
           DIR/data/   the TFDS data_dir (tiktalk/dialogues/..., tiktalk/media/...)
  build  Build one TFDS config from a release: --manual_dir=... --data_dir=... --tfds_config=...
  compare  Tabulate and plot the scores of every evaluated checkpoint of one or more runs
         (tiktalk_jax/compare.py); --workdir once per run, files into --out (default: the first):
           python -m tiktalk_jax.main --mode=compare --workdir=runs/t --workdir=runs/tvak

`make demo` runs `--mode=demo --workdir=demo_out`.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_MODES = ("train", "demo", "build", "compare")

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
flags.DEFINE_string(
    "out", None, "compare: directory for the table and plot (default: 1st workdir)."
)


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


def run_demo(workdir: str, seed: int) -> None:
    """The end-to-end demo on the bundled sample (grows with each milestone)."""
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
    _banner("Done")
    print(f"Dataset: {data_dir}/tiktalk/{{dialogues,media}}; reports: build_report.json there.")


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
    if FLAGS.mode == "train":
        if FLAGS.config is None:
            raise app.UsageError("--mode=train needs --config=path.py[:arg]")
        from tiktalk_jax import train

        logging.set_verbosity(logging.INFO)
        train.train_and_evaluate(FLAGS.config, workdir)
        return
    logging.set_verbosity(logging.WARNING)
    if FLAGS.mode == "demo":
        run_demo(workdir, FLAGS.sample_seed)
    elif FLAGS.mode == "build":
        if not FLAGS.manual_dir:
            raise app.UsageError("--mode=build needs --manual_dir")
        data_dir = FLAGS.data_dir or os.path.join(workdir, "data")
        build_dataset(FLAGS.manual_dir, data_dir, FLAGS.tfds_config)


if __name__ == "__main__":
    app.run(main)
