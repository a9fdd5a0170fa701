"""Losses shared by the model families."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jax import Array


def response_cross_entropy(
    logits: Array, targets: Array, token_mask: Array, example_mask: Array | None = None
) -> tuple[Array, dict[str, Array]]:
    """Token cross-entropy averaged over the real tokens of the real examples.

    Args:
      logits: float[B, L, V], the predictions of the L target slots.
      targets: int[B, L].
      token_mask: bool[B, L], False on padding.
      example_mask: bool[B] or None, False on padding examples (eval's final batch).

    Returns:
      `(loss, {"token_accuracy", "tokens"})`; an all-padding batch gives loss 0, not NaN.
    """
    logits = logits.astype(jnp.float32)
    w = jnp.asarray(token_mask).astype(jnp.float32)
    if example_mask is not None:
        w = w * jnp.asarray(example_mask).astype(jnp.float32)[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    total = jnp.sum(w)
    denom = jnp.maximum(total, 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * w) / denom
    return jnp.sum(ce * w) / denom, {"token_accuracy": acc, "tokens": total}
