"""Export of Maria to a HF PyTorch directory: transformers' BertForMaskedLM on the exported
directory gives Maria's logits (the text path under Maria's own UniLM mask, positions and token
types), the projections file reproduces the feature embeddings, and the export loads back here."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tiktalk_jax import export
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import bert, maria

CHARS = "一二三四五六七八九十红橙黄绿蓝紫圆方猫狗高低音滴好看哈"
FRAME_DIM, AUDIO_DIM = 12, 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_lib.load_tokenizer(
        None, str(tmp_path_factory.mktemp("vocab")), texts=[CHARS, "谢谢;"], vocab_size=100
    )


def tiny_maria(tok, *, vision, audio, knowledge, seed=0):
    config = maria.MariaConfig(
        bert=bert.BertConfig(
            vocab_size=tok.backend_tokenizer.get_vocab_size(),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            type_vocab_size=3,
        ),
        use_vision=vision,
        use_audio=audio,
        use_knowledge=knowledge,
        max_response_len=8,
        max_context_len=12,
        max_knowledge_len=6,
        max_frames=3,
        max_audio=2,
        frame_dim=FRAME_DIM,
        audio_dim=AUDIO_DIM,
    )
    model = maria.Maria(maria.with_tokenizer(config, tok), rngs=nnx.Rngs(seed))
    # Random init leaves biases at 0 and LayerNorm scales at 1: perturb every parameter so a
    # transposed or swapped tensor cannot go unnoticed.
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.get_value())
        var.set_value(jnp.asarray(value + 0.05 * rng.normal(size=value.shape), value.dtype))
    model.eval()
    return model


def text_batch(model, seed=0):
    """A text-only batch: `[CLS] r [SEP]` responses, contexts and knowledge, with padding."""
    c = model.config
    rng = np.random.default_rng(seed)
    b = 3
    out = {}
    for name, size in (
        ("response", c.max_response_len),
        ("context", c.max_context_len),
        ("knowledge", c.max_knowledge_len),
    ):
        lengths = rng.integers(2, size + 1, size=b)
        ids = rng.integers(5, c.bert.vocab_size, size=(b, size)).astype(np.int32)
        mask = np.arange(size)[None] < lengths[:, None]
        out[f"{name}_ids"] = np.where(mask, ids, c.pad_id).astype(np.int32)
        out[f"{name}_mask"] = mask
    out["response_ids"][:, 0] = c.cls_id
    return out


def hf_inputs(model, batch):
    """The same sequence as transformers inputs: ids, token types, positions and the UniLM mask
    as a 4-D boolean attention mask (as `Maria.embed_prefix` / `seq2seq_mask` build them)."""
    c = model.config
    r, lc = batch["response_ids"].shape[1], batch["context_ids"].shape[1]
    b = batch["response_ids"].shape[0]
    parts = [batch["response_ids"], batch["context_ids"]]
    types = [np.zeros((b, r)), np.ones((b, lc))]
    positions = [np.broadcast_to(np.arange(r), (b, r)), np.broadcast_to(r + np.arange(lc), (b, lc))]
    prefix_valid = [batch["context_mask"]]
    if c.use_knowledge:
        lk = batch["knowledge_ids"].shape[1]
        parts.append(batch["knowledge_ids"])
        types.append(np.full((b, lk), c.knowledge_segment))
        context_len = batch["context_mask"].sum(axis=1, keepdims=True)
        positions.append(r + context_len + np.arange(lk))
        prefix_valid.append(batch["knowledge_mask"])
    prefix_valid = np.concatenate(prefix_valid, axis=1)
    mask = np.asarray(maria.seq2seq_mask(jnp.asarray(batch["response_mask"]), prefix_valid))
    cat = lambda xs: torch.tensor(np.concatenate(xs, axis=1).astype(np.int64))
    valid = np.concatenate([batch["response_mask"], prefix_valid], axis=1)
    return (
        dict(
            input_ids=cat(parts),
            token_type_ids=cat(types),
            position_ids=cat(positions),
            attention_mask=torch.tensor(mask),
        ),
        valid,
    )


@pytest.mark.parametrize("knowledge", [False, True], ids=["t", "tk"])
def test_exported_bert_for_masked_lm_gives_marias_logits(tok, tmp_path, knowledge):
    model = tiny_maria(tok, vision=False, audio=False, knowledge=knowledge)
    files = export.export_maria(model, str(tmp_path), tokenizer=tok, extra={"variant": "x"})
    assert set(files) == {"config", "model", "projections", "tokenizer", "readme"}
    # sdpa (the default) reads a boolean 4-D mask as "may attend"; eager would add it.
    hf, info = transformers.BertForMaskedLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    batch = text_batch(model)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, b: (m := nnx.merge(graphdef, s)).mlm_logits(m(b)))
    ours = forward(state, {k: jnp.asarray(v) for k, v in batch.items()})
    inputs, valid = hf_inputs(model, batch)
    with torch.no_grad():
        theirs = hf(**inputs).logits.numpy()
    assert theirs.shape == ours.shape
    # Rows of padding tokens attend to nothing: only real tokens are compared.
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=1e-4, rtol=1e-4)

    config = json.load(open(files["config"], encoding="utf-8"))
    assert config["architectures"] == ["BertForMaskedLM"] and config["type_vocab_size"] == 3
    assert config["maria"]["variant"] == "x" and config["maria"]["use_knowledge"] is knowledge
    # The exported tokenizer is the run's.
    loaded = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    assert loaded.get_vocab() == tok.get_vocab()


def test_projections_reproduce_the_feature_embeddings_and_the_export_loads_back(tok, tmp_path):
    model = tiny_maria(tok, vision=True, audio=True, knowledge=True, seed=1)
    mean, std = np.linspace(-1, 1, FRAME_DIM), np.linspace(0.5, 2, FRAME_DIM)
    files = export.export_maria(model, str(tmp_path), feature_stats={"frames": (mean, std)})
    assert "tokenizer" not in files
    from safetensors.torch import load_file

    tensors = load_file(files["projections"])
    assert set(tensors) == {
        "frames.proj.weight", "frames.proj.bias", "frames.norm.weight", "frames.norm.bias",
        "frames.feature_mean", "frames.feature_std",
        "audio.proj.weight", "audio.proj.bias", "audio.norm.weight", "audio.norm.bias",
    }  # fmt: skip
    np.testing.assert_allclose(tensors["frames.feature_std"].numpy(), std, rtol=1e-6)
    for name, dim in (("frames", FRAME_DIM), ("audio", AUDIO_DIM)):
        feats = np.random.default_rng(2).normal(size=(2, 3, dim)).astype(np.float32)
        ours = np.asarray(getattr(model, name)(jnp.asarray(feats)))
        h = model.config.bert.hidden_size
        linear, norm = torch.nn.Linear(dim, h), torch.nn.LayerNorm(h, eps=1e-12)
        linear.load_state_dict({k: tensors[f"{name}.proj.{k}"] for k in ("weight", "bias")})
        norm.load_state_dict({k: tensors[f"{name}.norm.{k}"] for k in ("weight", "bias")})
        with torch.no_grad():
            theirs = norm(linear(torch.tensor(feats))).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)

    # The inverse mapping round-trips through the import mapping: same trunk and head.
    back = bert.from_pretrained(str(tmp_path))
    ids = jnp.asarray(np.random.default_rng(3).integers(5, 40, size=(2, 7)))
    types = jnp.asarray(np.random.default_rng(4).integers(0, 3, size=(2, 7)))
    np.testing.assert_allclose(
        back.mlm_logits(back(ids, types)), model.mlm_logits(model.bert(ids, types)), atol=1e-5
    )
    readme = open(files["readme"], encoding="utf-8").read()
    assert "BertForMaskedLM" in readme and "Media segments here: audio, frames." in readme


def test_export_run_errors_name_the_problem(tmp_path):
    with pytest.raises(export.ExportError, match="not a training workdir"):
        export.export_run(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "gpt2"}}))
    with pytest.raises(export.ExportError, match="trained 'gpt2'"):
        export.export_run(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "maria"}}))
    with pytest.raises(export.ExportError, match="no checkpoint in .*checkpoints: train"):
        export.export_run(str(tmp_path), str(tmp_path / "out"))
    os.makedirs(tmp_path / "checkpoints" / "4")
    (tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(export.ExportError, match=r"no checkpoint 7 .*available \[4\]"):
        export.choose_step(str(tmp_path), "7")
    assert export.choose_step(str(tmp_path)) == 4
    assert export.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 1
