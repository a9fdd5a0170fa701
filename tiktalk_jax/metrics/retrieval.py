"""Response-retrieval metrics: rank 5 ground truths among 100 candidates by model score.

Protocol (the related TikTalk shared task, following Livebot's evaluation): every val/test example
gets a candidate list made of its K ground-truth responses (K = 5) followed by 95 negatives drawn
deterministically from the responses of OTHER dialogues; a model scores every candidate (e.g. its
log-likelihood given the context) and the scores are ranked, higher first.

Definitions (the paper gives none; these are Livebot's, `lancopku/livebot` codes/metrics.py, with
ties made deterministic):

* mode="best" (default, Livebot): an example's rank is the 1-based position of its best-ranked
  ground truth, r = 1 + #(negatives scoring >= the highest ground-truth score). Ties go against
  the model (pessimistic), so constant scores give r = 1 + #negatives, never a lucky rank 1.
  Recall@K = 100 * fraction of examples with r <= K. MeanRank = mean of r over examples.
* mode="each": every ground truth is ranked against the negatives only (the other ground truths
  neither help nor hurt it): r_p = 1 + #(negatives scoring >= s_p). Recall@K = 100 * fraction of
  (example, ground truth) pairs with r_p <= K; MeanRank = mean of r_p over those pairs.

Recall is x100 like the generation metrics; MeanRank is a plain rank (1 is best).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
RETRIEVAL_MODES = ("best", "each")


def retrieval_metrics(
    scores, num_positives: int = 5, mode: str = "best", ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Recall@K and MeanRank of the ground truths (see the module docstring for definitions).

    Args:
      scores: float[N, C] model scores, higher is better; columns [0, num_positives) are the
        ground truths, columns [num_positives, C) the negatives. -inf is allowed, NaN is not.
      num_positives: ground truths per example (5 in TikTalk).
      mode: "best" (rank of the best-ranked ground truth, Livebot) or "each" (every ground truth
        ranked against the negatives).
      ks: the K of Recall@K.

    Returns:
      {"recall@1", "recall@5", "recall@10", "mean_rank"} (one "recall@K" per K in ks).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be float[N, C], got shape {scores.shape}")
    n, c = scores.shape
    if n == 0 or not 0 < num_positives < c:
        raise ValueError(f"need N >= 1 and 0 < num_positives={num_positives} < C; shape {(n, c)}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"mode must be one of {RETRIEVAL_MODES}, got {mode!r}")

    positives = scores[:, :num_positives]  # float[N, P]
    negatives = scores[:, num_positives:]  # float[N, C - P]
    if mode == "best":
        positives = positives.max(axis=1, keepdims=True)  # float[N, 1]
    # >= makes every tie with a negative count against the ground truth.
    ranks = 1 + (negatives[:, None, :] >= positives[:, :, None]).sum(axis=-1)  # int[N, P or 1]

    metrics = {f"recall@{k}": 100.0 * float(np.mean(ranks <= k)) for k in ks}
    metrics["mean_rank"] = float(np.mean(ranks))
    return metrics


def sample_negatives(
    num_examples: int,
    candidate_pool_size: int,
    num_negatives: int = 95,
    seed: int = 0,
    *,
    exclude: Sequence[Iterable[int]],
) -> np.ndarray:
    """Draws each example's negatives from a shared pool of responses, deterministically.

    Args:
      num_examples: N.
      candidate_pool_size: P, the pool's size (e.g. every distinct reference of the split, see
        `build_response_pool`).
      num_negatives: negatives per example, drawn without replacement.
      seed: the draw depends only on (seed, example index, P, exclude), not on N or on
        how many examples were drawn before.
      exclude: N collections of pool indices an example must never get: its own responses.

    Returns:
      int64[N, num_negatives] pool indices.
    """
    if len(exclude) != num_examples:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_examples} examples")
    out = np.empty((num_examples, num_negatives), dtype=np.int64)
    for i, own in enumerate(exclude):
        own = np.fromiter(own, dtype=np.int64)
        if own.size and (own.min() < 0 or own.max() >= candidate_pool_size):
            raise ValueError(f"example {i}: exclude indices outside [0, {candidate_pool_size})")
        # Uniform sampling without replacement = the smallest of iid uniform keys. Only
        # Generator.random() is used, whose stream is the most stable part of numpy's API.
        keys = np.random.default_rng([seed, i]).random(candidate_pool_size)
        keys[own] = np.inf
        if candidate_pool_size - np.unique(own).size < num_negatives:
            raise ValueError(
                f"example {i}: only {candidate_pool_size - np.unique(own).size} pool responses "
                f"are not its own, {num_negatives} negatives requested"
            )
        chosen = np.argpartition(keys, num_negatives - 1)[:num_negatives]
        out[i] = chosen[np.argsort(keys[chosen], kind="stable")]
    return out


def _text_key(text: str) -> str:
    return " ".join(text.split())


def build_response_pool(references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """The split's distinct responses, and for each example the pool entries that are its own.

    An entry is an example's own when its text (whitespace-normalized) equals one of that
    example's references, so a reply that another dialogue shares verbatim ("哈哈哈") can never
    be drawn as a negative for it.

    Returns:
      (pool: P distinct texts in first-seen order, exclude: N lists of pool indices).
    """
    index: dict[str, int] = {}
    pool: list[str] = []
    for refs in references:
        for ref in refs:
            key = _text_key(ref)
            if key not in index:
                index[key] = len(pool)
                pool.append(ref)
    exclude = [sorted({index[_text_key(r)] for r in refs}) for refs in references]
    return pool, exclude


def retrieval_candidates(
    references: Sequence[Sequence[str]], num_negatives: int = 95, seed: int = 0
) -> list[list[str]]:
    """Each example's candidate texts: its references first, then negatives from other dialogues.

    Scoring these lists in order gives the `scores` matrix `retrieval_metrics` expects (with
    num_positives = the number of references).
    """
    pool, exclude = build_response_pool(references)
    negatives = sample_negatives(len(references), len(pool), num_negatives, seed, exclude=exclude)
    return [list(refs) + [pool[j] for j in row] for refs, row in zip(references, negatives)]
