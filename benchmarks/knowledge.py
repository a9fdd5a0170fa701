"""Knowledge retrieval throughput: heads encoded/s and retrieval queries/s on this machine.

    .venv/bin/python benchmarks/knowledge.py                  # defaults below, CPU
    .venv/bin/python benchmarks/knowledge.py --heads=1000000 --index_heads=1000000   # accelerator

Synthetic C3KG-like heads ("PersonX " + a 4-12 character phrase of Zipf-distributed CJK
characters) and dialogue queries (~16 characters, TikTalk's average utterance). Measured:

  encode/lexical        LexicalEncoder.fit + encode of --heads heads (heads/s).
  encode/bert-tiny      SentenceEncoder (random-init BERT, 2 layers x 128, mean pooling, normalise,
                        max_seq_length 64) on --bert_heads heads, after a warm-up that compiles
                        every length bucket (heads/s; compile time reported apart).
  encode/bert-base      the same at bert-base-chinese size (12 layers x 768): what a Chinese SBERT
                        costs per head.
  search/d768           HeadIndex.search over --index_heads random vectors of width 768 (SBERT-base)
                        sharded over all local devices, k=3, --queries queries (queries/s,
                        compile excluded).
  retrieve/lexical      KnowledgeRetriever.retrieve end to end (query encoding, title vectors,
                        search, knowledge text) over --queries dialogues against --heads heads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiktalk_jax.knowledge import c3kg, retrieval  # noqa: E402
from tiktalk_jax.knowledge.sentence_encoder import LexicalEncoder, SentenceEncoder  # noqa: E402
from tiktalk_jax.models import bert  # noqa: E402


def _chars(rng: np.random.Generator, n: int = 3000):
    cjk = [chr(c) for c in rng.choice(np.arange(0x4E00, 0x9FA5), size=n, replace=False)]
    p = 1.0 / np.arange(1, n + 1)
    return cjk, p / p.sum()


def synthetic_heads(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    cjk, p = _chars(rng)
    lengths = rng.integers(4, 13, size=n)
    return ["PersonX " + "".join(rng.choice(cjk, size=k, p=p)) for k in lengths]


def synthetic_dialogues(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    cjk, p = _chars(rng)

    def text(mean: float) -> str:
        return "".join(rng.choice(cjk, size=max(1, int(rng.gamma(2.0, mean / 2))), p=p))

    titles = [text(10) for _ in range(max(1, n // 10))]
    return [
        {
            "dialogue_id": str(i),
            "title": titles[i % len(titles)],
            "context": [text(16) for _ in range(1 + int(rng.poisson(0.25)))],
        }
        for i in range(n)
    ]


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def bench_lexical(heads: list[str]) -> dict:
    start = time.perf_counter()
    enc = LexicalEncoder.fit(heads)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    enc.encode(heads)
    seconds = time.perf_counter() - start
    return dict(
        heads=len(heads), dim=enc.dim, fit_s=round(fit, 2), heads_per_s=_rate(len(heads), seconds)
    )


def bench_bert(heads: list[str], hidden: int, layers: int, batch_size: int) -> dict:
    from tiktalk_jax import tokenizer as tokenizer_lib

    vocab = tokenizer_lib.train_wordpiece_vocab(heads[:20000], vocab_size=8000)
    config = bert.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
    )
    enc = SentenceEncoder.random_init(vocab, config, max_seq_length=64)
    # Warm-up: every length bucket the heads fall in, at the full batch size.
    start = time.perf_counter()
    enc.encode(heads[: batch_size * 8], batch_size=batch_size)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    enc.encode(heads, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return dict(
        heads=len(heads),
        hidden=hidden,
        layers=layers,
        batch_size=batch_size,
        compiles=enc.num_compiles,
        warmup_s=round(compile_s, 2),
        heads_per_s=_rate(len(heads), seconds),
    )


def bench_search(n_heads: int, dim: int, n_queries: int, k: int = 3) -> dict:
    rng = np.random.default_rng(0)
    heads = rng.normal(size=(n_heads, dim)).astype(np.float32)
    queries = rng.normal(size=(n_queries, dim)).astype(np.float32)
    start = time.perf_counter()
    index = retrieval.HeadIndex(heads, query_chunk=256)
    index.search(queries[:1], k)  # compile
    setup = time.perf_counter() - start
    start = time.perf_counter()
    index.search(queries, k)
    seconds = time.perf_counter() - start
    return dict(
        heads=n_heads,
        dim=dim,
        devices=index.mesh.size,
        block=index.block,
        setup_s=round(setup, 2),
        queries_per_s=_rate(n_queries, seconds),
    )


def bench_retrieve(heads: list[str], n_queries: int) -> dict:
    kg = c3kg.from_triples((h, "xAttr", f"t{i}") for i, h in enumerate(heads))
    enc = LexicalEncoder.fit(kg.heads)
    retriever = retrieval.KnowledgeRetriever(kg, enc, retrieval.RetrievalConfig(k=3))
    dialogues = synthetic_dialogues(n_queries)
    retriever.retrieve(dialogues[:8])  # compile
    start = time.perf_counter()
    retriever.retrieve(dialogues)
    seconds = time.perf_counter() - start
    return dict(heads=len(heads), dim=enc.dim, queries_per_s=_rate(n_queries, seconds))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=20000, help="lexical and retrieve KG size")
    p.add_argument("--bert_heads", type=int, default=2048, help="heads for the BERT encoders")
    p.add_argument("--base_heads", type=int, default=256, help="heads for bert-base size")
    p.add_argument("--index_heads", type=int, default=100000, help="search index size")
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    results = dict(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        backend=jax.default_backend(),
        devices=jax.local_device_count(),
    )
    heads = synthetic_heads(max(args.heads, args.bert_heads, args.base_heads))
    benches = [
        ("encode/lexical", lambda: bench_lexical(heads[: args.heads])),
        ("encode/bert-tiny", lambda: bench_bert(heads[: args.bert_heads], 128, 2, args.batch_size)),
        ("encode/bert-base", lambda: bench_bert(heads[: args.base_heads], 768, 12, 64)),
        ("search/d768", lambda: bench_search(args.index_heads, 768, args.queries)),
        ("retrieve/lexical", lambda: bench_retrieve(heads[: args.heads], args.queries)),
    ]
    for name, fn in benches:
        results[name] = fn()
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
