"""Livebot: formatter and frame join, masks, training, cached greedy decoding, ranking, family."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from tiktalk_jax import features
from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import gpt2_inputs, layers, livebot, livebot_inputs, registry

CHARS = "一二三四五六七八九十红橙黄绿蓝紫圆方猫狗高低音滴好看哈"
FRAME_DIM = 12
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_records(n, seed=0, candidates=0):
    """Dialogues with their frames side record attached (as the pipeline's join does)."""
    rng = np.random.default_rng(seed)

    def text(k):
        return "".join(rng.choice(list(CHARS), size=k))

    records = []
    for i in range(n):
        nf = int(rng.integers(1, 9))
        r = dict(
            dialogue_id=f"v{i}/c{i}",
            video_id=f"v{i}",
            context=[text(int(rng.integers(1, 5))) for _ in range(int(rng.integers(1, 4)))],
            responses=[text(int(rng.integers(1, 6))) for _ in range(5)],
            frames=dict(features=rng.normal(size=(nf, FRAME_DIM)).astype(np.float32)),
        )
        if candidates:
            r["candidates"] = [text(int(rng.integers(1, 7))) for _ in range(candidates)]
        records.append(r)
    return records


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vocab"))
    return tokenizer_lib.load_tokenizer(None, path, texts=[CHARS], vocab_size=100)


def tiny_config(tok, **overrides):
    ids = gpt2_inputs.special_token_ids(tok)
    kw = dict(
        vocab_size=tok.backend_tokenizer.get_vocab_size(),
        d_model=32,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        frame_dim=FRAME_DIM,
        max_frames=4,
        max_context_len=16,
        max_response_len=8,
        pad_id=ids["pad_id"],
        bos_id=ids["cls_id"],
        eos_id=ids["sep_id"],
    )
    kw.update(overrides)
    return livebot.LivebotConfig(**kw)


def input_config(config, **overrides):
    cfg = ip.default_config()
    cfg.update(livebot_inputs.input_overrides(config))
    cfg.num_references = 0
    cfg.update(overrides)
    return cfg


def formatted(tok, config, records, train=True, **overrides):
    fmt = ip.get_formatter("livebot", input_config(config, **overrides), tok, train=train)
    return fmt(records)


def jit_with(model, fn, **static):
    graphdef, state = nnx.split(model)
    compiled = jax.jit(
        lambda state, *args: fn(nnx.merge(graphdef, state), *args, **static),
        compiler_options=FAST_COMPILE,
    )
    return lambda *args: compiled(state, *args)


@pytest.fixture(scope="module")
def eval_model(tok):
    # A larger init scale makes the random model's outputs depend strongly on its inputs.
    config = tiny_config(tok, initializer_range=0.3)
    model = livebot.Livebot(config, rngs=nnx.Rngs(3))
    model.eval()
    return config, model


# --------------------------------------------------------------------------------------------


def test_formatter_joins_frames_and_lays_out_text(tok):
    config = tiny_config(tok)
    records = make_records(5, seed=1, candidates=2)
    records[0]["frames"]["features"] = np.arange(9 * FRAME_DIM, dtype=np.float32).reshape(9, -1)
    records[1]["frames"]["features"] = records[1]["frames"]["features"][:2].astype(
        ml_dtypes.bfloat16
    )
    records[2]["frames"]["features"] = np.zeros((0, FRAME_DIM), np.float32)
    dialogues = [{k: v for k, v in r.items() if k != "frames"} for r in records]
    table = ip.SideTable(
        "frames", [dict(video_id=r["video_id"], **r["frames"]) for r in records], key="video_id"
    )
    fmt = ip.get_formatter(
        "livebot",
        input_config(config, num_references=2, num_candidates=2),
        tok,
        train=False,
    )
    (batch,) = list(ip.eval_dataset(dialogues, fmt, global_batch_size=5, side_tables=[table]))
    ids = gpt2_inputs.special_token_ids(tok)
    text = lambda row: tok.decode(row.tolist()).replace(" ", "")  # noqa: E731
    assert (
        batch["frame_feats"].shape == (5, 4, FRAME_DIM) and batch["frame_feats"].dtype == np.float32
    )
    # 9 frames -> 4 spread over the video, in time order: rows 0, 3, 5, 8.
    np.testing.assert_array_equal(
        batch["frame_feats"][0], records[0]["frames"]["features"][[0, 3, 5, 8]]
    )
    assert batch["frame_mask"][1].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(
        batch["frame_feats"][1, :2], records[1]["frames"]["features"].astype(np.float32)
    )
    assert not batch["frame_mask"][2].any() and (batch["frame_feats"][2] == 0).all()
    for i, r in enumerate(records):
        ctx = batch["context_ids"][i][batch["context_mask"][i]]
        assert text(ctx) == "[CLS]" + "".join(t + "[SEP]" for t in r["context"])
        resp = batch["response_ids"][i][batch["response_mask"][i]]
        assert resp[0] == ids["cls_id"] and resp[-1] == ids["sep_id"]
        assert text(resp[1:-1]) == r["responses"][0]
        for j in range(2):
            cand = batch["candidate_ids"][i, j][batch["candidate_mask"][i, j]]
            assert text(cand) == "[CLS]" + r["candidates"][j] + "[SEP]"
    assert batch["references_ids"].shape == (5, 2, 8)
    with pytest.raises(KeyError, match="join the frame features table"):
        ip.get_formatter("livebot", input_config(config), tok, train=True)(dialogues)


def test_shapes_axes_and_frame_projection(tok):
    config = tiny_config(tok)
    model = nnx.eval_shape(lambda: livebot.Livebot(config, rngs=nnx.Rngs(0)))
    layers.check_param_axes(model)
    assert model.frame_proj is not None
    assert (
        len(model.text_blocks[0].cross_attns) == 1 and len(model.decoder_blocks[0].cross_attns) == 2
    )
    same = tiny_config(tok, frame_dim=32)
    assert nnx.eval_shape(lambda: livebot.Livebot(same, rngs=nnx.Rngs(0))).frame_proj is None
    batch = formatted(tok, config, make_records(3))
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, b: nnx.merge(graphdef, s)(b), state, batch)
    assert logits.shape == (3, 7, config.vocab_size)
    pe = np.asarray(livebot.sinusoidal_positions(jnp.arange(3), 8))
    np.testing.assert_allclose(pe[1, 0::2], np.sin(1 / 10000 ** (np.arange(0, 8, 2) / 8)), 1e-6)
    np.testing.assert_allclose(pe[2, 1::2], np.cos(2 / 10000 ** (np.arange(0, 8, 2) / 8)), 1e-6)


def test_masks_decoder_causal_padding_ignored(tok, eval_model):
    config, model = eval_model
    forward = jit_with(model, lambda m, b: m(b))
    batch = formatted(tok, config, make_records(3, seed=2))
    base = np.asarray(forward(batch))

    # Causal: a later response token changes nothing before it, and something after it.
    later = dict(batch, response_ids=batch["response_ids"].copy())
    later["response_ids"][:, 3] = 5
    out = np.asarray(forward(later))
    np.testing.assert_allclose(out[:, :3], base[:, :3], atol=1e-5)
    assert np.abs(out[:, 3:] - base[:, 3:]).max() > 1e-3

    # Padded context tokens and padded frames are never attended.
    padded = dict(batch)
    padded["context_ids"] = np.where(batch["context_mask"], batch["context_ids"], 7)
    padded["frame_feats"] = np.where(batch["frame_mask"][..., None], batch["frame_feats"], 3.0)
    np.testing.assert_allclose(np.asarray(forward(padded)), base, atol=1e-5)

    # Real context and real frames are.
    for key in ("context_ids", "frame_feats"):
        changed = dict(batch)
        changed[key] = batch[key] + (1 if key == "context_ids" else 0.5)
        assert np.abs(np.asarray(forward(changed)) - base).max() > 1e-3, key


def test_trains_with_falling_loss(tok):
    config = tiny_config(tok, num_layers=1)
    model = livebot.Livebot(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batch = formatted(tok, config, make_records(8, seed=3))
    batch["example_mask"] = np.ones(8, bool)
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def train_step(state, rng):
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(
            lambda m: livebot.loss_fn(m, batch, nnx.Rngs(dropout=rng)), has_aux=True
        )
        (loss, aux), grads = grad_fn(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, aux

    losses = []
    for step in range(10):
        state, loss, aux = train_step(state, jax.random.key(step))
        losses.append(float(loss))
    want_tokens = sum(len(r["responses"][0]) + 1 for r in make_records(8, seed=3))
    assert float(aux["tokens"]) == want_tokens
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses


def test_cached_greedy_and_beam_equal_full_recompute(tok, eval_model):
    config, model = eval_model
    batch = formatted(tok, config, make_records(3, seed=4))
    for greedy, beams in ((True, 1), (False, 3)):
        cfg = livebot.search_config(config, max_new_tokens=6, num_beams=beams)
        runs = [
            jit_with(model, livebot.generate, cfg=cfg, cached=c, greedy=greedy)(batch)
            for c in (True, False)
        ]
        cached, full = jax.device_get(runs)
        np.testing.assert_array_equal(cached.tokens, full.tokens)
        np.testing.assert_array_equal(cached.lengths, full.lengths)
        np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-4, atol=1e-4)
        assert len({tuple(t) for t in cached.tokens}) > 1  # not comparing constants


def test_candidate_scores_are_the_stepwise_log_likelihood(tok, eval_model):
    config, model = eval_model
    batch = formatted(
        tok, config, make_records(2, seed=5, candidates=3), train=False, num_candidates=3
    )
    cand, mask = batch["candidate_ids"], batch["candidate_mask"]
    scores = np.asarray(jit_with(model, livebot.score_candidates)(batch, cand, mask))
    memory = {k: batch[k] for k in ("frame_feats", "frame_mask", "context_ids", "context_mask")}
    step = jit_with(model, lambda m, *a: livebot.uncached_step(m, *a)[0])
    b, c, lr = cand.shape
    expect = np.zeros((b, c))
    for j in range(c):
        lengths = mask[:, j].sum(axis=1)
        for t in range(1, lr):
            logp = np.asarray(jax.nn.log_softmax(step(memory, cand[:, j], jnp.int32(t))))
            expect[:, j] += np.where(t < lengths, logp[np.arange(b), cand[:, j, t]], 0.0)
    np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-4)
    assert np.ptp(scores) > 1e-2


def _write_frames(features_dir, split, records):
    writer = features.ShardWriter(features_dir, split, process_index=0, shard_size=100)
    for r in records:
        writer.add(dict(video_id=r["video_id"], features=r["frames"]["features"]))
    writer.close()


def test_family_joins_the_frames_table_and_decodes(tok, tmp_path):
    family = registry.get("livebot")
    assert family.formatter == "livebot"
    records = make_records(4, seed=6)
    frames_dir = str(tmp_path / "frames")
    os.makedirs(frames_dir)
    features.write_json(
        os.path.join(frames_dir, features.METADATA_NAME),
        {"fields": {"features": {"shape": [None, FRAME_DIM], "dtype": "float32"}}},
    )
    for split in ("train", "val"):
        _write_frames(frames_dir, split, records)

    config = common.base_config()
    config.input.vocab_size = 100
    config.model = livebot.model_config(
        d_model=16, num_heads=2, d_ff=32, num_layers=1, frame_dim=FRAME_DIM, frames_dir=frames_dir
    )
    config.input.vocab_dir = str(tmp_path)  # no trained vocab.txt: the bound and the ids
    config.decode = livebot.decode_config(max_new_tokens=5)
    tables = family.side_tables(config)
    assert set(tables) == {"train", "val"} and tables["val"][0].name == "frames"
    model = family.build(config, nnx.Rngs(0))
    assert (
        model.config.vocab_size == 100
        and model.config.bos_id == tokenizer_lib.SPECIAL_TOKENS.index("[CLS]")
    )
    dialogues = [{k: v for k, v in r.items() if k != "frames"} for r in records]
    cfg = input_config(model.config)
    fmt = ip.get_formatter(family.formatter, cfg, tok, train=True)
    (batch,) = list(ip.eval_dataset(dialogues, fmt, global_batch_size=4, side_tables=tables["val"]))
    np.testing.assert_array_equal(
        batch["frame_mask"].sum(1), [min(len(r["frames"]["features"]), 5) for r in records]
    )
    tokens = jit_with(model, family.generate, config=config)(batch)
    assert tokens.shape == (4, 5)

    config.model.frame_dim = FRAME_DIM + 1
    with pytest.raises(ValueError, match="frame_dim"):
        family.side_tables(config)
