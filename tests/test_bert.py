"""The NNX BERT port against random-init HF PyTorch BertModel / BertForMaskedLM checkpoints."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tiktalk_jax.models import bert, layers

CONFIG = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)
B, T = 2, 9


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved tiny checkpoints: MLM (safetensors + .bin) and a bare BertModel with pooler."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(**CONFIG)
    mlm = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # non-zero biases so every bias path is checked
        mlm.cls.predictions.bias.normal_()
        for layer in mlm.bert.encoder.layer:
            layer.attention.self.query.bias.normal_()
            layer.attention.output.LayerNorm.bias.normal_()
    base = transformers.BertModel(config).eval()
    mlm.save_pretrained(root / "mlm_st")
    # transformers 5 writes safetensors only (safe_serialization=False is gone); a .bin is what
    # torch.save of the state dict gives, tied decoder.weight / decoder.bias copies included.
    mlm.config.save_pretrained(root / "mlm_bin")
    torch.save(mlm.state_dict(), root / "mlm_bin" / "pytorch_model.bin")
    base.save_pretrained(root / "base")
    return {"root": root, "mlm": mlm, "base": base}


def _inputs(seed=0, padded=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CONFIG["vocab_size"], (B, T)).astype(np.int32)
    types = np.zeros((B, T), np.int32)
    types[:, 4:] = 1
    mask = np.ones((B, T), np.int32)
    if padded:
        mask[0, 6:] = 0
        ids[0, 6:] = 0
    return ids, types, mask


def _torch(model, ids, types, mask):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
        )


@pytest.mark.parametrize("fmt", ["mlm_st", "mlm_bin"])
@pytest.mark.parametrize("padded", [False, True])
def test_mlm_checkpoint_matches_hf(checkpoints, fmt, padded):
    path = checkpoints["root"] / fmt
    assert os.path.isfile(path / ("model.safetensors" if fmt == "mlm_st" else "pytorch_model.bin"))
    model = bert.from_pretrained(str(path))
    assert model.mlm is not None and model.pooler is None
    ids, types, mask = _inputs(padded=padded)
    hidden = model(ids, types, mask)
    logits = model.mlm_logits(hidden)
    hf = _torch(checkpoints["mlm"], ids, types, mask)
    hf_hidden = _torch(checkpoints["mlm"].bert, ids, types, mask).last_hidden_state
    assert hidden.shape == (B, T, CONFIG["hidden_size"])
    np.testing.assert_allclose(np.asarray(hidden), hf_hidden.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), hf.logits.numpy(), atol=1e-4)


def test_base_checkpoint_with_pooler_matches_hf(checkpoints):
    model = bert.from_pretrained(str(checkpoints["root"] / "base"))
    assert model.mlm is None and model.pooler is not None
    ids, types, mask = _inputs(seed=1)
    hidden = model(ids, types, mask)
    hf = _torch(checkpoints["base"], ids, types, mask)
    np.testing.assert_allclose(np.asarray(hidden), hf.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.pool(hidden)), hf.pooler_output.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="MLM head"):
        model.mlm_logits(hidden)


def _unilm_mask(prefix, total):
    """Prefix bidirectional and blind to the rest; the rest causal and sees the prefix."""
    m = np.tril(np.ones((total, total), bool))
    m[:prefix, :prefix] = True
    return m


def test_full_mask_matches_hf_extended_4d_mask(checkpoints):
    model = bert.from_pretrained(str(checkpoints["root"] / "mlm_st"))
    ids, types, _ = _inputs(seed=2, padded=False)
    full = np.stack([_unilm_mask(4, T), _unilm_mask(6, T)])
    full[0, :, 7:] = False  # example 0 also has two padded keys
    extended = (1.0 - full[:, None].astype(np.float32)) * np.finfo(np.float32).min
    hf = _torch(checkpoints["mlm"].bert, ids, types, torch.tensor(extended)).last_hidden_state
    for mask in (full, full.astype(np.int32), full[:, None]):
        np.testing.assert_allclose(np.asarray(model(ids, types, mask)), hf.numpy(), atol=1e-4)


def test_cached_decoding_equals_full_computation(checkpoints):
    """Prefill a bidirectional prefix, decode one token per step under jit, reorder beams."""
    model = bert.from_pretrained(str(checkpoints["root"] / "mlm_st"))
    ids, types, _ = _inputs(seed=3, padded=False)
    prefix, slots = 4, T + 2
    positions = np.arange(T)[None].repeat(B, 0)

    def full_hidden(ids, types):
        return model(ids, types, np.broadcast_to(_unilm_mask(prefix, T), (B, T, T)))

    want = full_hidden(ids, types)

    @nnx.jit
    def step(model, caches, tok, typ, pos, index):
        x = model.embed(tok, typ, pos)
        mask = layers.causal_mask(tok.shape[1], slots, offset=index)
        return model.encode(x, mask, caches=caches, cache_index=index)

    caches = model.init_caches(B, slots)
    x = model.embed(ids[:, :prefix], types[:, :prefix])
    mask = np.zeros((B, 1, prefix, slots), bool)
    mask[..., :prefix] = True
    out, caches = model.encode(x, mask, caches=caches, cache_index=0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[:, :prefix]), atol=1e-5)
    reorder_at = prefix + 2
    for t in range(prefix, T):
        if t == reorder_at:  # beam reordering: swap the two rows of the batch
            order = np.array([1, 0])
            caches = layers.reorder_cache(caches, jnp.asarray(order))
            ids, types = ids[order], types[order]
            # the reference keeps the old rows' prefix up to t, then the new tokens
            want = full_hidden(ids, types)
        sl = slice(t, t + 1)
        out, caches = step(model, caches, ids[:, sl], types[:, sl], positions[:, sl], jnp.int32(t))
        np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(want[:, t]), atol=1e-5)


def test_every_parameter_has_logical_axes(checkpoints):
    model = bert.from_pretrained(str(checkpoints["root"] / "mlm_st"))
    layers.check_param_axes(model)
    axes = layers.param_axes(model)
    assert axes["embeddings/word_embeddings/embedding"] == ("vocab", "embed")
    assert axes["layers/0/attention/query/kernel"] == ("embed", "heads", "kv")
    assert axes["mlm/bias"] == ("vocab",)


def test_bf16_compute(checkpoints):
    path = str(checkpoints["root"] / "mlm_st")
    ref = bert.from_pretrained(path)
    model = bert.from_pretrained(path, dtype=jnp.bfloat16)
    assert model.layers[0].attention.query.kernel.value.dtype == jnp.float32
    ids, types, mask = _inputs(seed=4)
    logits = jax.jit(lambda i, t, m: model.mlm_logits(model(i, t, m)))(ids, types, mask)
    assert logits.dtype == jnp.bfloat16
    want = ref.mlm_logits(ref(ids, types, mask))
    assert np.abs(np.asarray(logits, np.float32) - np.asarray(want)).max() < 0.15


def test_legacy_names_nsp_head_and_unused_tensors(checkpoints, tmp_path):
    """gamma/beta LayerNorm names load, the NSP head is ignored, any other stray tensor fails."""
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in checkpoints["mlm"].state_dict().items()
    }
    state["cls.seq_relationship.weight"] = torch.zeros(2, CONFIG["hidden_size"])
    state["cls.seq_relationship.bias"] = torch.zeros(2)
    (tmp_path / "ok").mkdir()
    checkpoints["mlm"].config.save_pretrained(tmp_path / "ok")
    torch.save(state, tmp_path / "ok" / "pytorch_model.bin")
    model = bert.from_pretrained(str(tmp_path / "ok"))
    ids, types, mask = _inputs(seed=5)
    hf = _torch(checkpoints["mlm"], ids, types, mask).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.mlm_logits(model(ids, types, mask))), hf, atol=1e-4)

    state["bert.encoder.extra.weight"] = torch.zeros(3)
    (tmp_path / "bad").mkdir()
    checkpoints["mlm"].config.save_pretrained(tmp_path / "bad")
    torch.save(state, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not loaded: bert.encoder.extra.weight"):
        bert.from_pretrained(str(tmp_path / "bad"))


def test_dropout_in_train_mode_only():
    model = bert.BertModel(bert.BertConfig(**CONFIG), rngs=nnx.Rngs(0))
    ids, types, mask = _inputs(seed=6)
    model.train()
    a, b = model(ids, types, mask), model(ids, types, mask)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(
        np.asarray(model(ids, types, mask)), np.asarray(model(ids, types, mask))
    )


def test_config_from_hf_rejects_unported_variants():
    assert bert.BertConfig.from_hf({**CONFIG, "unknown_field": 1}).hidden_size == 32
    with pytest.raises(ValueError, match="absolute"):
        bert.BertConfig.from_hf({**CONFIG, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="decoder"):
        bert.BertConfig.from_hf({**CONFIG, "is_decoder": True})


def test_untied_mlm_decoder_matches_hf(tmp_path):
    torch.manual_seed(1)
    hf = transformers.BertForMaskedLM(
        transformers.BertConfig(**CONFIG, tie_word_embeddings=False)
    ).eval()
    with torch.no_grad():
        hf.cls.predictions.decoder.weight.normal_()
        hf.cls.predictions.bias.normal_()
    hf.save_pretrained(tmp_path)
    model = bert.from_pretrained(str(tmp_path))
    assert model.mlm.decoder is not None
    ids, types, mask = _inputs(seed=7)
    np.testing.assert_allclose(
        np.asarray(model.mlm_logits(model(ids, types, mask))),
        _torch(hf, ids, types, mask).logits.numpy(),
        atol=1e-4,
    )
