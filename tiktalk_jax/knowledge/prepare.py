r"""Writes the knowledge side table: retrieved knowledge text per dialogue_id, for every split.

    python -m tiktalk_jax.knowledge.prepare --data_dir=DATA --kg=knowledge.tsv \
        --encoder=/path/to/sbert-dir | lexical | random  [--k=3 --families=xAttr,xWant ...]

reads `tiktalk/dialogues` (the newest version under --data_dir) split by split through
`tfds.data_source`, retrieves knowledge for every dialogue (tiktalk_jax/knowledge/retrieval.py)
and writes, in --out_dir (default `<dataset version dir>/knowledge`):

  <split>.array_record   one JSON record per dialogue, in the split's order:
                         {"dialogue_id", "knowledge": "tail;tail;...", "heads": [...],
                          "scores": [...]}  (heads/scores: the kept heads, best first)
  <split>.keys.json      the dialogue ids in record order (the side-table join index)
  manifest.json          KG file and hash, encoder identity, options, per-split statistics

Training joins it by dialogue_id (`side_tables(out_dir, splits)` -> input_pipeline.SideTable), so
nothing is encoded during training. Head embeddings are cached in --cache_dir (default
`<dataset version dir>/knowledge_cache`) across runs with other retrieval options.

Encoders: a local sentence-transformers directory (a Chinese SBERT such as the one C3KG and
TikTalk used); `lexical`, the hashed character n-gram TF-IDF fallback (no weights needed; what the
bundled sample uses); or `random`, a random-init BERT whose vectors mean nothing (speed and
plumbing checks only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tiktalk_jax.knowledge import c3kg, retrieval, sentence_encoder

Record = Mapping[str, Any]
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# The side-table format.
# ---------------------------------------------------------------------------------------------


def table_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f"{split}.array_record")


def write_table(path: str, results: Sequence[dict[str, Any]] | Any) -> int:
    """Writes knowledge records (an iterable of dicts with "dialogue_id") as ArrayRecord + keys;
    atomically (temporary files renamed at the end). Returns the number of records."""
    from array_record.python import array_record_module

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".knowledge-", suffix=".array_record")
    os.close(fd)
    keys = []
    # group_size:1 makes every record its own chunk: random access reads one record, not a group.
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
        for r in results:
            keys.append(r["dialogue_id"])
            writer.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
    finally:
        writer.close()
    keys_file = path[: -len(".array_record")] + ".keys.json"
    with open(keys_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(keys, f, ensure_ascii=False)
    os.replace(tmp, path)
    os.replace(keys_file + ".tmp", keys_file)
    return len(keys)


class KnowledgeTable:
    """Random access to a written knowledge table: `table[i]` is the i-th record (a dict).

    Picklable (grain worker processes reopen the file by path).
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no knowledge table {path!r} (run python -m tiktalk_jax.knowledge.prepare)"
            )
        self.path = path
        self._source = None
        self._keys = None

    def _open(self):
        if self._source is None:
            from array_record.python import array_record_data_source

            self._source = array_record_data_source.ArrayRecordDataSource([self.path])
        return self._source

    def __getstate__(self):
        return {"path": self.path, "_source": None, "_keys": self._keys}

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> dict[str, Any]:
        return json.loads(self._open()[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self._open().__getitems__([int(i) for i in indices])]

    @property
    def keys(self) -> list[str]:
        """Dialogue ids in record order (from `<split>.keys.json`)."""
        if self._keys is None:
            with open(self.path[: -len(".array_record")] + ".keys.json", encoding="utf-8") as f:
                self._keys = json.load(f)
        return self._keys


def side_tables(
    out_dir: str, splits: Sequence[str], name: str = "knowledge"
) -> dict[str, list[Any]]:
    """split -> [input_pipeline.SideTable] joining the knowledge records on dialogue_id; the
    record appears as `record[name]` in the formatter."""
    from tiktalk_jax import input_pipeline

    out = {}
    for split in splits:
        table = KnowledgeTable(table_path(out_dir, split))
        out[split] = [
            input_pipeline.SideTable(name=name, source=table, key="dialogue_id", keys=table.keys)
        ]
    return out


# ---------------------------------------------------------------------------------------------
# Preparation.
# ---------------------------------------------------------------------------------------------


def prepare_split(
    records: Sequence[Record],
    retriever: retrieval.KnowledgeRetriever,
    path: str,
    *,
    progress: bool = False,
    desc: str = "knowledge",
) -> dict[str, Any]:
    """Retrieves knowledge for `records` and writes the table at `path`; returns statistics."""
    start = time.perf_counter()
    stats = dict(dialogues=0, with_knowledge=0, heads=0, top1_score_sum=0.0)

    def counted():
        for r in retriever.iter_retrieve(records, progress=progress, desc=desc):
            stats["dialogues"] += 1
            stats["with_knowledge"] += bool(r["knowledge"])
            stats["heads"] += len(r["heads"])
            stats["top1_score_sum"] += r["scores"][0] if r["scores"] else 0.0
            yield r

    write_table(path, counted())
    n = max(stats["dialogues"], 1)
    return dict(
        dialogues=stats["dialogues"],
        with_knowledge=stats["with_knowledge"],
        mean_heads=stats["heads"] / n,
        mean_top1_score=stats["top1_score_sum"] / n,
        seconds=round(time.perf_counter() - start, 3),
    )


def prepare(
    sources: Mapping[str, Sequence[Record]],
    retriever: retrieval.KnowledgeRetriever,
    out_dir: str,
    *,
    progress: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes one table per split of `sources` and `manifest.json`; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = retriever.config
    manifest: dict[str, Any] = dict(
        kg=retriever.kg.source,
        kg_sha256=retriever.kg.sha256,
        kg_report=retriever.kg.report.summary(),
        heads_indexed=int(len(retriever.head_ids)),
        encoder=retriever.encoder.identity,
        config={**vars(cfg), "families": list(retriever.families)},
        splits={},
        **(extra or {}),
    )
    for split, records in sources.items():
        path = table_path(out_dir, split)
        manifest["splits"][split] = prepare_split(
            records, retriever, path, progress=progress, desc=f"knowledge {split}"
        )
        logging.info("knowledge %s: %s", split, manifest["splits"][split])
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    return manifest


def make_encoder(
    spec: str,
    kg: c3kg.KnowledgeGraph,
    *,
    lexical_dim: int = 2048,
    random_hidden: int = 256,
    random_layers: int = 4,
) -> sentence_encoder.Encoder:
    """`--encoder`: "lexical", "random" or a sentence-transformers directory."""
    if spec == "lexical":
        return sentence_encoder.LexicalEncoder.fit(kg.heads, max_dim=lexical_dim)
    if spec == "random":
        from tiktalk_jax import tokenizer as tokenizer_lib
        from tiktalk_jax.models import bert

        texts = list(kg.heads) + [t for groups in kg.tails for ts in groups.values() for t in ts]
        vocab = tokenizer_lib.train_wordpiece_vocab(texts, vocab_size=8000)
        config = bert.BertConfig(
            hidden_size=random_hidden,
            num_hidden_layers=random_layers,
            num_attention_heads=max(1, random_hidden // 64),
            intermediate_size=4 * random_hidden,
        )
        logging.warning("--encoder=random: random-init BERT, retrieval results are meaningless")
        return sentence_encoder.SentenceEncoder.random_init(vocab, config)
    if os.path.isdir(spec):
        return sentence_encoder.SentenceEncoder.from_pretrained(spec)
    raise ValueError(f"--encoder must be lexical, random or a local directory; got {spec!r}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = retrieval.RetrievalConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    p.add_argument("--dataset", default="tiktalk/dialogues")
    p.add_argument("--splits", default="", help="comma-separated (default: every split)")
    p.add_argument("--kg", required=True, help="knowledge TSV (head, relation, tail)")
    p.add_argument("--encoder", required=True, help="sentence-transformers dir | lexical | random")
    p.add_argument("--out_dir", default=None, help="default: <dataset version dir>/knowledge")
    p.add_argument("--cache_dir", default=None, help="default: <version dir>/knowledge_cache")
    p.add_argument("--k", type=int, default=defaults.k)
    p.add_argument("--families", default="", help="comma-separated families (default: all)")
    p.add_argument("--threshold", type=float, default=defaults.threshold)
    p.add_argument("--title_mode", default=defaults.title_mode, choices=retrieval.TITLE_MODES)
    p.add_argument("--title_weight", type=float, default=defaults.title_weight)
    p.add_argument("--max_context_turns", type=int, default=defaults.max_context_turns)
    p.add_argument("--max_tails_per_head", type=int, default=defaults.max_tails_per_head)
    p.add_argument("--batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--lexical_dim", type=int, default=2048)
    p.add_argument("--random_hidden", type=int, default=256)
    p.add_argument("--random_layers", type=int, default=4)
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import tensorflow_datasets as tfds

    from tiktalk_jax import input_pipeline

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    version_dir = input_pipeline.dataset_dir(args.data_dir, args.dataset)
    splits = [s for s in args.splits.split(",") if s]
    if not splits:
        splits = sorted(tfds.builder_from_directory(version_dir).info.splits.keys())
    kg = c3kg.read_tsv(args.kg)
    print(f"{args.kg}: {len(kg.heads)} heads, {kg.report.summary()}", flush=True)
    encoder = make_encoder(
        args.encoder,
        kg,
        lexical_dim=args.lexical_dim,
        random_hidden=args.random_hidden,
        random_layers=args.random_layers,
    )
    config = retrieval.RetrievalConfig(
        k=args.k,
        families=tuple(f for f in args.families.split(",") if f) or None,
        threshold=args.threshold,
        title_mode=args.title_mode,
        title_weight=args.title_weight,
        max_context_turns=args.max_context_turns,
        max_tails_per_head=args.max_tails_per_head,
        batch_size=args.batch_size,
    )
    progress = not args.no_progress
    retriever = retrieval.KnowledgeRetriever(
        kg,
        encoder,
        config,
        cache_dir=args.cache_dir or os.path.join(version_dir, "knowledge_cache"),
        progress=progress,
    )
    out_dir = args.out_dir or os.path.join(version_dir, "knowledge")
    sources = {s: input_pipeline.open_split(version_dir, s) for s in splits}
    manifest = prepare(
        sources, retriever, out_dir, progress=progress, extra=dict(dataset_dir=version_dir)
    )
    for split, stats in manifest["splits"].items():
        print(f"{split}: {json.dumps(stats)}", flush=True)
    print(f"Knowledge tables: {out_dir}", flush=True)
    return manifest


if __name__ == "__main__":
    main()
