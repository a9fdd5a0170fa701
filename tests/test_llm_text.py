"""The LLM text baseline (family "llm"): chat / plain prompt formatter, LoRA training through
the shared loop and evaluation on the bundled sample, candidate scoring, the full fine-tuning
switch."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers
from flax import nnx

from configs import llm_text
from tfds_builder import tiktalk
from tiktalk_jax import evaluate, input_pipeline, optim, sample, sharding, train
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import llm, llm_inputs, registry

TEXTS = ["视频里转的是啥", "红色三角啊", "我看到一个红色三角", "大家觉得怎么样", "同问"]
RECORD = dict(
    title="大家觉得怎么样",
    context=["视频里转的是啥", "同问", "红色三角啊"],
    responses=["我看到一个红色三角", "同问"],
)
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    + CHATML
)


def input_config(**overrides):
    cfg = input_pipeline.default_config()
    cfg.update({**dict(max_context_len=60, max_response_len=8, max_title_len=16), **overrides})
    return cfg


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    return tokenizer_lib.load_tokenizer(
        None, str(tmp_path_factory.mktemp("vocab")), texts=TEXTS * 3, vocab_size=200
    )


def chat_tokenizer(path, template):
    """A byte-level BPE tokenizer with Qwen's special tokens and a ChatML template, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 10 + ["system user assistant"], trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = template
    hf.save_pretrained(path)
    return str(path)


def real(row, mask):
    return np.asarray(row)[np.asarray(mask)].tolist()


# ---------------------------------------------------------------------------------------------
# Formatter.
# ---------------------------------------------------------------------------------------------


def test_plain_template_layout_and_truncation(wordpiece):
    f = llm_inputs.LlmFormatter(input_config(), wordpiece, train=False)
    t = f.template
    assert not t.chat and t.text.startswith("[CLS]") and t.text.endswith("回复：")
    tok = lambda s: wordpiece.backend_tokenizer.encode(s, add_special_tokens=False).ids  # noqa
    cls, sep, pad = (
        wordpiece.backend_tokenizer.token_to_id(x) for x in ("[CLS]", "[SEP]", "[PAD]")
    )
    assert (t.end_id, t.pad_id, t.stop_ids) == (sep, pad, (sep,))
    batch = f([RECORD, dict(RECORD, context=["同问"])])
    assert batch["prompt_ids"].shape == (2, 60) and batch["prompt_ids"].dtype == np.int32
    prompt = real(batch["prompt_ids"][0], batch["prompt_mask"][0])
    turns = [tok(x) for x in RECORD["context"]]
    want = [cls, *tok(llm_inputs.PLAIN_TITLE), *tok(RECORD["title"]), sep]
    want += [*turns[0], sep, *turns[1], sep, *turns[2], sep, *tok(llm_inputs.PLAIN_REPLY)]
    assert prompt == want
    # Left padding: the prompt ends at the last slot; padding before it is [PAD].
    assert batch["prompt_mask"][:, -1].all() and not batch["prompt_mask"][:, 0].any()
    assert (batch["prompt_ids"][~batch["prompt_mask"]] == pad).all()
    # The response: its tokens then the end token, right-padded; references alike.
    assert real(batch["response_ids"][0], batch["response_mask"][0]) == [
        *tok("我看到一个红色三角")[:7],
        sep,
    ]
    assert real(batch["references_ids"][0, 1], batch["references_mask"][0, 1]) == [
        *tok("同问"),
        sep,
    ]
    assert not batch["references_mask"][0, 2:].any()
    # Too long: the title keeps its first 4 tokens, the oldest turn goes (23 = 11 template
    # tokens + 4 title + the last two turns and their separator: exactly full).
    cfg = input_config(max_context_len=23, max_title_len=4)
    short = llm_inputs.LlmFormatter(cfg, wordpiece, train=True)([RECORD])
    assert "references_ids" not in short
    want = [cls, *tok(llm_inputs.PLAIN_TITLE), *tok(RECORD["title"])[:4], sep]
    want += [*turns[1], sep, *turns[2], sep, *tok(llm_inputs.PLAIN_REPLY)]
    assert real(short["prompt_ids"][0], short["prompt_mask"][0]) == want and len(want) == 23
    with pytest.raises(ValueError, match="max_context_len"):
        llm_inputs.LlmFormatter(input_config(max_context_len=20), wordpiece, train=True)


@pytest.mark.parametrize("template", [CHATML, NO_SYSTEM], ids=["system", "no_system"])
def test_chat_template_prompt_is_the_rendered_conversation(wordpiece, tmp_path, template):
    path = chat_tokenizer(tmp_path / "tok", template)
    cfg = input_config(tokenizer=path, max_context_len=400, max_title_len=64)
    # The pipeline hands a BERT tokenizer; a HF directory's own tokenizer is used instead.
    f = llm_inputs.LlmFormatter(cfg, wordpiece, train=True)
    hf = f.tokenizer
    assert f.template.chat and isinstance(hf, transformers.PreTrainedTokenizerBase)
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert f.template.end_id == im_end and f.template.stop_ids == (im_end,)
    assert f.template.pad_id == hf.convert_tokens_to_ids("<|endoftext|>")
    batch = f([RECORD])
    user = llm_inputs.USER_TEMPLATE.format(
        title=RECORD["title"], context="\n".join(RECORD["context"])
    )
    messages = [{"role": "user", "content": user}]
    if template == CHATML:
        messages.insert(0, {"role": "system", "content": llm_inputs.SYSTEM_PROMPT})
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = real(batch["prompt_ids"][0], batch["prompt_mask"][0])
    assert hf.decode(prompt) == rendered and rendered.endswith("<|im_start|>assistant\n")
    response = real(batch["response_ids"][0], batch["response_mask"][0])
    assert hf.decode(response) == "我看到一个红色三角<|im_end|>"
    spec = llm_inputs.token_spec(_config(tokenizer=path))
    assert (spec.end_id, spec.stop_ids) == (im_end, (im_end,))
    assert spec.vocab_size == len(hf)


def _config(**input_overrides):
    config = llm_text.get_config("size=tiny")
    config.input.update(input_overrides)
    return config


# ---------------------------------------------------------------------------------------------
# Model side: loss reads the response only, scores are teacher-forced log-likelihoods.
# ---------------------------------------------------------------------------------------------

TINY = llm.LlmConfig(
    model_type="qwen2",
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    qkv_bias=True,
    initializer_range=0.2,
)


def _batch(rng, b=2, lc=7, lr=5):
    prompt = rng.integers(3, 50, (b, lc)).astype(np.int32)
    prompt_mask = np.arange(lc)[None] >= np.array([[2], [0]])[:b]
    response = rng.integers(3, 50, (b, lr)).astype(np.int32)
    response_mask = np.arange(lr)[None] < np.array([[3], [5]])[:b]
    prompt = np.where(prompt_mask, prompt, 0)
    response = np.where(response_mask, response, 0)
    return dict(
        prompt_ids=prompt, prompt_mask=prompt_mask, response_ids=response,
        response_mask=response_mask, example_mask=np.ones((b,), bool),
    )  # fmt: skip


@nnx.jit
def _full_log_likelihood(model, batch):
    """Per-example sum of log p(response token) from one uncached forward pass."""
    ids = jnp.concatenate([batch["prompt_ids"], batch["response_ids"]], 1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], 1)
    logp = jax.nn.log_softmax(model(ids, mask).astype(jnp.float32))
    lc = batch["prompt_ids"].shape[1]
    tok = jnp.take_along_axis(logp[:, lc - 1 : -1], batch["response_ids"][..., None], 2)[..., 0]
    return jnp.where(batch["response_mask"], tok, 0.0).sum(1)


def test_loss_is_response_cross_entropy_and_scores_are_its_log_likelihood():
    model = llm.Llm(TINY, rngs=nnx.Rngs(0))
    batch = _batch(np.random.default_rng(0))
    ll = _full_log_likelihood(model, batch)
    loss_fn = nnx.jit(llm.loss_fn)
    loss, aux = loss_fn(model, batch)
    assert aux["tokens"] == 8 and np.isclose(loss, -ll.sum() / 8, rtol=1e-5)
    # Padding ids never matter: change them and nothing moves.
    noisy = dict(batch)
    noisy["prompt_ids"] = np.where(batch["prompt_mask"], batch["prompt_ids"], 7)
    noisy["response_ids"] = np.where(batch["response_mask"], batch["response_ids"], 9)
    assert np.isclose(loss_fn(model, noisy)[0], loss, rtol=1e-6)
    # Candidates: the second example's response and a shorter one, scored through the cache.
    cand = np.stack([batch["response_ids"], batch["response_ids"][::-1]], 1)
    cand_mask = np.stack([batch["response_mask"], batch["response_mask"][::-1]], 1)
    scores = nnx.jit(llm.score_responses)(
        model, batch["prompt_ids"], batch["prompt_mask"], cand, cand_mask
    )
    swapped = dict(batch, response_ids=cand[:, 1], response_mask=cand_mask[:, 1])
    want = np.stack([ll, _full_log_likelihood(model, swapped)], 1)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The LoRA baseline through the shared loop and the evaluator, on the bundled sample.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    sample.write_sample(str(root / "raw"), seed=0)
    tiktalk.build(str(root / "raw"), str(root / "data"), "dialogues")
    return str(root / "data")


def _saved_paths(workdir, step):
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    tree = ocp.PyTreeCheckpointer().metadata(state).item_metadata
    return [p for p, _ in sharding.leaves_with_paths(dict(tree))]


def test_lora_baseline_trains_and_evaluates_on_the_sample(data_dir, tmp_path):
    config = llm_text.get_config(f"size=tiny,data_dir={data_dir}")
    config.total_steps, config.log_every = 40, 10
    config.async_checkpoints = False
    config.eval.num_negatives, config.eval.score_chunk = 15, 8
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    losses = [m["train/loss"] for _, m in sorted(train.read_metrics(workdir).items())]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5

    # Only the adapters moved: a fresh build (same seed) equals the trained base exactly.
    family = registry.get("llm")
    fresh = nnx.to_flat_state(nnx.state(family.build(config, nnx.Rngs(config.seed)), nnx.Param))
    trained = dict(nnx.to_flat_state(nnx.state(result.model, nnx.Param)))
    lora_b_moved = 0
    for path, var in fresh:
        before, after = np.asarray(var.get_value()), np.asarray(trained[path].get_value())
        if path[-1] in ("lora_a", "lora_b"):
            lora_b_moved += path[-1] == "lora_b" and not np.array_equal(before, after)
        else:
            np.testing.assert_array_equal(before, after, err_msg="/".join(map(str, path)))
    assert lora_b_moved == 14  # 2 layers x 7 projections

    # The frozen base has no optimizer state: neither the loop's checkpoint nor the optimizer.
    saved = _saved_paths(workdir, 40)
    counters = ("count", "step")
    arrays = [p for p in saved if p.startswith(("params/", "opt/")) and not p.endswith(counters)]
    assert arrays and all(p.endswith(("lora_a", "lora_b")) for p in arrays)
    opt = optim.make_optimizer(result.model, config.optim, 40, config.frozen)
    opt_paths = [
        p
        for p, _ in sharding.leaves_with_paths(nnx.state(opt, nnx.OptState))
        if not p.endswith(counters)
    ]
    moments = [p for p in opt_paths if "/mu/" in p or "/nu/" in p]
    assert len(moments) == 2 * 28 and all(p.endswith(("lora_a", "lora_b")) for p in opt_paths)

    # Eval mode restores the checkpoint, generates and ranks candidates.
    (res,) = evaluate.evaluate(config, workdir, split="val", skip_meteor=True)
    assert res.step == 40 and res.scores["num_examples"] == 55
    assert set(res.scores["nlg_scores"]) >= {"bleu2", "rouge_l", "cider", "dist2"}
    assert 1 <= res.scores["retrieval"]["mean_rank"] <= 16
    lines = [json.loads(x) for x in open(res.generations_path, encoding="utf-8")]
    assert len(lines) == 55 and all(isinstance(g["hypothesis"], str) for g in lines)
    assert any(g["hypothesis"] for g in lines)


def test_small_is_a_cpu_size_with_its_own_shape(data_dir):
    """size=small: the 128-d 4-layer shape (HF init scale) on tiny's CPU settings, lr 3e-3."""
    tiny = llm_text.get_config(f"size=tiny,lora=false,data_dir={data_dir}")
    small = llm_text.get_config(f"size=small,lora=false,data_dir={data_dir}")
    assert (small.optim.lr, tiny.optim.lr) == (3e-3, 1e-2)
    assert small.model.shape == "small" and small.model.dtype == "float32"
    assert small.input.to_dict() == tiny.input.to_dict()
    model = registry.get("llm").build(small, nnx.Rngs(0))
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (128, 384, 4)
    std = float(np.std(np.asarray(model.layers[0].mlp.up.kernel.get_value())))
    assert 0.015 < std < 0.025  # initializer_range 0.02 (tiny: 0.2)


def test_full_fine_tuning_is_a_config_switch(data_dir):
    config = llm_text.get_config(f"size=tiny,lora=False,data_dir={data_dir}")
    assert config.frozen == "" and config.model.lora.rank == 0
    model = registry.get("llm").build(config, nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    opt = optim.make_optimizer(model, config.optim, 10, config.frozen)
    mu = [p for p, _ in sharding.leaves_with_paths(nnx.state(opt, nnx.OptState)) if "/mu/" in p]
    assert len(mu) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    lora_config = llm_text.get_config(f"size=tiny,data_dir={data_dir}")
    lora_model = registry.get("llm").build(lora_config, nnx.Rngs(0))
    assert len(jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam))) == 28


def test_chat_checkpoint_trains_through_the_loop(data_dir, tmp_path):
    """A local HF Qwen2 checkpoint with a chat tokenizer: LoRA on the loaded (sharded) base, the
    chat prompt, a few steps of the shared loop, then greedy generation ending at <|im_end|>."""
    import torch

    path = tmp_path / "qwen"
    hf_tok = transformers.AutoTokenizer.from_pretrained(chat_tokenizer(path, CHATML))
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False,
        )
    )  # fmt: skip
    hf.save_pretrained(path)
    config = llm_text.get_config(f"size=tiny,data_dir={data_dir},init_from={path},tokenizer={path}")
    config.input.max_context_len, config.input.max_response_len = 256, 16
    config.total_steps, config.log_every, config.async_checkpoints = 4, 2, False
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    loaded = np.asarray(hf.lm_head.weight.detach().numpy()).T
    np.testing.assert_array_equal(np.asarray(result.model.lm_head.kernel.get_value()), loaded)
    assert np.isfinite(result.metrics["loss"]) and result.step == 4

    datasets = input_pipeline.make_datasets(config, train=False)
    batch = next(iter(datasets.evals["val"]))
    assert hf_tok.decode(batch["prompt_ids"][0][batch["prompt_mask"][0]]).startswith(
        "<|im_start|>system\n"
    )
    config.decode.method, config.decode.max_new_tokens = "greedy", 6
    family = registry.get("llm")
    tokens = np.asarray(nnx.jit(lambda m, b: family.generate(m, b, config))(result.model, batch))
    assert tokens.shape == (config.input.eval_batch_size, 6)
    assert ((tokens >= 0) & (tokens < len(hf_tok))).all()
    im_end, pad = hf_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    for row in tokens:  # the words, then <|im_end|> once, then padding
        ended = np.flatnonzero(row == im_end)
        if ended.size:
            assert (row[ended[0] + 1 :] == pad).all()
