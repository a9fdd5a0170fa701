"""GPT-2: HF equivalence, the dialogue formatter, loss, cached decoding, scoring, the family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from configs import common
from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import gpt2, gpt2_inputs, layers, registry

CHARS = "一二三四五六七八九十红橙黄绿蓝紫圆方猫狗高低音滴好看哈"
LC, LR = 12, 8
# Tiny programs: XLA's lowest backend optimisation level halves their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_records(n, seed=0, candidates=0):
    rng = np.random.default_rng(seed)

    def text(k):
        return "".join(rng.choice(list(CHARS), size=k))

    records = []
    for i in range(n):
        r = dict(
            dialogue_id=f"v{i}/c{i}",
            video_id=f"v{i}",
            context=[text(int(rng.integers(1, 6))) for _ in range(int(rng.integers(1, 4)))],
            responses=[text(int(rng.integers(1, 6))) for _ in range(5)],
        )
        if candidates:
            r["candidates"] = [text(int(rng.integers(1, 9))) for _ in range(candidates)]
        records.append(r)
    return records


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab")
    tokenizer_lib.load_tokenizer(None, str(path), texts=[CHARS], vocab_size=100)
    return path


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return tokenizer_lib.load_tokenizer(None, str(vocab_dir))


def vocab_size(tok):
    return tok.backend_tokenizer.get_vocab_size()


def input_config(**overrides):
    cfg = ip.default_config()
    cfg.update(dict(max_context_len=LC, max_response_len=LR, num_references=0))
    cfg.update(overrides)
    return cfg


def formatted(tok, records, train=True, **overrides):
    return ip.get_formatter("gpt2", input_config(**overrides), tok, train=train)(records)


def jit_with(model, fn, **static):
    """`fn(model, *args, **static)` jitted (FAST_COMPILE) for `model`'s current state."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(
        lambda state, *args: fn(nnx.merge(graphdef, state), *args, **static),
        compiler_options=FAST_COMPILE,
    )
    return lambda *args: compiled(state, *args)


def hf_config(tok, **overrides):
    kw = dict(
        vocab_size=vocab_size(tok),
        n_positions=48,
        n_embd=32,
        n_layer=2,
        n_head=4,
        # A larger init scale makes the random model's outputs depend strongly on its inputs.
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


@pytest.fixture(scope="module")
def checkpoints(tok, tmp_path_factory):
    """Random-init HF GPT2LMHeadModels (tied and untied head) saved with save_pretrained."""
    root = tmp_path_factory.mktemp("gpt2")
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(hf_config(tok, tie_word_embeddings=tied)).eval()
        model.save_pretrained(str(root / name))
        out[name] = (str(root / name), model)
    return out


@pytest.fixture(scope="module")
def tied_model(checkpoints):
    return gpt2.from_pretrained(checkpoints["tied"][0])


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_logits_match_hf_with_padding(checkpoints, tok, name):
    path, hf = checkpoints[name]
    model = gpt2.from_pretrained(path)
    assert (model.lm_head is None) == (name == "tied")
    rng = np.random.default_rng(1)
    b, t = 3, 11
    ids = rng.integers(0, vocab_size(tok), (b, t))
    lengths = np.array([11, 6, 3])
    right = np.arange(t)[None, :] < lengths[:, None]
    left = right[:, ::-1].copy()
    forward = jit_with(model, lambda m, *a: m(*a))
    for valid in (right, left):
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
        with torch.no_grad():
            want = hf(
                torch.tensor(ids),
                attention_mask=torch.tensor(valid.astype(np.int64)),
                position_ids=torch.tensor(positions),
            ).logits.numpy()
        # Positions default to cumsum(mask) - 1, as HF generate sets them for left padding.
        got = np.asarray(forward(jnp.asarray(ids), jnp.asarray(valid)))
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)
        assert np.abs(want[valid]).max() > 1.0  # not comparing near-zero logits


def test_config_import_refuses_unported_variants():
    with pytest.raises(ValueError, match="inverse_layer_idx"):
        gpt2.GPT2Config.from_hf({"scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="scale_attn_weights"):
        gpt2.GPT2Config.from_hf({"scale_attn_weights": False})
    config = gpt2.GPT2Config.from_hf({"n_embd": 64, "n_head": 4, "n_layer": 3, "model_type": "x"})
    assert (config.inner_size, config.head_dim) == (256, 16)


def test_every_parameter_has_logical_axes():
    for tied in (True, False):
        config = gpt2.GPT2Config(
            vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tied
        )
        layers.check_param_axes(nnx.eval_shape(lambda c=config: gpt2.GPT2(c, rngs=nnx.Rngs(0))))


def test_formatter_layout(tok):
    records = make_records(4, seed=3, candidates=3)
    records[0]["context"] = ["一二三四", "五六七", "八九十红"]  # 4 + 3 + 4 tokens + 3 [SEP] > LC
    records[1]["context"] = ["红橙黄绿蓝紫圆方猫狗高低音滴"]  # one turn longer than the slot
    records[2]["responses"][0] = "一二三四五六七八九十"  # longer than the response slot
    batch = formatted(tok, records, train=False, num_references=2, num_candidates=3)
    ids = gpt2_inputs.special_token_ids(tok)
    text = lambda row: tok.decode(row.tolist()).replace(" ", "")  # noqa: E731
    assert batch["context_ids"].shape == (4, LC) and batch["references_ids"].shape == (4, 2, LR)
    assert batch["candidate_ids"].shape == (4, 3, LR)
    for i, r in enumerate(records):
        ctx, valid = batch["context_ids"][i], batch["context_mask"][i]
        n = valid.sum()
        assert valid[LC - n :].all() and not valid[: LC - n].any()  # right-aligned
        assert (ctx[~valid] == ids["pad_id"]).all() and ctx[LC - n] == ids["cls_id"]
        resp, rmask = batch["response_ids"][i], batch["response_mask"][i]
        real = resp[rmask]
        assert real[0] == ids["sep_id"] and real[-1] == ids["sep_id"]
        if i == 0:  # the oldest turn is dropped
            assert text(ctx[valid]) == "[CLS]五六七[SEP]八九十红" and n == 9
        elif i == 1:  # the end of the latest turn is kept
            assert text(ctx[valid]) == "[CLS]" + r["context"][0][-(LC - 1) :] and n == LC
        else:
            assert text(ctx[valid]) == "[CLS]" + "[SEP]".join(r["context"])
        body = r["responses"][0][: LR - 2]
        assert text(real[1:-1]) == body
        np.testing.assert_array_equal(batch["references_ids"][i, 0], resp)
        for j, cand in enumerate(r["candidates"]):
            row = batch["candidate_ids"][i, j][batch["candidate_mask"][i, j]]
            assert text(row[1:-1]) == cand[: LR - 2] and row[0] == row[-1] == ids["sep_id"]
    # Training batches carry neither references nor candidates.
    assert set(formatted(tok, records)) == {
        "context_ids",
        "context_mask",
        "response_ids",
        "response_mask",
    }
    with pytest.raises(ValueError, match="num_candidates=5"):
        formatted(tok, records, train=False, num_candidates=5)


def test_loss_reads_only_real_tokens_and_trains(tok, tied_model):
    records = make_records(6, seed=4)
    for r in records:  # contexts that fit the slot, so wider slots hold the same tokens
        r["context"] = [t[:3] for t in r["context"][-2:]]
    loss = jit_with(tied_model, lambda m, b: gpt2.loss_fn(m, b))
    base, aux = loss(formatted(tok, records))
    # Longer slots (more padding) and the token ids under padding change nothing.
    wide = formatted(tok, records, max_context_len=LC + 7, max_response_len=LR + 3)
    wide["context_ids"] = np.where(wide["context_mask"], wide["context_ids"], 7)
    wide["response_ids"] = np.where(wide["response_mask"], wide["response_ids"], 9)
    wide_loss, wide_aux = jit_with(tied_model, lambda m, b: gpt2.loss_fn(m, b))(wide)
    np.testing.assert_allclose(wide_loss, base, rtol=1e-5)
    assert aux["tokens"] == wide_aux["tokens"] == sum(len(r["responses"][0]) + 1 for r in records)
    # The context matters; a masked-out example does not.
    other = formatted(tok, records)
    other["context_ids"] = np.where(other["context_mask"], 5, other["context_ids"])
    assert abs(float(loss(other)[0]) - float(base)) > 1e-3
    masked = dict(formatted(tok, records), example_mask=np.array([True] * 5 + [False]))
    alone = formatted(tok, records[:5])
    np.testing.assert_allclose(loss(masked)[0], loss(alone)[0], rtol=1e-5)

    # A few Adam steps from scratch on one batch lower the loss.
    config = gpt2.GPT2Config(
        vocab_size=vocab_size(tok), n_positions=32, n_embd=32, n_layer=1, n_head=4
    )
    model = gpt2.GPT2(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    batch = formatted(tok, records)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def train_step(state, rng):
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(
            lambda m: gpt2.loss_fn(m, batch, nnx.Rngs(dropout=rng)), has_aux=True
        )
        (loss, _), grads = grad_fn(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    losses = []
    for step in range(10):
        state, value = train_step(state, jax.random.key(step))
        losses.append(float(value))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses


def test_cached_generation_equals_uncached(tok, tied_model):
    batch = formatted(tok, make_records(3, seed=5))
    ids = gpt2_inputs.special_token_ids(tok)
    for greedy, beams in ((True, 1), (False, 3)):
        cfg = gpt2.search_config(ids["sep_id"], ids["pad_id"], max_new_tokens=6, num_beams=beams)
        runs = [
            jit_with(tied_model, gpt2.generate, cfg=cfg, cached=c, greedy=greedy)(batch)
            for c in (True, False)
        ]
        cached, full = jax.device_get(runs)
        np.testing.assert_array_equal(cached.tokens, full.tokens)
        np.testing.assert_array_equal(cached.lengths, full.lengths)
        np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-4, atol=1e-4)
        assert len({tuple(t) for t in cached.tokens}) > 1  # not comparing constants


def test_candidate_scores_are_the_stepwise_log_likelihood(tok, tied_model):
    batch = formatted(tok, make_records(2, seed=6, candidates=3), train=False, num_candidates=3)
    cand, mask = batch["candidate_ids"], batch["candidate_mask"]
    scores = np.asarray(jit_with(tied_model, gpt2.score_candidates)(batch, cand, mask))
    step = jit_with(tied_model, lambda m, *a: gpt2.uncached_step(m, *a)[0])
    context = {k: batch[k] for k in ("context_ids", "context_mask")}
    b, c, lr = cand.shape
    expect = np.zeros((b, c))
    for j in range(c):
        lengths = mask[:, j].sum(axis=1)
        for t in range(1, lr):
            logp = np.asarray(jax.nn.log_softmax(step(context, cand[:, j], jnp.int32(t))))
            expect[:, j] += np.where(t < lengths, logp[np.arange(b), cand[:, j, t]], 0.0)
    np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-4)


def test_family_builds_from_a_checkpoint_and_from_scratch(tok, checkpoints, vocab_dir, tmp_path):
    family = registry.get("gpt2")
    assert family.formatter == "gpt2" and family.side_tables is None
    config = common.base_config()
    config.input.update(max_context_len=LC, max_response_len=LR, num_candidates=2)
    config.input.tokenizer = str(vocab_dir / "vocab.txt")
    config.model = gpt2.model_config(init_from=checkpoints["tied"][0])
    config.decode = gpt2.decode_config(num_beams=2, max_new_tokens=4)
    model = family.build(config, nnx.Rngs(0))
    assert family.frozen_source(config) == checkpoints["tied"][0]
    batch = formatted(tok, make_records(2, seed=7, candidates=2), train=False, num_candidates=2)
    tokens = jit_with(model, family.generate, config=config)(batch)
    assert tokens.shape == (2, 4) and tokens.dtype == jnp.int32
    # Candidates as the evaluator encodes them (`[CLS] r [SEP]`) score as `[SEP] r [SEP]`.
    scores = jit_with(model, family.score, config=config)
    cls_batch = dict(batch, candidate_ids=batch["candidate_ids"].copy())
    cls_batch["candidate_ids"][..., 0] = gpt2_inputs.special_token_ids(tok)["cls_id"]
    np.testing.assert_allclose(scores(cls_batch), scores(batch), rtol=1e-6)
    assert scores(batch).shape == (2, 2)

    scratch = common.base_config()
    # No tokenizer and no trained vocab.txt yet: the trained vocabulary's bound and ids.
    scratch.input.vocab_dir = str(tmp_path)
    scratch.input.vocab_size = 120
    scratch.model = gpt2.model_config(n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = family.build(scratch, nnx.Rngs(0))
    assert model.config.vocab_size == 120 and len(model.h) == 1
    scratch.model.vocab_size = 10
    with pytest.raises(ValueError, match="tokenizer has 120 tokens"):
        family.build(scratch, nnx.Rngs(0))
    # Once the pipeline has trained the vocab, its real size and ids are used.
    scratch.input.vocab_dir = str(vocab_dir)
    spec = gpt2_inputs.vocab_spec(scratch)
    assert spec.vocab_size == vocab_size(tok) and spec._asdict() == {
        "vocab_size": vocab_size(tok),
        **gpt2_inputs.special_token_ids(tok),
    }
