"""The LLM text baseline on an LLM's own tokenizer (byte-level BPE with a Qwen-style chat
template), built offline from the bundled sample: training through the shared loop, then eval
decodes hypotheses with the tokenizer itself and scores candidates laid out as responses."""

import json
import math
import re

import numpy as np
import pytest
import transformers

from configs import llm_text
from tfds_builder import tiktalk
from tiktalk_jax import evaluate, input_pipeline, sample, train
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import llm_inputs, registry

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5's template, less tools: a default system turn when the conversation has none.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{%- if not (m['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# What leaks into text decoded piece by piece from a byte-level BPE: the GPT-2 byte alphabet
# (space, newline, the lead bytes of CJK UTF-8: U+00E4..U+00E9, continuation bytes) and the
# special tokens.
BYTE_LEVEL_ARTEFACTS = re.compile("[ĠĊâäåæçèéĢģĤ]")
CJK = re.compile("[\u4e00-\u9fff]")


def save_bpe_tokenizer(path, texts, vocab_size=1500):
    """Trains a byte-level BPE on `texts`, wraps it as a HF fast tokenizer with Qwen's special
    tokens and a Qwen-style chat template, and saves it (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = QWEN_TEMPLATE
    hf.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    sample.write_sample(str(root / "raw"), seed=0)
    tiktalk.build(str(root / "raw"), str(root / "data"), "dialogues")
    return str(root / "data")


@pytest.fixture(scope="module")
def train_texts(data_dir):
    version_dir = input_pipeline.dataset_dir(data_dir)
    texts = list(tokenizer_lib.dialogue_texts(input_pipeline.open_split(version_dir, "train")))
    # A real LLM tokenizer has seen the prompt's wording too: the template stays a few tokens.
    prompt = [llm_inputs.SYSTEM_PROMPT, llm_inputs.USER_TEMPLATE, "You are a helpful assistant."]
    return texts + prompt * 20


@pytest.fixture(scope="module")
def bpe_dir(train_texts, tmp_path_factory):
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), train_texts)


def _config(data_dir, bpe_dir):
    config = llm_text.get_config(f"size=tiny,data_dir={data_dir},tokenizer={bpe_dir}")
    config.total_steps, config.log_every = 40, 10
    config.async_checkpoints = False
    config.eval.num_negatives, config.eval.score_chunk = 15, 8
    config.decode.method, config.decode.max_new_tokens = "greedy", 16
    return config


def test_the_pipeline_and_hooks_use_the_llm_tokenizer(data_dir, bpe_dir):
    config = _config(data_dir, bpe_dir)
    datasets = input_pipeline.make_datasets(config, train=False)
    tok = datasets.tokenizer
    assert not tokenizer_lib.is_wordpiece(tok) and tok.convert_ids_to_tokens(0) == SPECIAL[0]
    family = registry.get("llm")
    assert family.decode_text is llm_inputs.decode_text
    assert registry.get("blip2").encode_candidates is llm_inputs.encode_candidates

    # Candidates are laid out exactly like the formatter's responses (what the scorer reads).
    batch = next(iter(datasets.evals["val"]))
    source = datasets.eval_sources["val"]
    texts = [[input_pipeline.as_text(source[int(i)]["responses"][0])] for i in range(4)]
    ids, mask = llm_inputs.encode_candidates(config, tok, texts)
    lr = config.input.max_response_len
    assert ids.shape == mask.shape == (4, 1, lr) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[:, 0], batch["response_ids"][:4])
    np.testing.assert_array_equal(mask[:, 0], batch["response_mask"][:4])

    # decode_text stops at <|im_end|> (then padding) and decodes bytes to UTF-8.
    im_end, pad = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    text = "我看到一个红色三角"
    row = [*tok.encode(text, add_special_tokens=False), im_end, *tok.encode("同问"), pad, pad]
    assert llm_inputs.decode_text(config, tok, np.array([row])) == [text]
    # BERT's conventions would read on past <|im_end|>, and joining byte-level pieces as
    # WordPiece ones gives mojibake.
    assert evaluate.decode_texts(config, tok, np.array([row])) == [text + "同问"]
    assert BYTE_LEVEL_ARTEFACTS.search(
        tokenizer_lib.join_wordpieces(tok.convert_ids_to_tokens(row))
    )


def test_llm_text_baseline_trains_and_evaluates_with_a_byte_level_bpe(
    data_dir, bpe_dir, train_texts, tmp_path
):
    config = _config(data_dir, bpe_dir)
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    losses = [m["train/loss"] for _, m in sorted(train.read_metrics(workdir).items())]
    assert len(losses) == 4 and losses[-1] < losses[0]

    (res,) = evaluate.evaluate(config, workdir, split="val", skip_meteor=True)
    assert res.step == result.step == 40
    scores = res.scores
    nlg = {k: v for k, v in scores["nlg_scores"].items() if v is not None}
    assert {"bleu2", "rouge_l", "cider", "dist2"} <= set(nlg)
    assert all(math.isfinite(v) for v in nlg.values())
    retrieval = scores["retrieval"]
    assert all(math.isfinite(v) for v in retrieval.values())
    assert 1 <= retrieval["mean_rank"] <= 16
    assert scores["metadata"]["hypotheses"] == "decoded by the tokenizer, special tokens skipped"

    lines = [json.loads(x) for x in open(res.generations_path, encoding="utf-8")]
    assert len(lines) == scores["num_examples"] > 0
    assert all(1 <= g["best_reference_rank"] <= 16 for g in lines)
    hyps = [g["hypothesis"] for g in lines]
    # Decoded Chinese: CJK characters, none of the byte alphabet, no special token text. (The
    # 40-step model often ends at once: many hypotheses are empty, so only some carry text.)
    assert any(CJK.search(h) for h in hyps)
    assert not any(BYTE_LEVEL_ARTEFACTS.search(h) for h in hyps)
    assert not any(s in h for h in hyps for s in SPECIAL)
    # Every non-ASCII character is one of the text the tokenizer was trained on, or U+FFFD where
    # the (barely trained) model emitted bytes that do not complete a UTF-8 character: decoding
    # itself invents nothing. (Single ASCII bytes are in every byte-level vocabulary, seen or not.)
    emitted = {c for c in "".join(hyps) if not c.isascii()} - {"\ufffd"}
    assert emitted <= set("".join(train_texts))
