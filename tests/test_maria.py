"""Maria: formatter, UniLM mask, masking statistics, variants, cached decoding, HF import."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import bert, layers, maria, maria_inputs

CHARS = "一二三四五六七八九十红橙黄绿蓝紫圆方猫狗高低音滴好看哈"
FRAME_DIM, AUDIO_DIM = 12, 8
LENGTHS = dict(
    max_response_len=10, max_context_len=16, max_knowledge_len=8, max_frames=4, max_audio=3
)


def make_records(n, seed=0):
    """Dialogues with their side records already attached (as the pipeline's join does)."""
    rng = np.random.default_rng(seed)

    def text(k):
        return "".join(rng.choice(list(CHARS), size=k))

    records = []
    for i in range(n):
        nf, na = int(rng.integers(1, 7)), int(rng.integers(0, 4))
        records.append(
            dict(
                dialogue_id=f"v{i}/c{i}",
                video_id=f"v{i}",
                context=[text(int(rng.integers(2, 8))) for _ in range(int(rng.integers(1, 4)))],
                responses=[text(int(rng.integers(2, 7))) for _ in range(5)],
                # As tiktalk_jax.knowledge.prepare writes it: tails joined by ";" ("" = none).
                knowledge=dict(knowledge=";".join(text(3) for _ in range(int(rng.integers(0, 3))))),
                frames=dict(features=rng.normal(size=(nf, FRAME_DIM)).astype(np.float32)),
                audio=dict(features=rng.normal(size=(na, AUDIO_DIM)).astype(np.float32)),
            )
        )
    return records


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [CHARS, "谢谢你们的关注;"]
    return tokenizer_lib.load_tokenizer(
        None, str(tmp_path_factory.mktemp("vocab")), texts=texts, vocab_size=100
    )


def input_config(**overrides):
    cfg = ip.default_config()
    cfg.update(dict(LENGTHS, frame_dim=FRAME_DIM, audio_dim=AUDIO_DIM))
    cfg.update(overrides)
    return cfg


def tiny_config(tok, *, vision=True, audio=True, knowledge=True, **bert_overrides):
    b = dict(
        vocab_size=tok.backend_tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=3,
    )
    b.update(bert_overrides)
    config = maria.MariaConfig(
        bert=bert.BertConfig(**b),
        use_vision=vision,
        use_audio=audio,
        use_knowledge=knowledge,
        frame_dim=FRAME_DIM,
        audio_dim=AUDIO_DIM,
        **LENGTHS,
    )
    return maria.with_tokenizer(config, tok)


# These tiny programs run in milliseconds; XLA's lowest backend optimisation level halves their
# compile time, which is most of this file's runtime on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit_with(model, fn, **static):
    """`fn(model, *args, **static)` jitted (FAST_COMPILE) for `model`'s current state."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(
        lambda state, *args: fn(nnx.merge(graphdef, state), *args, **static),
        compiler_options=FAST_COMPILE,
    )
    return lambda *args: compiled(state, *args)


def forward(model, batch):
    return jit_with(model, lambda m, b: m(b))(batch)


def formatted(tok, config, records, train=True):
    fmt = ip.get_formatter(
        "maria", input_config(**maria_inputs.input_overrides(config)), tok, train=train
    )
    return fmt(records)


# --------------------------------------------------------------------------------------------


def test_formatter_layout_through_the_pipeline_joins(tok):
    records = make_records(6)
    # Feature tables may store bfloat16 (tiktalk_jax.extract --storage_dtype).
    records[1]["frames"]["features"] = records[1]["frames"]["features"].astype(ml_dtypes.bfloat16)
    dialogues = [
        {k: r[k] for k in ("dialogue_id", "video_id", "context", "responses")} for r in records
    ]
    tables = [
        ip.SideTable(
            "knowledge",
            [dict(dialogue_id=r["dialogue_id"], **r["knowledge"]) for r in records],
            key="dialogue_id",
        ),
        ip.SideTable(
            "frames", [dict(video_id=r["video_id"], **r["frames"]) for r in records], key="video_id"
        ),
        ip.SideTable(
            "audio", [dict(video_id=r["video_id"], **r["audio"]) for r in records], key="video_id"
        ),
    ]
    fmt = ip.get_formatter("maria", input_config(max_frames=3), tok, train=False)
    (batch,) = list(ip.eval_dataset(dialogues, fmt, global_batch_size=6, side_tables=tables))
    ids = maria_inputs.special_token_ids(tok)
    decode = lambda row, mask: tok.decode(row[mask].tolist()).replace(" ", "")  # noqa: E731
    assert batch["response_ids"].shape == (6, 10) and batch["references_ids"].shape == (6, 5, 10)
    assert batch["frame_feats"].shape == (6, 3, FRAME_DIM) and batch["audio_feats"].shape == (
        6,
        3,
        AUDIO_DIM,
    )
    for i, r in enumerate(records):
        ctx = batch["context_ids"][i][batch["context_mask"][i]]
        assert ctx[0] != ids["cls_id"] and ctx[-1] == ids["sep_id"]
        assert (batch["context_ids"][i][~batch["context_mask"][i]] == ids["pad_id"]).all()
        assert decode(batch["context_ids"][i], batch["context_mask"][i]) == "".join(
            t + "[SEP]" for t in r["context"]
        )
        resp = batch["response_ids"][i][batch["response_mask"][i]]
        assert resp[0] == ids["cls_id"] and resp[-1] == ids["sep_id"]
        assert decode(resp[1:-1], np.ones(len(resp) - 2, bool)) == r["responses"][0]
        tails = r["knowledge"]["knowledge"]
        k_text = decode(batch["knowledge_ids"][i], batch["knowledge_mask"][i])
        assert k_text == (tails + "[SEP]" if tails else "")
        nf = min(len(r["frames"]["features"]), 3)
        assert batch["frame_mask"][i].sum() == nf
        np.testing.assert_array_equal(
            batch["frame_feats"][i, :nf], r["frames"]["features"][:nf].astype(np.float32)
        )
        assert (batch["frame_feats"][i, nf:] == 0).all()
        assert batch["audio_mask"][i].sum() == len(r["audio"]["features"])

    # Knowledge given as a list of tails is joined with ";".
    record = dict(records[0], knowledge=dict(knowledge=["红橙", "", "黄"]))
    out = ip.get_formatter("maria", input_config(), tok, train=True)([record])
    assert decode(out["knowledge_ids"][0], out["knowledge_mask"][0]) == "红橙;黄[SEP]"

    text_only = ip.get_formatter(
        "maria", input_config(max_knowledge_len=0, max_frames=0, max_audio=0), tok, train=True
    )
    assert set(text_only(dialogues)) == {
        "response_ids",
        "response_mask",
        "context_ids",
        "context_mask",
    }
    with pytest.raises(KeyError, match="join the frames table"):
        ip.get_formatter("maria", input_config(max_knowledge_len=0), tok, train=True)(dialogues)


def test_param_axes_and_disabled_segments_cost_nothing(tok):
    # Shapes only (nnx.eval_shape): nothing is initialised or compiled.
    full = nnx.eval_shape(lambda: maria.Maria(tiny_config(tok), rngs=nnx.Rngs(0)))
    layers.check_param_axes(full)
    small = dataclasses.replace(full.config.bert, vocab_size=10)
    with pytest.raises(ValueError, match="tokenizer has"):
        maria.with_tokenizer(dataclasses.replace(full.config, bert=small), tok)
    text_config = tiny_config(tok, vision=False, audio=False, knowledge=False)
    text = nnx.eval_shape(lambda: maria.Maria(text_config, rngs=nnx.Rngs(0)))
    assert text.frames is None and text.audio is None
    assert text.config.prefix_len == 16 and full.config.prefix_len == 16 + 8 + 4 + 3
    batch = formatted(tok, text.config, make_records(2))
    graphdef, state = nnx.split(text)
    out = jax.eval_shape(lambda s, b: nnx.merge(graphdef, s)(b), state, batch)
    assert out.shape == (2, 10 + 16, 32)


def test_mask_blocks_what_it_must(tok):
    config = tiny_config(tok)
    model = maria.Maria(config, rngs=nnx.Rngs(1))
    model.eval()
    batch = formatted(tok, config, make_records(4))
    r = config.max_response_len
    run_model = jit_with(model, lambda m, b: m(b))
    base = np.asarray(run_model(batch))
    resp_len = batch["response_mask"].sum(1)

    def run(**changes):
        return np.asarray(run_model({**batch, **changes}))

    # A response token at slot 2 changes neither the prefix nor earlier response positions.
    ids = batch["response_ids"].copy()
    ids[:, 2] = (ids[:, 2] + 7) % config.bert.vocab_size
    out = run(response_ids=ids)
    np.testing.assert_allclose(out[:, r:], base[:, r:], atol=1e-6)
    np.testing.assert_allclose(out[:, :2], base[:, :2], atol=1e-6)
    for i in range(4):
        assert np.abs(out[i, 2 : resp_len[i]] - base[i, 2 : resp_len[i]]).max() > 1e-3

    # Padding (response, context, knowledge tokens, frame / audio rows) is never attended.
    ids = batch["response_ids"].copy()
    ids[~batch["response_mask"]] = 5
    ctx = batch["context_ids"].copy()
    ctx[~batch["context_mask"]] = 6
    know = batch["knowledge_ids"].copy()
    know[~batch["knowledge_mask"]] = 7
    frames = batch["frame_feats"].copy()
    frames[~batch["frame_mask"]] = 3.0
    audio = batch["audio_feats"].copy()
    audio[~batch["audio_mask"]] = -3.0
    out = run(
        response_ids=ids, context_ids=ctx, knowledge_ids=know, frame_feats=frames, audio_feats=audio
    )
    valid = np.concatenate(
        [
            batch[k]
            for k in ("response_mask", "context_mask", "knowledge_mask", "frame_mask", "audio_mask")
        ],
        axis=1,
    )
    np.testing.assert_allclose(out[valid], base[valid], atol=1e-6)

    # Every prefix part reaches the response (and the other prefix parts).
    for key in ("context_ids", "knowledge_ids", "frame_feats", "audio_feats"):
        changed = batch[key].copy()
        changed[:, 0] = changed[:, 0] + 1 if key.endswith("feats") else (changed[:, 0] + 3) % 50
        out = run(**{key: changed})
        has = batch[key.replace("_ids", "_mask").replace("_feats", "_mask")][:, 0]
        assert (np.abs(out[has, 1] - base[has, 1]).max(-1) > 1e-4).all(), key


def test_masking_rates_and_80_10_10_on_a_large_batch(tok):
    config = tiny_config(tok)
    rng = np.random.default_rng(0)
    n = 3000
    batch = {}
    for name, size, lo in (("response", 10, 2), ("context", 16, 1), ("knowledge", 8, 0)):
        lengths = rng.integers(lo, size + 1, n)
        valid = np.arange(size) < lengths[:, None]
        batch[f"{name}_ids"] = np.where(
            valid, rng.integers(5, config.bert.vocab_size, (n, size)), 0
        ).astype(np.int32)
        batch[f"{name}_mask"] = valid
    batch["response_ids"][:, 0] = config.cls_id
    mask = jax.jit(maria.mask_tokens, static_argnums=2, compiler_options=FAST_COMPILE)
    out, t = mask(jax.random.key(0), batch, config)
    out, t = jax.device_get((out, t))
    assert t.positions.shape == (n, config.max_masked) and config.max_masked == 7 + 2 + 1

    offset, changed_mask, changed_random, kept = 0, 0, 0, 0
    for name, size, rate, skip in config.mask_segments():
        old, new, valid = batch[f"{name}_ids"], out[f"{name}_ids"], batch[f"{name}_mask"]
        in_seg = (t.positions >= offset) & (t.positions < offset + size) & (t.weights > 0)
        count = in_seg.sum(1)
        lengths = valid.sum(1)
        expect = [min(config.num_to_mask(int(k), rate), int(k) - int(skip)) for k in lengths]
        np.testing.assert_array_equal(count, expect)
        sel = np.zeros_like(valid)
        rows = np.nonzero(in_seg)
        sel[rows[0], t.positions[rows] - offset] = True
        assert not (sel & ~valid).any() and not (skip and sel[:, 0].any())
        assert (new[~sel] == old[~sel]).all()
        np.testing.assert_array_equal(t.labels[in_seg], old[rows[0], t.positions[rows] - offset])
        changed_mask += (new[sel] == config.mask_id).sum()
        changed_random += ((new[sel] != config.mask_id) & (new[sel] != old[sel])).sum()
        kept += (new[sel] == old[sel]).sum()
        offset += size
    total = changed_mask + changed_random + kept
    assert total == (t.weights > 0).sum()
    np.testing.assert_allclose(changed_mask / total, 0.8, atol=0.015)
    np.testing.assert_allclose(
        changed_random / total, 0.1 * (1 - 1 / config.bert.vocab_size), atol=0.01
    )
    np.testing.assert_allclose(kept / total, 0.1, atol=0.01)
    # Masked positions are listed first, in order.
    w = t.weights > 0
    assert all((np.diff(p[m]) > 0).all() for p, m in zip(t.positions[:50], w[:50]))


VARIANTS = {
    "T": dict(vision=False, audio=False, knowledge=False),
    "T+V": dict(vision=True, audio=False, knowledge=False),
    "T+V+A": dict(vision=True, audio=True, knowledge=False),
    "T+V+K": dict(vision=True, audio=False, knowledge=True),
    "T+V+A+K": dict(vision=True, audio=True, knowledge=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_with_falling_loss(tok, variant):
    config = tiny_config(tok, num_hidden_layers=1, **VARIANTS[variant])
    model = maria.Maria(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batch = formatted(tok, config, make_records(8, seed=1))
    batch["example_mask"] = np.ones(8, bool)

    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def train_step(state, batch, rng):
        model, optimizer = nnx.merge(graphdef, state)
        # As the train loop calls it: a fresh `nnx.Rngs` stream per step.
        grad_fn = nnx.value_and_grad(
            lambda m: maria.loss_fn(m, batch, nnx.Rngs(dropout=rng)), has_aux=True
        )
        (loss, aux), grads = grad_fn(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, aux

    losses = []
    for step in range(12):
        state, loss, aux = train_step(state, batch, jax.random.key(step))
        losses.append(float(loss))
        assert aux["masked_tokens"] > 0
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses


@pytest.fixture(scope="module")
def decoder_setup(tok):
    # A larger init scale makes the random model's outputs depend strongly on its inputs.
    config = tiny_config(tok, initializer_range=0.3)
    model = maria.Maria(config, rngs=nnx.Rngs(3))
    model.eval()
    batch = formatted(tok, config, make_records(3, seed=2))
    return config, model, batch


def test_cached_decoding_equals_full_recompute(decoder_setup):
    config, model, batch = decoder_setup
    cfg = maria.search_config(config, max_new_tokens=6, num_beams=3)
    for greedy in (False, True):
        runs = [
            jit_with(model, maria.generate, cfg=cfg, cached=c, greedy=greedy)(batch)
            for c in (True, False)
        ]
        cached, full = jax.device_get(runs)
        np.testing.assert_array_equal(cached.tokens, full.tokens)
        np.testing.assert_array_equal(cached.lengths, full.lengths)
        np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-4)
        # The examples decode differently: the test is not comparing constants.
        assert len({tuple(t) for t in cached.tokens}) > 1


def test_candidate_scores_are_the_stepwise_log_likelihood(decoder_setup):
    config, model, batch = decoder_setup
    rng = np.random.default_rng(0)
    b, c, lr = 3, 2, 6
    cand = rng.integers(5, config.bert.vocab_size, (b, c, lr)).astype(np.int32)
    lengths = rng.integers(2, lr + 1, (b, c))
    cand[..., 0] = config.cls_id
    mask = np.arange(lr) < lengths[..., None]
    cand[np.arange(lr) == (lengths[..., None] - 1)] = config.sep_id
    cand[~mask] = config.pad_id
    scores = np.asarray(jit_with(model, maria.score_candidates)(batch, cand, mask))

    prefix = maria._prefix_batch(model, batch)
    step = jit_with(model, lambda m, *args: maria.uncached_step(m, *args)[0])
    expect = np.zeros((b, c))
    for j in range(c):
        tokens = jnp.asarray(np.where(mask[:, j], cand[:, j], config.pad_id))
        for t in range(1, lr):
            logits = step(prefix, tokens, jnp.int32(t))
            logp = np.asarray(jax.nn.log_softmax(logits))
            expect[:, j] += np.where(t < lengths[:, j], logp[np.arange(b), cand[:, j, t]], 0.0)
    np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-4)


def test_loads_hf_bert_checkpoints_growing_token_types(tok, tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=tok.backend_tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    mlm = transformers.BertForMaskedLM(hf_config).eval()
    with torch.no_grad():
        mlm.cls.predictions.bias.normal_()
        mlm.bert.embeddings.token_type_embeddings.weight.normal_()
    mlm.save_pretrained(tmp_path / "mlm")
    transformers.BertModel(hf_config).save_pretrained(tmp_path / "base")

    ids = maria_inputs.special_token_ids(tok)
    over = dict(use_vision=False, use_knowledge=True, **LENGTHS, **ids)
    model = maria.from_pretrained(str(tmp_path / "mlm"), **over)
    model.eval()
    types = np.asarray(model.bert.embeddings.token_type_embeddings.embedding.value)
    hf_types = mlm.bert.embeddings.token_type_embeddings.weight.detach().numpy()
    assert types.shape[0] == 3
    np.testing.assert_array_equal(types[:2], hf_types)
    np.testing.assert_array_equal(types[2], hf_types[1])

    # Without knowledge, the context tokens see only the context: exactly HF BERT on the context
    # with Maria's positions (continuing after the response slot) and token type 1.
    model = maria.from_pretrained(str(tmp_path / "mlm"), **{**over, "use_knowledge": False})
    model.eval()
    batch = formatted(tok, model.config, make_records(3, seed=4))
    hidden = np.asarray(forward(model, batch))
    r, lc = model.config.max_response_len, model.config.max_context_len
    with torch.no_grad():
        out = mlm(
            input_ids=torch.tensor(batch["context_ids"], dtype=torch.long),
            token_type_ids=torch.ones((3, lc), dtype=torch.long),
            position_ids=torch.arange(r, r + lc)[None].repeat(3, 1),
            attention_mask=torch.tensor(batch["context_mask"], dtype=torch.long),
            output_hidden_states=True,
        )
    valid = batch["context_mask"]
    np.testing.assert_allclose(
        hidden[:, r : r + lc][valid], out.hidden_states[-1].numpy()[valid], atol=1e-4
    )
    logits = np.asarray(model.mlm_logits(hidden[:, r : r + lc]))
    np.testing.assert_allclose(logits[valid], out.logits.numpy()[valid], atol=1e-4)

    # A bare BertModel (pooler, no MLM head) loads too; its head stays randomly initialised.
    base = maria.from_pretrained(str(tmp_path / "base"), **over)
    assert base.bert.mlm is not None and base.bert.pooler is None
    with pytest.raises(ValueError, match="type_vocab_size"):
        dataclasses.replace(model.config, use_knowledge=True, knowledge_segment=3)
