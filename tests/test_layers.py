"""Shared attention / MLP / mask / cache pieces against plain numpy and full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tiktalk_jax.models import layers

B, T, D, H = 2, 6, 16, 4


def _np_attention(mha, xq, xkv, mask):
    """Reference multi-head attention in float64 numpy from the module's own parameters."""
    p = lambda v: 0.0 if v is None else np.asarray(v.value, np.float64)
    q = np.einsum("btd,dhk->bthk", xq, p(mha.query.kernel)) + p(mha.query.bias)
    k = np.einsum("btd,dhk->bthk", xkv, p(mha.key.kernel)) + p(mha.key.bias)
    v = np.einsum("btd,dhk->bthk", xkv, p(mha.value.kernel)) + p(mha.value.bias)
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, p(mha.out.kernel)) + p(mha.out.bias)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_masks():
    valid = np.array([[1, 1, 0], [1, 1, 1]], bool)
    pm = layers.padding_mask(valid)
    assert pm.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(pm[0, 0], [[1, 1, 0]] * 3)
    cm = layers.causal_mask(3)
    np.testing.assert_array_equal(cm[0, 0], np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(layers.causal_mask(2, 4, offset=2)[0, 0], [[1, 1, 1, 0], [1] * 4])
    both = layers.combine_masks(pm, None, cm)
    np.testing.assert_array_equal(both[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    assert layers.combine_masks(None, None) is None
    assert layers.as_attention_mask(valid.astype(np.int32)).shape == (2, 1, 3, 3)
    full = np.ones((2, 3, 3), np.float32)
    assert layers.as_attention_mask(full).dtype == jnp.bool_
    with pytest.raises(ValueError):
        layers.as_attention_mask(np.ones(3))


@pytest.mark.parametrize("cross,key_bias", [(False, True), (True, True), (False, False)])
def test_attention_matches_numpy(cross, key_bias):
    dkv = 24 if cross else D
    mha = layers.MultiHeadAttention(H, D, kv_features=dkv, key_bias=key_bias, rngs=nnx.Rngs(0))
    assert (mha.key.bias is None) == (not key_bias)
    # Non-zero biases so the bias paths are exercised.
    for m in (mha.query, mha.key, mha.value, mha.out):
        if m.bias is not None:
            m.bias.value = jnp.asarray(_rand(*m.bias.value.shape, seed=3))
    xq = _rand(B, T, D, seed=1)
    xkv = _rand(B, 5, dkv, seed=2) if cross else xq
    tk = xkv.shape[1]
    mask = np.ones((B, 1, T, tk), bool)
    mask[0, :, :, -2:] = False
    mask[1, :, 2, :3] = False
    got = mha(xq, xkv if cross else None, mask=mask)
    want = _np_attention(mha, xq.astype(np.float64), xkv.astype(np.float64), mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # Precomputed read-only keys/values (cross-attention cache) give the same result.
    got_cached, _ = mha(xq, mask=mask, cache=mha.project_kv(xkv))
    np.testing.assert_allclose(np.asarray(got_cached), np.asarray(got), atol=1e-6)


def test_cached_incremental_decoding_equals_full():
    """Prefill a bidirectional prefix, then decode causally token by token (the UniLM pattern)."""
    mha = layers.MultiHeadAttention(H, D, rngs=nnx.Rngs(1))
    prefix, steps, slots = 3, 4, 9
    x = _rand(B, prefix + steps, D, seed=4)
    total = prefix + steps
    full_mask = np.tril(np.ones((total, total), bool))
    full_mask[:prefix, :prefix] = True  # the prefix sees itself fully
    want = mha(x, mask=full_mask[None, None])

    @jax.jit
    def step(state, cache, x_t, index):
        module = nnx.merge(*state)
        cache_mask = layers.causal_mask(1, slots, offset=index)
        return module(x_t, mask=cache_mask, cache=cache, cache_index=index)

    cache = layers.KVCache.zeros(B, slots, H, D // H)
    prefill_mask = np.zeros((1, 1, prefix, slots), bool)
    prefill_mask[..., :prefix] = True
    out, cache = mha(x[:, :prefix], mask=prefill_mask, cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[:, :prefix]), atol=1e-5)
    state = nnx.split(mha)
    for t in range(prefix, total):
        out, cache = step(state, cache, x[:, t : t + 1], jnp.int32(t))
        np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(want[:, t]), atol=1e-5)
    # Slots beyond what was written stay zero.
    assert not np.any(np.asarray(cache.key[:, total:]))


def test_reorder_cache_gathers_batch():
    cache = layers.KVCache(
        jnp.arange(3.0)[:, None, None, None] * jnp.ones((3, 2, 1, 1)),
        jnp.arange(3.0)[:, None, None, None] * jnp.ones((3, 2, 1, 1)),
    )
    out = layers.reorder_cache([cache, cache], jnp.array([2, 2, 0]))
    np.testing.assert_array_equal(np.asarray(out[1].value[:, 0, 0, 0]), [2, 2, 0])


def test_attention_dropout_only_in_train_mode():
    mha = layers.MultiHeadAttention(H, D, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = _rand(B, T, D)
    mha.eval()
    a, b = mha(x), mha(x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mha.train()
    c = mha(x)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(mha(x, deterministic=True)), np.asarray(a))


@pytest.mark.parametrize(
    "activation,gated", [("gelu", False), ("gelu_new", False), ("relu", False), ("silu", True)]
)
def test_mlp(activation, gated):
    mlp = layers.Mlp(D, 32, activation=activation, gated=gated, rngs=nnx.Rngs(0))
    x = _rand(B, T, D)
    act = {
        "gelu": lambda h: jax.nn.gelu(h, approximate=False),
        "gelu_new": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
        "relu": lambda h: np.maximum(h, 0),
        "silu": lambda h: h / (1 + np.exp(-h)),
    }[activation]
    up = x @ np.asarray(mlp.up.kernel.value) + np.asarray(mlp.up.bias.value)
    h = (
        act(x @ np.asarray(mlp.gate.kernel.value) + np.asarray(mlp.gate.bias.value)) * up
        if gated
        else act(up)
    )
    want = np.asarray(h) @ np.asarray(mlp.down.kernel.value) + np.asarray(mlp.down.bias.value)
    np.testing.assert_allclose(np.asarray(mlp(x)), want, atol=1e-5)
    with pytest.raises(ValueError):
        layers.Mlp(D, 32, activation="nope", rngs=nnx.Rngs(0))


def test_every_param_has_logical_axes_and_specs_resolve():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = layers.MultiHeadAttention(H, D, kv_features=24, rngs=rngs)
            self.mlp = layers.Mlp(D, 32, gated=True, rngs=rngs)
            self.norm = layers.layer_norm(D, rngs=rngs)
            self.emb = layers.embedding(50, D, rngs=rngs)
            self.pos = layers.embedding(10, D, axes=(None, layers.EMBED), rngs=rngs)
            self.proj = layers.linear(24, D, axes=(None, layers.EMBED), rngs=rngs)

    block = Block(nnx.Rngs(0))
    layers.check_param_axes(block)
    axes = layers.param_axes(block)
    assert axes["attn/query/kernel"] == ("embed", "heads", "kv")
    assert axes["attn/out/kernel"] == ("heads", "kv", "embed")
    assert axes["mlp/down/kernel"] == ("mlp", "embed")
    assert axes["emb/embedding"] == ("vocab", "embed")
    allowed = {None, "embed", "mlp", "heads", "kv", "vocab"}
    assert all(set(a) <= allowed for a in axes.values())
    rules = [
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("kv", None),
    ]
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(block, nnx.Param))
    assert tuple(specs["attn"]["query"]["kernel"].value) == ("fsdp", "tensor", None)
    # A parameter without names is reported.
    block.extra = nnx.Param(jnp.zeros(3))
    with pytest.raises(ValueError, match="extra"):
        layers.check_param_axes(block)


def test_bf16_compute_keeps_float32_params():
    mha = layers.MultiHeadAttention(H, D, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    mlp = layers.Mlp(D, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand(B, T, D))
    y = mlp(mha(x, mask=layers.causal_mask(T)))
    assert y.dtype == jnp.bfloat16 and mha.query.kernel.value.dtype == jnp.float32
    ref = layers.MultiHeadAttention(H, D, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        np.asarray(mha(x), np.float32), np.asarray(ref(x)), atol=5e-2, rtol=5e-2
    )
