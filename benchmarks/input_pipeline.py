"""Input pipeline throughput (examples/s) for the dialogues config on this machine.

    .venv/bin/python benchmarks/input_pipeline.py                      # synthetic ArrayRecord set
    .venv/bin/python benchmarks/input_pipeline.py --data_dir=DATA_DIR  # a built tiktalk/dialogues

Without --data_dir, a synthetic `dialogues` dataset with the builder's feature spec is written
to ArrayRecord through TFDS (read back with `tfds` data sources exactly as the real one), sized
like TikTalk's text: 1 + Poisson(0.25) context turns plus one response (2.25 turns on average)
of ~16 characters drawn from 3,000 common CJK characters, with some Latin, digits and punctuation.

Measures, each for --seconds after a warm-up, in --rounds interleaved rounds (median and best):
  read/*        records/s of the data source alone (`__getitems__` batches): the TFDS decoder
                ("tfds") and the pipeline's `TextRecords` reader ("fast_text").
  format/*      the dialogue_text formatter on in-memory records, tokenizing a batch of strings
                in one Rust call without offsets ("batch", what the pipeline uses: the Rust
                `encode_batch_fast`), the same with offsets ("batch_with_offsets",
                `encode_batch`), one Rust call per string ("per_string"), or through the HF
                tokenizer's __call__ ("hf_call").
  pipeline/*    the full training pipeline (read, shuffle, format, batch) with 0 worker processes
                (and 0 or 1 prefetch threads), with --workers grain worker processes, and with
                the TFDS decoder for comparison.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiktalk_jax import input_pipeline as ip  # noqa: E402
from tiktalk_jax import tokenizer as tokenizer_lib  # noqa: E402

_LATIN = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["233", "ok", "hhh", "666"]
_PUNCT = list("，。！？…~")


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Dialogues with TikTalk-like lengths (see the module docstring)."""
    rng = np.random.default_rng(seed)
    cjk = [chr(c) for c in rng.choice(np.arange(0x4E00, 0x9FA5), size=3000, replace=False)]
    # Zipf-like character frequencies, as in real text.
    p = 1.0 / np.arange(1, len(cjk) + 1)
    p /= p.sum()

    def utterance() -> str:
        k = max(1, int(rng.gamma(2.0, 8.0)))  # mean 16 characters
        chars = list(rng.choice(cjk, size=k, p=p))
        if rng.random() < 0.2:
            chars.insert(int(rng.integers(0, k)), str(rng.choice(_LATIN)))
        if rng.random() < 0.5:
            chars.append(str(rng.choice(_PUNCT)))
        return "".join(chars)

    records = []
    for i in range(n):
        vid = f"{7_000_000 + i // 8}"
        records.append(
            dict(
                dialogue_id=f"{vid}/{i}",
                video_id=vid,
                title=utterance(),
                category="生活",
                context=[utterance() for _ in range(1 + rng.poisson(0.25))],
                responses=[utterance()],
                emoticons=[],
            )
        )
    return records


def build_arrayrecord(records: list[dict], data_dir: str):
    """Writes `records` as a TFDS ArrayRecord dataset with the dialogues feature spec."""
    import tensorflow_datasets as tfds

    class SyntheticDialogues(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    dict(
                        dialogue_id=text,
                        video_id=text,
                        title=text,
                        category=text,
                        context=tfds.features.Sequence(text),
                        responses=tfds.features.Sequence(text),
                        emoticons=tfds.features.Sequence(text),
                    )
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for r in records:
                yield r["dialogue_id"], r

    builder = SyntheticDialogues(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source(split="train")


def rate(iterator, batch_size: int, seconds: float) -> float:
    """Examples/s of `iterator` (yielding batches of `batch_size`) over about `seconds`."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        n += batch_size
    return n / (time.perf_counter() - start)


def measure(iterators: dict, batch_size: int, seconds: float, rounds: int) -> dict:
    """Interleaves `rounds` rounds over all iterators (other jobs on a shared machine come and
    go; interleaving spreads their load over every variant); returns name -> list of rates."""
    for it in iterators.values():  # warm-up: worker start, first batches, caches
        for _ in range(3):
            next(it)
    rates = {name: [] for name in iterators}
    for _ in range(rounds):
        for name, it in iterators.items():
            rates[name].append(rate(it, batch_size, seconds / rounds))
    return rates


class WithOffsets(ip.DialogueText):
    def _encode(self, texts):
        batch = self.encoder.backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in batch]


class PerString(ip.DialogueText):
    def _encode(self, texts):
        backend = self.encoder.backend
        return [backend.encode(t, add_special_tokens=False).ids for t in texts]


class HFCall(ip.DialogueText):
    def __init__(self, config, tokenizer, *, train):
        super().__init__(config, tokenizer, train=train)
        self.hf = tokenizer

    def _encode(self, texts):
        return self.hf(texts, add_special_tokens=False)["input_ids"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None, help="a TFDS data dir with tiktalk/dialogues")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_examples", type=int, default=50_000, help="synthetic set size")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per variant, all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to write the synthetic dataset")
    args = parser.parse_args()

    import grain
    import jax
    import tensorflow_datasets as tfds
    import tokenizers
    import transformers

    print(f"date     {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine  {platform.node()} {platform.processor() or platform.machine()}")
    print(f"cpus     {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})")
    print(f"python   {platform.python_version()}  jax {jax.__version__}  grain {grain.__version__}")
    print(
        f"tfds     {tfds.__version__}  transformers {transformers.__version__}  "
        f"tokenizers {tokenizers.__version__}"
    )

    workdir = args.workdir or tempfile.mkdtemp(prefix="tiktalk_pipeline_bench_")
    t0 = time.perf_counter()
    if args.data_dir:
        version_dir = ip.dataset_dir(args.data_dir, "tiktalk/dialogues")
        tfds_source = tfds.builder_from_directory(version_dir).as_data_source(split=args.split)
        print(f"data     {version_dir} split={args.split}: {len(tfds_source)} dialogues")
    else:
        data_dir = os.path.join(workdir, f"synthetic_{args.num_examples}")
        tfds_source = build_arrayrecord(synthetic_records(args.num_examples), data_dir)
        took = time.perf_counter() - t0
        print(f"data     synthetic ArrayRecord, {len(tfds_source)} dialogues ({took:.0f}s)")
    readers = {"fast_text": ip.TextRecords(tfds_source), "tfds": tfds_source}
    source = readers["fast_text"]
    texts = lambda: tokenizer_lib.dialogue_texts(source)
    tok = tokenizer_lib.load_tokenizer(None, os.path.join(workdir, "vocab"), texts=texts)
    turns = [len(source[i]["context"]) + 1 for i in range(min(len(source), 2000))]
    print(f"vocab    {len(tok)} tokens; mean turns (context + response) {np.mean(turns):.2f}")

    bs = args.batch_size
    cfg = ip.default_config()
    iterators = {}

    def read_iter(src):
        for start in range(0, 10**12, bs):
            yield src.__getitems__([(start + j) % len(src) for j in range(bs)])

    for reader, src in readers.items():
        iterators[f"read/{reader}"] = read_iter(src)

    records = [dict(r) for r in source.__getitems__(list(range(min(len(source), 4096))))]

    def fmt_iter(fmt):
        for start in range(0, 10**12, bs):
            yield fmt([records[(start + j) % len(records)] for j in range(bs)])

    for name, cls in (
        ("batch", ip.DialogueText),
        ("batch_with_offsets", WithOffsets),
        ("per_string", PerString),
        ("hf_call", HFCall),
    ):
        iterators[f"format/{name}"] = fmt_iter(cls(cfg, tok, train=True))

    fmt = ip.get_formatter("dialogue_text", cfg, tok, train=True)
    runs = [("fast_text", 0, 0), ("fast_text", 0, 1), ("tfds", 0, 0)]
    if args.workers:
        runs.append(("fast_text", args.workers, 0))
    for reader, workers, threads in runs:
        ds = ip.train_dataset(
            readers[reader],
            fmt,
            global_batch_size=bs,
            seed=0,
            process_index=0,
            process_count=1,
            num_workers=workers,
            read_threads=threads,
        )
        iterators[f"pipeline/{reader},workers={workers},threads={threads}"] = iter(ds)

    rates = measure(iterators, bs, args.seconds, args.rounds)
    for it in iterators.values():
        if hasattr(it, "close"):
            it.close()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"batch    {bs}; {args.rounds} interleaved rounds of {args.seconds / args.rounds:.1f}s")
    print(f"load     {load} (1/5/15 min) at the end")
    print(f"{'examples/s':42s} {'median':>10s} {'best':>10s}")
    for name, values in rates.items():
        print(f"{name:42s} {np.median(values):10,.0f} {max(values):10,.0f}")


if __name__ == "__main__":
    main()
