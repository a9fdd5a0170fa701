"""The decoder LLM port against random-init HF PyTorch Llama / Qwen2 / Qwen3 / GLM checkpoints."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from tiktalk_jax import decoding, sharding
from tiktalk_jax.models import layers, llm

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)
# One checkpoint per family, each exercising a different rope type and bias / tying switch.
VARIANTS = {
    "llama": (
        transformers.LlamaConfig,
        dict(
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(head_dim=16, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ),
    "glm": (transformers.GlmConfig, dict(head_dim=16)),
}
PAD = 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved HF checkpoints (sharded safetensors + index) with weights large enough that
    attention is far from uniform and every norm / bias differs from its init."""
    root = tmp_path_factory.mktemp("llm")
    out = {}
    for i, (name, (cls, extra)) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, **extra)).eval()
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith("norm.weight"):
                    param.copy_(1 + 0.2 * torch.randn_like(param))
                else:
                    param.normal_(0.0, 0.15)
        model.save_pretrained(root / name, max_shard_size="100KB")
        out[name] = (str(root / name), model)
    assert (root / "glm" / "model.safetensors.index.json").is_file()
    return out


def _prompts(b=3, t=9, seed=0):
    """Row 0 left-padded, row 1 right-padded, row 2 full."""
    ids = np.random.default_rng(seed).integers(3, COMMON["vocab_size"], (b, t))
    mask = np.ones((b, t), np.int64)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return np.where(mask == 1, ids, PAD), mask


def _hf_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
        )
    return out.logits.numpy()


def _assert_close_rel(got, want, valid, rel=1e-4):
    got, want = np.asarray(got)[valid], np.asarray(want)[valid]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rel, f"max error {err:.2e} relative to the largest logit"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf(checkpoints, name):
    path, hf = checkpoints[name]
    model = llm.from_pretrained(path, jnp.float32)
    layers.check_param_axes(model)
    assert model.config.model_type == name
    assert (model.lm_head is None) == (name == "llama")
    ids, mask = _prompts()
    want = _hf_logits(hf, ids, mask)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (3, 9, COMMON["vocab_size"])
    _assert_close_rel(logits, want, mask.astype(bool))
    # The adapter entry point: embeddings in, same logits out.
    embeds = model.embed_tokens(jnp.asarray(ids))
    np.testing.assert_allclose(
        np.asarray(model(inputs_embeds=embeds, attention_mask=jnp.asarray(mask))),
        np.asarray(logits),
        atol=1e-6,
    )


def test_einsum_attention_and_bf16(checkpoints):
    """The repo's own einsum attention gives the same logits; bf16 loading keeps them close."""
    path, hf = checkpoints["glm"]
    ids, mask = _prompts()
    want = _hf_logits(hf, ids, mask)
    einsum = llm.from_pretrained(path, jnp.float32, attention_impl="einsum")
    _assert_close_rel(einsum(jnp.asarray(ids), jnp.asarray(mask)), want, mask.astype(bool))
    bf16 = llm.from_pretrained(path)  # dtype=bfloat16: parameters stored in bf16 too
    assert bf16.embed.embedding.get_value().dtype == jnp.bfloat16
    got = bf16(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32)
    _assert_close_rel(got, want, mask.astype(bool), rel=5e-2)


def test_cached_prefill_and_steps_equal_full_forward(checkpoints):
    model = llm.from_pretrained(checkpoints["qwen3"][0], jnp.float32)
    ids, mask = _prompts(seed=1)
    prompt, steps = 6, 3
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    cache = model.init_cache(3, 12)
    logits, cache = model(jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]), cache=cache)
    got = [np.asarray(logits)]
    for t in range(prompt, prompt + steps):
        logits, cache = model(
            jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), cache=cache
        )
        got.append(np.asarray(logits))
    assert int(cache.index) == prompt + steps
    got = np.concatenate(got, axis=1)
    valid = mask[:, : prompt + steps].astype(bool)
    _assert_close_rel(got, full[:, : prompt + steps], valid, rel=1e-5)


def _generate(model, ids, mask, cfg, method="greedy", rng=None):
    fn = nnx.jit(llm.generate, static_argnames=("cfg", "method"))
    return fn(model, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, method=method, rng=rng)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_greedy_equals_hf_generate(checkpoints, name):
    """Left-padded batch; the end token is one row 0 emits, so rows stop at different steps."""
    path, hf = checkpoints[name]
    steps, p = 8, 6
    ids, mask = _prompts(t=p, seed=2)
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # left padding is what HF generate supports
    kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        first = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
        eos = int(first[0, p + 2])
        want = hf.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), eos_token_id=eos, **kw
        )
    want = want[:, p:].numpy()
    model = llm.from_pretrained(path, jnp.float32)
    cfg = llm.search_config(model.config, max_new_tokens=steps, eos_ids=(eos,))
    out = _generate(model, ids, mask, cfg)
    tokens = np.asarray(out.tokens)
    n = want.shape[1]
    np.testing.assert_array_equal(tokens[:, :n], want)
    assert np.all(tokens[:, n:] == PAD)
    ended = want == eos
    assert ended[0].any()
    lengths = np.where(ended.any(1), ended.argmax(1), steps)  # words before the end token
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    # The same prompts right-padded continue identically (same shapes: no new compile).
    right_ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
    assert right_mask[0, -1] == 0
    right = _generate(model, right_ids, right_mask, cfg)
    np.testing.assert_array_equal(np.asarray(right.tokens), tokens)


def _uncached_step(model, state, tokens, cur_len):
    """Full recompute of prompt + generated words: the reference for cached decoding."""
    ids, mask = state
    n, p = ids.shape
    words = tokens[:, 1:]
    seen = jnp.broadcast_to(jnp.arange(words.shape[1])[None] < cur_len - 1, words.shape)
    logits = model(jnp.concatenate([ids, words], 1), jnp.concatenate([mask, seen], 1))
    return jax.lax.dynamic_index_in_dim(logits, p + cur_len - 2, axis=1, keepdims=False), state


def test_beam_and_sampling(checkpoints):
    model = llm.from_pretrained(checkpoints["glm"][0], jnp.float32)
    ids, mask = _prompts(t=6, seed=3)
    ids, mask = ids[[0, 2]], mask[[0, 2]]
    cfg = llm.search_config(model.config, max_new_tokens=6, num_beams=3, eos_ids=(1,))

    beam = _generate(model, ids, mask, cfg, "beam")

    @nnx.jit(static_argnames="cfg")
    def reference(model, ids, mask, cfg):
        state = (jnp.repeat(ids, cfg.num_beams, 0), jnp.repeat(mask, cfg.num_beams, 0) != 0)
        return decoding.beam_search(lambda *a: _uncached_step(model, *a), state, 2, cfg)

    want = reference(model, jnp.asarray(ids), jnp.asarray(mask), cfg)
    np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(want.scores), rtol=1e-5)

    greedy = _generate(model, ids, mask, cfg)
    embeds = model.embed_tokens(jnp.asarray(ids))
    via_embeds = nnx.jit(llm.generate, static_argnames=("cfg", "method"))(
        model, attention_mask=jnp.asarray(mask), inputs_embeds=embeds, cfg=cfg
    )
    np.testing.assert_array_equal(np.asarray(via_embeds.tokens), np.asarray(greedy.tokens))
    beam_scores = np.asarray(beam.scores) * (1 + np.asarray(beam.lengths))  # sum of logprobs
    assert np.all(beam_scores >= np.asarray(greedy.scores) - 1e-4)

    key = jax.random.key(0)
    top1 = _generate(model, ids, mask, dataclasses.replace(cfg, top_k=1), "sample", key)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    wide = dataclasses.replace(cfg, temperature=1.5, top_p=0.9)
    a = _generate(model, ids, mask, wide, "sample", key)
    b = _generate(model, ids, mask, wide, "sample", key)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(greedy.tokens))


def test_filter_logits():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    kept = lambda x: np.isfinite(np.asarray(x))  # noqa: E731
    np.testing.assert_array_equal(kept(decoding.filter_logits(logits, top_k=2))[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(
        kept(decoding.filter_logits(logits, top_p=0.75)), [[1, 1, 0, 0], [1, 1, 1, 1]]
    )
    np.testing.assert_array_equal(kept(decoding.filter_logits(logits, top_p=0.5))[0], [1, 0, 0, 0])
    both = decoding.filter_logits(logits, top_k=3, top_p=0.9)
    np.testing.assert_array_equal(kept(both)[0], [1, 1, 1, 0])


def test_sharded_equals_unsharded(checkpoints):
    """fsdp x tensor mesh over the 8 fake devices: each device holds its slice only."""
    path, _ = checkpoints["qwen2"]
    ids, mask = _prompts(seed=4)
    plain = llm.from_pretrained(path, jnp.float32)
    want = np.asarray(plain(jnp.asarray(ids), jnp.asarray(mask)))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    with jax.set_mesh(mesh):
        model = llm.from_pretrained(path, jnp.float32)
        table = model.embed.embedding.get_value()
        assert table.sharding.spec == P("tensor", "fsdp")
        assert {s.data.shape for s in table.addressable_shards} == {(32, 32)}
        att = model.layers[0].attention
        assert att.query.kernel.get_value().sharding.spec == P("fsdp", "tensor")
        # 2 key/value heads cannot split 4 ways: replicated over tensor, still fsdp-sharded.
        assert att.key.kernel.get_value().sharding.spec == P("fsdp")
        got = nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask))
        cfg = llm.search_config(model.config, max_new_tokens=5, eos_ids=())
        sharded_tokens = _generate(model, ids, mask, cfg).tokens
    _assert_close_rel(got, want, mask.astype(bool), rel=1e-5)
    plain_tokens = _generate(plain, ids, mask, cfg).tokens
    np.testing.assert_array_equal(np.asarray(sharded_tokens), np.asarray(plain_tokens))


def test_config_parsing():
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    old = llm.LlmConfig.from_hf(
        dict(
            base,
            model_type="qwen2",
            rope_theta=1e6,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
            eos_token_id=[5, 6],
        )
    )
    assert (old.rope_type, old.rope_theta, old.qkv_bias, old.out_bias) == ("yarn", 1e6, True, False)
    assert dict(old.rope_scaling)["factor"] == 4.0 and old.eos_token_ids == (5, 6)
    assert old.num_key_value_heads == 2 and old.head_dim == 4
    assert old.rope.attention_scaling == pytest.approx(0.1 * np.log(4.0) + 1)
    glm = llm.LlmConfig.from_hf(dict(base, model_type="glm", head_dim=4, partial_rotary_factor=0.5))
    assert glm.rope.rotary_dim == 2 and glm.rope.interleaved and glm.fused_gate_up
    with pytest.raises(ValueError, match="sliding"):
        llm.LlmConfig.from_hf(
            dict(base, model_type="qwen2", use_sliding_window=True, sliding_window=4)
        )
    with pytest.raises(ValueError, match="not ported"):
        llm.LlmConfig.from_hf(dict(base, model_type="gpt2"))
    dynamic = llm.LlmConfig.from_hf(
        dict(base, model_type="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    )
    with pytest.raises(ValueError, match="not supported"):
        llm.Llm(dynamic, rngs=nnx.Rngs(0))


def test_unused_checkpoint_tensor_fails(checkpoints, tmp_path):
    _, hf = checkpoints["glm"]
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(ValueError, match="not loaded: model.extra.weight"):
        llm.from_pretrained(str(tmp_path), jnp.float32)
