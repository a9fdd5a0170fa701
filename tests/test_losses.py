"""The shared response loss against a plain numpy computation."""

import numpy as np

from tiktalk_jax.models import losses


def test_response_cross_entropy_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 4))
    token_mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    example_mask = np.array([True, True, False])
    loss, aux = losses.response_cross_entropy(logits, targets, token_mask, example_mask)

    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    w = token_mask & example_mask[:, None]
    np.testing.assert_allclose(loss, nll[w].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["token_accuracy"], (logits.argmax(-1) == targets)[w].mean())
    assert aux["tokens"] == w.sum() == 4
    # An all-padding batch is 0, not NaN.
    zero, _ = losses.response_cross_entropy(logits, targets, np.zeros_like(token_mask))
    assert zero == 0.0
