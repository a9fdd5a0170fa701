"""Evaluation metrics: the paper's generation scores and the response-retrieval ranks."""

from tiktalk_jax.metrics.nlg import (
    AGGREGATION,
    METRIC_KEYS,
    TOKENIZE_MODES,
    JavaNotFoundError,
    MeteorError,
    distinct_n,
    find_java,
    get_meteor,
    nlg_scores,
    scores_metadata,
    tokenize_text,
)
from tiktalk_jax.metrics.retrieval import (
    RECALL_KS,
    build_response_pool,
    retrieval_candidates,
    retrieval_metrics,
    sample_negatives,
)

__all__ = [
    "AGGREGATION",
    "METRIC_KEYS",
    "RECALL_KS",
    "TOKENIZE_MODES",
    "JavaNotFoundError",
    "MeteorError",
    "build_response_pool",
    "distinct_n",
    "find_java",
    "get_meteor",
    "nlg_scores",
    "retrieval_candidates",
    "retrieval_metrics",
    "sample_negatives",
    "scores_metadata",
    "tokenize_text",
]
