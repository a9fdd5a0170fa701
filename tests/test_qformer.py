"""The Q-Former port against random-init HF PyTorch BLIP-2 checkpoints (tiny configs)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tiktalk_jax.models import layers, qformer

VISION = dict(
    hidden_size=24,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
QFORMER = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    vocab_size=50,
    max_position_embeddings=20,
)
TEXT = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=40,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)
NUM_QUERIES = 6


def _perturbed(model):
    """Weights far from init: attention is not uniform and every norm and bias matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("LayerNorm.weight", "layernorm.weight")):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Blip2ForConditionalGeneration (query path + projection into a 40-d LLM) and a
    Blip2ForImageTextRetrieval with the text path (text FFN, word/position embeddings)."""
    root = tmp_path_factory.mktemp("blip2")
    out = {}
    for name, cls, text_input in (
        ("gen", transformers.Blip2ForConditionalGeneration, False),
        ("itm", transformers.Blip2ForImageTextRetrieval, True),
    ):
        config = transformers.Blip2Config(
            vision_config=VISION,
            qformer_config=dict(QFORMER, use_qformer_text_input=text_input),
            text_config=TEXT,
            num_query_tokens=NUM_QUERIES,
        )
        model = _perturbed(cls(config))
        model.save_pretrained(root / name)
        out[name] = (str(root / name), model)
    return out


def _images(b=3, n=5, seed=0):
    rng = np.random.default_rng(seed)
    embeds = rng.normal(size=(b, n, VISION["hidden_size"])).astype(np.float32)
    mask = np.ones((b, n), np.int64)
    mask[0, 3:] = 0
    mask[1, 1:] = 0
    return embeds, mask


@nnx.jit
def _queries(model, embeds, mask):
    return model(embeds, mask)


@nnx.jit
def _with_text(model, embeds, ids, text_mask):
    return model(embeds, input_ids=ids, text_mask=text_mask)


def _hf_queries(model, embeds, mask=None):
    with torch.no_grad():
        q = model.query_tokens.expand(embeds.shape[0], -1, -1)
        kw = {} if mask is None else {"encoder_attention_mask": torch.tensor(mask)}
        out = model.qformer(query_embeds=q, encoder_hidden_states=torch.tensor(embeds), **kw)
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("name", ["gen", "itm"])
def test_query_outputs_match_hf_with_and_without_image_mask(checkpoints, name):
    path, hf = checkpoints[name]
    model = qformer.from_pretrained(path)
    assert model.config.num_query_tokens == NUM_QUERIES
    assert model.config.encoder_hidden_size == VISION["hidden_size"]
    embeds, mask = _images()
    forward = _queries
    got = np.asarray(forward(model, embeds, None))
    want = _hf_queries(hf, embeds)
    assert got.shape == (3, NUM_QUERIES, QFORMER["hidden_size"])
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    got_masked = np.asarray(forward(model, embeds, mask))
    want_masked = _hf_queries(hf, embeds, mask)
    np.testing.assert_allclose(got_masked, want_masked, atol=2e-5 * np.abs(want).max())
    assert np.abs(got_masked - got)[:2].max() > 1e-2  # the mask changed the masked rows
    np.testing.assert_allclose(got_masked[2], got[2], atol=1e-5)  # and not the unmasked one
    # Masked image tokens are never read.
    noisy = np.where(mask[..., None] == 1, embeds, 100.0).astype(np.float32)
    np.testing.assert_allclose(np.asarray(forward(model, noisy, mask)), got_masked, atol=1e-5)


def test_text_path_matches_hf(checkpoints):
    path, hf = checkpoints["itm"]
    model = qformer.from_pretrained(path)
    assert model.embeddings is not None and model.layers[0].text_mlp is not None
    embeds, _ = _images(seed=1)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, QFORMER["vocab_size"], (3, 7))
    text_mask = np.ones((3, 7), np.int64)
    text_mask[0, 4:] = 0
    got = np.asarray(_with_text(model, embeds, ids, text_mask))
    with torch.no_grad():
        q = hf.query_tokens.expand(3, -1, -1)
        e = hf.embeddings(input_ids=torch.tensor(ids), query_embeds=q)
        full_mask = torch.cat(
            [torch.ones(3, NUM_QUERIES, dtype=torch.long), torch.tensor(text_mask)], 1
        )
        want = hf.qformer(
            query_embeds=e,
            query_length=NUM_QUERIES,
            attention_mask=full_mask,
            encoder_hidden_states=torch.tensor(embeds),
        ).last_hidden_state.numpy()
    valid = full_mask.numpy().astype(bool)
    assert got.shape == want.shape == (3, NUM_QUERIES + 7, QFORMER["hidden_size"])
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5 * np.abs(want).max())
    # Text-only (no queries, no image): HF's query_length=0 path.
    encode = nnx.jit(lambda m, i, k: m.encode(m.embeddings(i), k, num_queries=0))
    text_only = np.asarray(encode(model, ids, text_mask))
    with torch.no_grad():
        e = hf.embeddings(input_ids=torch.tensor(ids))
        want = hf.qformer(
            query_embeds=e, query_length=0, attention_mask=torch.tensor(text_mask)
        ).last_hidden_state.numpy()
    valid = text_mask.astype(bool)
    np.testing.assert_allclose(text_only[valid], want[valid], atol=2e-5 * np.abs(want).max())


@nnx.jit
def _instructed(model, embeds, mask, instruction, instruction_mask):
    return model(embeds, mask, instruction=instruction, instruction_mask=instruction_mask)


def test_instruction_path_matches_hf_and_ignores_padding(checkpoints, caplog):
    """InstructBLIP-style queries: the instruction's embeddings (here 40-d, an LLM's width) go
    through `InstructionEmbeddings` and share HF's self-attention with the queries."""
    path, hf = checkpoints["itm"]
    with caplog.at_level(logging.WARNING):
        model = qformer.from_pretrained(path, instruction_features=TEXT["hidden_size"])
    assert "INSTRUCTION-AWARE" in caplog.text and "text_mlp" not in caplog.text  # it had one
    embeds, _ = _images(seed=4)
    mask = None  # HF's sdpa cross-attention cannot take an image mask together with text tokens
    rng = np.random.default_rng(5)
    ins = rng.normal(size=(3, 6, TEXT["hidden_size"])).astype(np.float32)
    ins_mask = np.ones((3, 6), bool)
    ins_mask[1, :2] = False  # left padding (LLM prompts)
    ins_mask[2, 5:] = False  # right padding
    got = np.asarray(_instructed(model, embeds, mask, ins, ins_mask))
    text = np.asarray(nnx.jit(lambda m, x, k: m.instruction(x, k))(model, ins, ins_mask))
    with torch.no_grad():
        q = hf.query_tokens.expand(3, -1, -1)
        full_mask = torch.cat([torch.ones(3, NUM_QUERIES, dtype=torch.long),
                               torch.tensor(ins_mask.astype(np.int64))], 1)  # fmt: skip
        want = hf.qformer(
            query_embeds=torch.cat([q, torch.tensor(text)], 1),
            query_length=NUM_QUERIES,
            attention_mask=full_mask,
            encoder_hidden_states=torch.tensor(embeds),
        ).last_hidden_state.numpy()[:, :NUM_QUERIES]
    assert got.shape == (3, NUM_QUERIES, QFORMER["hidden_size"])
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    # Positions count real tokens: padding neither shifts them nor is read.
    alone = np.asarray(_instructed(model, embeds[1:2], None, ins[1:2, 2:], ins_mask[1:2, 2:]))
    np.testing.assert_allclose(alone[0], got[1], atol=1e-5)
    noisy = np.where(ins_mask[..., None], ins, 50.0).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(_instructed(model, embeds, mask, noisy, ins_mask)), got, atol=1e-5
    )
    # The instruction matters, and differs from the plain query path.
    other = np.asarray(_instructed(model, embeds, mask, ins[::-1].copy(), ins_mask))
    assert np.abs(other - got).max() > 1e-2
    assert np.abs(got - np.asarray(_queries(model, embeds, mask))).max() > 1e-2
    with pytest.raises(ValueError, match="positions"):
        long = np.zeros((3, QFORMER["max_position_embeddings"] + 1, TEXT["hidden_size"]))
        model(embeds, instruction=long.astype(np.float32))
    with pytest.raises(ValueError, match="no instruction"):
        qformer.from_pretrained(path)(embeds, instruction=ins)


def test_instruction_added_to_a_generation_checkpoint(checkpoints, caplog):
    """BLIP-2 generation checkpoints have no text FFN: it starts as a copy of the query FFN."""
    path, hf = checkpoints["gen"]
    with caplog.at_level(logging.WARNING):
        model = qformer.from_pretrained(path, instruction_features=12)
    assert "layers/0/text_mlp (copied from layers/0/mlp)" in caplog.text
    assert model.config.use_qformer_text_input and model.config.instruction_features == 12
    for layer in model.layers:
        np.testing.assert_array_equal(
            layer.text_mlp.up.kernel.get_value(), layer.mlp.up.kernel.get_value()
        )
        assert layer.text_mlp.up.kernel is not layer.mlp.up.kernel  # a copy, trained apart
    embeds, _ = _images(seed=6)
    ins = np.random.default_rng(7).normal(size=(3, 4, 12)).astype(np.float32)
    out = np.asarray(_instructed(model, embeds, None, ins, np.ones((3, 4), bool)))
    assert out.shape == (3, NUM_QUERIES, QFORMER["hidden_size"]) and np.isfinite(out).all()
    state = nnx.state(model, nnx.Param)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
    assert {"instruction/projection/kernel", "instruction/position_embeddings/embedding",
            "layers/2/text_mlp/down/kernel"} <= paths  # fmt: skip


def test_projection_loaded_or_reinitialised_with_a_log_line(checkpoints, caplog):
    path, hf = checkpoints["gen"]
    embeds, _ = _images(seed=3)
    model = qformer.from_pretrained(path)  # the checkpoint's width (its LLM is 40 wide)
    with torch.no_grad():
        want = hf.language_projection(torch.tensor(_hf_queries(hf, embeds))).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m.project(m(x)))(model, embeds))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    same = qformer.from_pretrained(path, projection_features=TEXT["hidden_size"])
    np.testing.assert_array_equal(
        same.language_projection.kernel.get_value(), model.language_projection.kernel.get_value()
    )

    with caplog.at_level(logging.WARNING):
        other = qformer.from_pretrained(path, projection_features=16)
    assert "RE-INITIALISED" in caplog.text and "16" in caplog.text
    assert other.language_projection.kernel.get_value().shape == (QFORMER["hidden_size"], 16)
    np.testing.assert_array_equal(other.language_projection.bias.get_value(), np.zeros(16))
    # Only the projection is new: the Q-Former itself is the checkpoint's.
    np.testing.assert_allclose(np.asarray(_queries(other, embeds, None)), _hf_queries(hf, embeds),
                               atol=1e-4)  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        itm = qformer.from_pretrained(checkpoints["itm"][0], projection_features=16)
    assert "RE-INITIALISED" in caplog.text and itm.language_projection is not None
    assert qformer.from_pretrained(checkpoints["itm"][0]).language_projection is None


def test_structure_axes_and_dropout(checkpoints):
    config = qformer.QFormerConfig(**QFORMER, encoder_hidden_size=24, num_query_tokens=4)
    shapes = nnx.eval_shape(
        lambda: qformer.QFormer(config, projection_features=16, rngs=nnx.Rngs(0))
    )
    layers.check_param_axes(shapes)
    assert [layer.cross_attention is not None for layer in shapes.layers] == [True, False, True]
    assert shapes.layers[0].cross_attention.key.kernel.get_value().shape == (24, 4, 8)
    assert shapes.layers[0].text_mlp is None and shapes.embeddings is None
    # Random init draws the queries from N(0, 0.02): distinct, so they can specialise.
    small = qformer.QFormerConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        encoder_hidden_size=4, num_query_tokens=4,
    )  # fmt: skip
    init = nnx.jit(lambda: qformer.QFormer(small, rngs=nnx.Rngs(0)).query_tokens.get_value())
    queries = np.asarray(init())[0]
    assert 0.01 < queries.std() < 0.03 and np.abs(queries[0] - queries[1]).max() > 0

    model = qformer.from_pretrained(checkpoints["gen"][0])  # eval mode, like HF
    x, _ = _images()  # the shapes of the equivalence test: its compilation is reused
    a, b = _queries(model, x, None), _queries(model, x, None)
    np.testing.assert_array_equal(a, b)
    model.train()
    assert np.abs(np.asarray(_queries(model, x, None)) - np.asarray(a)).max() > 1e-3  # dropout
    with pytest.raises(ValueError, match="text embeddings"):
        model(x, input_ids=jnp.ones((3, 2), jnp.int32))
    cfg2 = qformer.QFormerConfig.from_hf(
        {"qformer_config": {"hidden_size": 64, "num_attention_heads": 4}, "num_query_tokens": 8,
         "vision_config": {"hidden_size": 40}}
    )  # fmt: skip
    assert (cfg2.hidden_size, cfg2.num_query_tokens, cfg2.encoder_hidden_size) == (64, 8, 40)


def test_non_blip2_directory_is_refused(tmp_path):
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a BLIP-2 checkpoint"):
        qformer.from_pretrained(str(tmp_path))


def test_bfloat16_compute_stays_close(checkpoints):
    path, hf = checkpoints["gen"]
    model = qformer.from_pretrained(path, dtype=jnp.bfloat16)
    embeds, mask = _images(seed=4)
    got = np.asarray(jax.jit(lambda x, k: nnx.merge(*nnx.split(model))(x, k))(embeds, mask))
    want = _hf_queries(hf, embeds, mask)
    assert got.dtype == jnp.bfloat16
    assert np.abs(got.astype(np.float32) - want).max() < 0.1 * np.abs(want).max()
