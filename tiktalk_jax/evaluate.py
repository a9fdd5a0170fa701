r"""Evaluation of a trained checkpoint: generate for a split, score, write, log.

    python -m tiktalk_jax.main --mode=eval --workdir=DIR [--eval_split=test]
        [--checkpoint_step=latest|all|N] [--skip_meteor] [--config=... (default DIR/config.json)]

For each evaluated checkpoint (step N) and split, in the workdir (process 0 writes):

  generations_<split>_step<N>.jsonl  one line per dialogue: dialogue_id, video_id, context,
                                     references, hypothesis, best_reference_rank (retrieval) and
                                     kind (when reply kinds are known, e.g. the bundled sample)
  scores_<split>_step<N>.json        {"split", "step", "num_examples", "nlg_scores",
                                     "retrieval", "per_kind": {kind: {...}}, "metadata"}
  tensorboard/, metrics.jsonl        the same scalars as `<split>/<metric>` and
                                     `<split>/<kind>/<metric>` at step N (clu metric_writers)

What runs:
  * the model family (`config.model.name`) is built as the train loop builds it, sharded on the
    config's mesh, and its trainable params and model state are restored from the checkpoint
    (read-only: a concurrent training run is never disturbed); the frozen parameters are
    checked against the checkpoint's fingerprint;
  * the split goes through the eval pipeline (in order, padded to whole batches; padding rows
    have `example_mask` False and are dropped), and `family.generate` decodes each batch under
    jit with the config's decoding settings (`config.decode`);
  * hypotheses are decoded by the family's `decode_text` (default `decode_tokens`: stop at
    [SEP] / [PAD], WordPiece pieces joined without spaces, `##` stripped; the LLM families
    decode with their own tokenizer: byte-level BPE to UTF-8, stop at eos / the chat
    template's end token, special tokens skipped) and scored against the 5 references with
    `metrics.nlg_scores` (the paper's protocol: one pycocoevalcap run per reference index,
    averaged);
  * retrieval: every dialogue's 5 references + 95 negatives from other dialogues of the split
    (`metrics.retrieval_candidates`, deterministic) are scored by `family.score` (for Maria the
    log-likelihood of each candidate) and ranked: Recall@1/5/10 and MeanRank
    (`metrics.retrieval_metrics`). Candidates are encoded by the family's `encode_candidates`
    in the layout its scorer reads (default `encode_candidates`: `[CLS] r [SEP]`, padded to
    `config.input.max_response_len`; LLM families: `r end`): `candidate_ids int32[B, C, R]`,
    `candidate_mask bool[B, C, R]` are added to the batch, C split in chunks of
    `config.eval.score_chunk`;
  * per-kind scores: with a reply-kind file (`config.eval.kinds_file`, or `sample_kinds.json`
    found in the data dir or in `<data_dir>/../raw/`), every metric again on each kind's subset.

The scores file's `metadata` records what makes two numbers comparable: the segmenter and its
version, the aggregation, scorer versions and METEOR (or that it was skipped), decoding
settings, retrieval protocol, checkpoint step, variant, tokenizer, text lengths, and the side
tables used (features: encoder, random-init or the weights' sha256, normalisation; knowledge:
KG hash and encoder).

METEOR needs a Java runtime; without one the eval stops with a message naming the fix, unless
`--skip_meteor` (`config.eval.skip_meteor`), which the scores file records.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tiktalk_jax import checkpoint, distributed, input_pipeline, metrics, sharding, train
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import registry

KINDS_FILENAME = "sample_kinds.json"


@dataclasses.dataclass
class EvalResult:
    """One evaluated checkpoint on one split (scores are None on processes other than 0)."""

    step: int
    split: str
    scores: dict[str, Any] | None
    scores_path: str
    generations_path: str


# ---------------------------------------------------------------------------------------------
# Config and files.
# ---------------------------------------------------------------------------------------------


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote to `<workdir>/config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass --config, or train in this workdir first")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f), type_safe=False)


def scores_path(workdir: str, split: str, step: int) -> str:
    return os.path.join(workdir, f"scores_{split}_step{step}.json")


def generations_path(workdir: str, split: str, step: int) -> str:
    return os.path.join(workdir, f"generations_{split}_step{step}.jsonl")


def find_kinds_file(config: ml_collections.ConfigDict) -> str | None:
    """`config.eval.kinds_file`, else a `sample_kinds.json` next to / above the data dir."""
    explicit = config.get("eval", {}).get("kinds_file")
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"config.eval.kinds_file {explicit!r} does not exist")
        return explicit
    data_dir = config.input.get("data_dir")
    if not data_dir:
        return None
    for candidate in (
        os.path.join(data_dir, KINDS_FILENAME),
        os.path.join(os.path.dirname(os.path.abspath(data_dir)), "raw", KINDS_FILENAME),
    ):
        if os.path.isfile(candidate):
            return candidate
    return None


def _eval_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.eval` with defaults for fields a config may lack."""
    defaults = dict(
        split="test",
        tokenize="char",
        skip_meteor=False,
        num_negatives=95,
        retrieval_seed=0,
        score_chunk=20,
        kinds_file=None,
    )
    given = config.get("eval") or {}
    return ml_collections.ConfigDict({**defaults, **dict(given)}, type_safe=False)


def _with_eval_split(config: ml_collections.ConfigDict, split: str) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    cfg.input.eval_splits = (split,)
    return cfg


# ---------------------------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------------------------


def detokenize(pieces: Sequence[str]) -> str:
    """WordPiece pieces -> text, for Chinese: pieces are joined without spaces and `##` is
    stripped; a space is kept only between two ASCII alphanumeric words (so "hello world"
    survives). Special tokens are dropped; `[UNK]` becomes U+FFFD (one character)."""
    return tokenizer_lib.join_wordpieces(pieces)


def decode_tokens(tokenizer: Any, ids: np.ndarray, stop_ids: Sequence[int]) -> str:
    """Generated ids `int[T]` up to the first stop id -> text (`tokenizer.decode`: WordPiece
    pieces joined as `detokenize`; any other tokenizer by its own decoder)."""
    return tokenizer_lib.decode(tokenizer, ids, stop_ids)


def decode_texts(
    config: ml_collections.ConfigDict, tokenizer: Any, tokens: np.ndarray
) -> list[str]:
    """The default `decode_text` hook: `int[N, T]` -> N texts with the BERT vocabulary's
    conventions (stop at [SEP] / [PAD])."""
    del config
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    stop_ids = [backend.token_to_id(t) for t in ("[SEP]", "[PAD]")]
    return [decode_tokens(tokenizer, t, stop_ids) for t in tokens]


def candidate_arrays(
    family: registry.ModelFamily,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    candidates: Sequence[Sequence[str]],
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate texts `[N][C]` -> `(int32[N, C, R], bool[N, C, R])` by the family's
    `encode_candidates` hook, else `encode_candidates` (`[CLS] r [SEP]`)."""
    if family.encode_candidates is not None:
        return family.encode_candidates(config, tokenizer, candidates)
    return encode_candidates(tokenizer, candidates, int(config.input.max_response_len))


def encode_candidates(
    tokenizer: Any, candidates: Sequence[Sequence[str]], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate texts `[N][C]` -> `(int32[N, C, R], bool[N, C, R])` as `[CLS] r [SEP]`,
    truncated like the formatters' responses (the [SEP] is kept)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    pad, cls, sep = (backend.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    n, c = len(candidates), len(candidates[0])
    flat = [t for row in candidates for t in row]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    tokens = [e.ids for e in encode(flat, add_special_tokens=False)]
    ids = np.full((n * c, max_len), pad, np.int32)
    lengths = np.zeros((n * c,), np.int32)
    for i, t in enumerate(tokens):
        row = [cls, *t[: max_len - 2], sep]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    return ids.reshape(n, c, max_len), mask.reshape(n, c, max_len)


# ---------------------------------------------------------------------------------------------
# The model: built as the train loop builds it, params restored read-only.
# ---------------------------------------------------------------------------------------------


class ModelLoader:
    """Builds the family's model once on the mesh; `load(step)` restores a checkpoint into it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh):
        from tiktalk_jax import optim

        self.family = registry.get(config.model.name)
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        with jax.set_mesh(mesh):
            model = self.family.build(config, nnx.Rngs(int(config.seed)))
        frozen_f = optim.frozen_filter(config.frozen)
        trainable_f = optim.trainable_filter(config.frozen)
        self.graphdef, frozen, params, rest = nnx.split(model, frozen_f, trainable_f, ...)
        rules = tuple(tuple(r) for r in config.sharding.rules)
        overrides = tuple(tuple(o) for o in config.sharding.overrides)
        place = lambda s: jax.device_put(s, sharding.state_shardings(s, mesh, rules, overrides))
        self.frozen, self.params, self.rest = place(frozen), place(params), place(rest)
        source = self.family.frozen_source(config) if self.family.frozen_source else None
        self.frozen_info = checkpoint.frozen_record(self.frozen, source)

    def steps(self) -> list[int]:
        return checkpoint.committed_steps(self.directory)

    def load(self, step: int) -> nnx.Module:
        """The model with the params and state of checkpoint `step` (frozen weights checked)."""
        target = {"params": nnx.to_pure_dict(self.params), "rest": nnx.to_pure_dict(self.rest)}
        tree, meta = checkpoint.read_state(self.directory, step, target)
        checkpoint.check_frozen(meta.get("frozen"), self.frozen_info, f"{self.directory}/{step}")
        params, rest = self.params, self.rest
        nnx.replace_by_pure_dict(params, tree["params"])
        nnx.replace_by_pure_dict(rest, tree["rest"])
        return nnx.merge(self.graphdef, self.frozen, params, rest)


# ---------------------------------------------------------------------------------------------
# Running the model over a split.
# ---------------------------------------------------------------------------------------------


def _gather(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _chunks(ids: np.ndarray, mask: np.ndarray, size: int):
    """`[B, C, R]` candidates in chunks of `size` along C: `(ids, mask, real count)`; the last
    chunk is padded with copies of its first candidate so every call has one compiled shape."""
    for start in range(0, ids.shape[1], size):
        sub_ids, sub_mask = ids[:, start : start + size], mask[:, start : start + size]
        n = sub_ids.shape[1]
        if n < size:
            pad = [(0, 0), (0, size - n), (0, 0)]
            sub_ids, sub_mask = (
                np.pad(sub_ids, pad, mode="edge"),
                np.pad(sub_mask, pad, mode="edge"),
            )
        yield sub_ids, sub_mask, n


class ModelRunner:
    """Runs a family's `generate` and `score` over eval batches under jit on `mesh`.

    The jitted functions are kept for as long as models share one graph definition, so every
    checkpoint of a run reuses one compilation.
    """

    def __init__(
        self,
        family: registry.ModelFamily,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        candidates: tuple[np.ndarray, np.ndarray] | None,
        score_chunk: int,
    ):
        self.family, self.config, self.mesh = family, config, mesh
        self.candidates, self.score_chunk = candidates, score_chunk
        self._graphdef = None

    def _compile(self, graphdef: Any) -> None:
        if self._graphdef is not None and graphdef == self._graphdef:
            return
        family, config = self.family, self.config
        self._graphdef = graphdef
        self._generate = jax.jit(
            lambda state, batch: family.generate(nnx.merge(graphdef, state), batch, config)
        )
        self._score = jax.jit(
            lambda state, batch: family.score(nnx.merge(graphdef, state), batch, config)
        )

    def __call__(self, model: nnx.Module, dataset: Any) -> dict[str, np.ndarray]:
        """Generates (and scores the candidates) for every batch of `dataset`.

        `self.candidates`: `(ids int32[N, C, R], mask)` indexed by the split's record index, or
        None. Returns the global `record_index int[n]`, `tokens int[n, T]` and
        `scores float[n, C]` of the real (non-padding) examples, in pipeline order.
        """
        graphdef, state = nnx.split(model)
        self._compile(graphdef)
        mesh, candidates, score_chunk = self.mesh, self.candidates, self.score_chunk
        generate, score = self._generate, self._score
        out = {"record_index": [], "tokens": [], "scores": [], "example_mask": []}
        with jax.set_mesh(mesh):
            for host_batch in dataset:
                batch = input_pipeline.make_global(host_batch, mesh)
                out["tokens"].append(_gather(generate(state, batch)))
                out["record_index"].append(_gather(batch["record_index"]))
                out["example_mask"].append(_gather(batch["example_mask"]))
                if candidates is None:
                    continue
                rows = np.maximum(host_batch["record_index"], 0)  # padding rows: any record
                chunks = []
                for ids, mask, n in _chunks(candidates[0][rows], candidates[1][rows], score_chunk):
                    extra = {"candidate_ids": ids, "candidate_mask": mask}
                    extra = input_pipeline.make_global(extra, mesh)
                    chunks.append(_gather(score(state, {**batch, **extra}))[:, :n])
                out["scores"].append(np.concatenate(chunks, axis=1))
        result = {k: np.concatenate(v) for k, v in out.items() if v}
        keep = result.pop("example_mask").astype(bool)
        return {k: v[keep] for k, v in result.items()}


# ---------------------------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return input_pipeline.as_text(value)


def _side_table_info(tables: Sequence[Any]) -> dict[str, Any]:
    """What the scores file records about each joined side table."""
    info = {}
    for t in tables:
        meta = getattr(t.source, "metadata", None)
        if meta is not None:
            keep = (
                "encoder", "weights", "random_init", "sha256", "seed", "storage_dtype",
                "compute_dtype", "frames", "media_options", "normalization",
                "videos_without_features", "warning",
            )  # fmt: skip
            info[t.name] = {k: meta[k] for k in keep if k in meta}
            continue
        path = getattr(t.source, "path", None)
        manifest = path and os.path.join(os.path.dirname(path), "manifest.json")
        if manifest and os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as f:
                m = json.load(f)
            info[t.name] = {
                k: m.get(k) for k in ("kg", "kg_sha256", "encoder", "config", "heads_indexed")
            }
            info[t.name]["dir"] = os.path.dirname(path)
        else:
            info[t.name] = {"source": type(t.source).__name__}
    return info


def _score_set(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    cand_scores: np.ndarray | None,
    settings: ml_collections.ConfigDict,
) -> dict[str, Any]:
    out = dict(
        num_examples=len(hyps),
        nlg_scores=metrics.nlg_scores(
            hyps, refs, tokenize=settings.tokenize, skip_meteor=bool(settings.skip_meteor)
        ),
    )
    if cand_scores is not None:
        out["retrieval"] = metrics.retrieval_metrics(cand_scores, num_positives=len(refs[0]))
    return out


def compute_scores(
    records: Sequence[Mapping[str, Any]],
    hyps: Sequence[str],
    cand_scores: np.ndarray | None,
    kinds: Mapping[str, str] | None,
    settings: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """Overall and per-kind scores of the examples (`records` in the order of `hyps`)."""
    refs = [[_text(r) for r in rec["responses"]] for rec in records]
    scores = _score_set(hyps, refs, cand_scores, settings)
    if kinds:
        per_kind = {}
        labels = [kinds.get(_text(rec["dialogue_id"])) for rec in records]
        for kind in sorted({k for k in labels if k}):
            idx = [i for i, k in enumerate(labels) if k == kind]
            sub = _score_set(
                [hyps[i] for i in idx],
                [refs[i] for i in idx],
                None if cand_scores is None else cand_scores[idx],
                settings,
            )
            per_kind[kind] = {
                "num_examples": sub["num_examples"],
                **sub["nlg_scores"],
                **sub.get("retrieval", {}),
            }
        scores["per_kind"] = per_kind
    return scores


def _scalars(split: str, scores: Mapping[str, Any]) -> dict[str, float]:
    flat = {}
    for group in ("nlg_scores", "retrieval"):
        for k, v in scores.get(group, {}).items():
            if v is not None:
                flat[f"{split}/{k}"] = float(v)
    for kind, values in scores.get("per_kind", {}).items():
        for k, v in values.items():
            if v is not None and k != "num_examples":
                flat[f"{split}/{kind}/{k}"] = float(v)
    return flat


def format_scores(scores: Mapping[str, Any]) -> str:
    """A text table of one scores file: the whole split, then each reply kind."""
    cols = [*metrics.METRIC_KEYS, *(f"recall@{k}" for k in metrics.RECALL_KS), "mean_rank"]
    rows = [
        ("all", scores["num_examples"], {**scores["nlg_scores"], **scores.get("retrieval", {})})
    ]
    for kind, values in scores.get("per_kind", {}).items():
        rows.append((kind, values["num_examples"], values))
    head = f"{scores['split']} step {scores['step']}"
    lines = [f"{head:<16}{'n':>5}" + "".join(f"{c:>10}" for c in cols)]
    for name, n, values in rows:
        cells = [values.get(c) for c in cols]
        lines.append(
            f"{name:<16}{n:>5}"
            + "".join(f"{'-':>10}" if v is None else f"{v:>10.2f}" for v in cells)
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    split: str | None = None,
    steps: str | int | Sequence[int] = "latest",
    model: nnx.Module | None = None,
    model_step: int | None = None,
    skip_meteor: bool | None = None,
) -> list[EvalResult]:
    """Evaluates checkpoints of the run in `workdir` on `split` (see the module docstring).

    Args:
      config: the run's config (e.g. `load_config(workdir)`).
      workdir: the run's workdir: checkpoints are read and results written here.
      split: the split to evaluate (default `config.eval.split`).
      steps: "latest", "all", a step or a list of steps (ignored when `model` is given).
      model: an in-memory model to evaluate instead of restoring (the end of training), with
        its step `model_step`.
      skip_meteor: overrides `config.eval.skip_meteor`.

    Returns:
      One `EvalResult` per evaluated checkpoint.
    """
    settings = _eval_settings(config)
    if skip_meteor is not None:
        settings.skip_meteor = bool(skip_meteor)
    if not settings.skip_meteor:
        metrics.find_java()  # fail before any decoding, with the fix in the message
    split = split or settings.split
    cfg = _with_eval_split(config, split)
    family = registry.get(cfg.model.name)
    if family.generate is None:
        raise ValueError(f"model family {family.name!r} has no generate(): nothing to evaluate")
    mesh = sharding.make_mesh(cfg.mesh)
    # Each host reads the rows of every batch its devices hold (tiktalk_jax/distributed.py).
    shard, shards = distributed.data_shard(mesh)
    inputs = family.data_inputs(cfg)
    side = inputs["side_tables"] or {}
    datasets = input_pipeline.make_datasets(
        cfg, **inputs, train=False, process_index=shard, process_count=shards
    )
    source = datasets.eval_sources[split]
    tokenizer = datasets.tokenizer

    # Retrieval candidates of every record of the split (deterministic on every host).
    candidates = cand_texts = None
    num_refs = int(cfg.input.get("num_references", 5))
    if family.score is not None and settings.num_negatives > 0:
        references = [[_text(r) for r in source[i]["responses"]] for i in range(len(source))]
        if min(len(r) for r in references) != num_refs:
            raise ValueError(f"every {split} dialogue needs {num_refs} references")
        cand_texts = metrics.retrieval_candidates(
            references, int(settings.num_negatives), int(settings.retrieval_seed)
        )
        candidates = candidate_arrays(family, cfg, tokenizer, cand_texts)
    kinds_file = find_kinds_file(cfg)
    kinds = None
    if kinds_file:
        with open(kinds_file, encoding="utf-8") as f:
            kinds = json.load(f)

    if model is not None:
        todo = [(int(model_step if model_step is not None else 0), None)]
    else:
        loader = ModelLoader(cfg, workdir, mesh)
        available = loader.steps()
        if not available:
            raise FileNotFoundError(f"no checkpoints in {loader.directory}")
        if steps == "latest":
            chosen = [available[-1]]
        elif steps == "all":
            chosen = available
        else:
            chosen = [int(steps)] if isinstance(steps, (int, str)) else [int(s) for s in steps]
            missing = sorted(set(chosen) - set(available))
            if missing:
                raise FileNotFoundError(
                    f"no checkpoint {missing} in {loader.directory}: {available}"
                )
        todo = [(s, loader) for s in chosen]

    decode_text = family.decode_text or decode_texts
    runner = ModelRunner(family, cfg, mesh, candidates, int(settings.score_chunk))
    side_info = _side_table_info(side.get(split, []))
    results = []
    writer = train.make_writer(workdir)
    try:
        for step, loader in todo:
            m = model if loader is None else loader.load(step)
            start = datetime.datetime.now(datetime.UTC)
            out = runner(m, datasets.evals[split])
            order = np.argsort(out["record_index"], kind="stable")
            index = out["record_index"][order]
            records = [source[int(i)] for i in index]
            hyps = decode_text(cfg, tokenizer, out["tokens"][order])
            cand_scores = out["scores"][order] if "scores" in out else None
            result = EvalResult(
                step, split, None, scores_path(workdir, split, step),
                generations_path(workdir, split, step),
            )  # fmt: skip
            if jax.process_index() == 0:
                scores = compute_scores(records, hyps, cand_scores, kinds, settings)
                scores = {"split": split, "step": step, **scores}
                scores["metadata"] = _metadata(
                    cfg, settings, split, step, workdir, side_info, tokenizer, kinds_file, start
                )
                _write_generations(result.generations_path, records, hyps, cand_scores, kinds)
                _write_json(result.scores_path, scores)
                from tiktalk_jax import model_card  # reads the two files just written

                model_card.write_model_card(workdir, split, step, config=cfg)
                writer.write_scalars(step, _scalars(split, scores))
                writer.flush()
                result.scores = scores
                logging.info("eval %s step %d: %s", split, step, scores["nlg_scores"])
            results.append(result)
    finally:
        writer.close()
    return results


def _best_rank(row: np.ndarray, num_positives: int) -> int:
    return int(1 + np.sum(row[num_positives:] >= row[:num_positives].max()))


def _write_generations(path, records, hyps, cand_scores, kinds) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i, (rec, hyp) in enumerate(zip(records, hyps)):
            refs = [_text(r) for r in rec["responses"]]
            line = {
                "dialogue_id": _text(rec["dialogue_id"]),
                "video_id": _text(rec["video_id"]),
                "context": [_text(t) for t in rec["context"]],
                "references": refs,
                "hypothesis": hyp,
            }
            if cand_scores is not None:
                line["best_reference_rank"] = _best_rank(cand_scores[i], len(refs))
            if kinds:
                line["kind"] = kinds.get(line["dialogue_id"])
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


def _metadata(cfg, settings, split, step, workdir, side_info, tokenizer, kinds_file, start):
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    inp = cfg.input
    lengths = (
        "max_response_len", "max_context_len", "max_knowledge_len", "max_frames", "max_audio",
    )  # fmt: skip
    return {
        **metrics.scores_metadata(settings.tokenize, bool(settings.skip_meteor)),
        "skip_meteor": bool(settings.skip_meteor),
        "split": split,
        "checkpoint_step": int(step),
        "model": cfg.model.name,
        "variant": cfg.model.get("variant"),
        "init_from": cfg.model.get("init_from"),
        "decoding": dict(cfg.get("decode") or {}),
        "retrieval": {
            "num_positives": int(inp.get("num_references", 5)),
            "num_negatives": int(settings.num_negatives),
            "negatives": "distinct responses of other dialogues of the split, seeded per example",
            "seed": int(settings.retrieval_seed),
            "rank": "best ground truth, ties against the model (metrics.retrieval_metrics)",
            "score": "family.score (Maria: sum of log p of the candidate's tokens and [SEP])",
        },
        "hypotheses": (
            "detokenized: WordPiece joined without spaces, ## stripped"
            if tokenizer_lib.is_wordpiece(tokenizer)
            else "decoded by the tokenizer, special tokens skipped"
        ),
        "tokenizer": inp.get("tokenizer") or "WordPiece vocab trained on the train split",
        "vocab_size": backend.get_vocab_size(),
        "text_lengths": {k: inp.get(k) for k in lengths if inp.get(k) is not None},
        "side_tables": side_info,
        "kinds_file": kinds_file,
        "data_dir": inp.get("data_dir"),
        "workdir": os.path.abspath(workdir),
        "created": start.isoformat(timespec="seconds"),
    }
