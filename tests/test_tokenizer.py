"""Tokenizer: training a WordPiece vocab on the train split, reuse, and pretrained loading."""

import json
import os

import numpy as np
import pytest
import transformers

from tiktalk_jax import tokenizer as tokenizer_lib

RECORDS = [
    {
        "title": "小猫在草地上跳舞",
        "context": ["这只猫好可爱", "是啊，它在跳舞"],
        "responses": ["我也想养一只猫 cat"],
    },
    {
        "title": "小猫在草地上跳舞",
        "context": ["红色的圆圈在动"],
        "responses": ["听到高音了吗", "哈哈哈", "滴滴滴", "好听", "是低音"],
    },
    # TFDS data sources give bytes; the text reader must accept them.
    {
        "title": "蓝色方块".encode(),
        "context": np.array(["方块在转".encode()], dtype=object),
        "responses": np.array(["转得好快".encode()], dtype=object),
    },
]


def test_dialogue_texts_reads_titles_once_and_every_turn():
    texts = list(tokenizer_lib.dialogue_texts(RECORDS, extra_text=["知识尾巴"]))
    assert texts.count("小猫在草地上跳舞") == 1
    assert "是啊，它在跳舞" in texts and "是低音" in texts
    assert "蓝色方块" in texts and "转得好快" in texts
    assert texts[-1] == "知识尾巴"


def test_trained_vocab_round_trips_chinese_and_is_reused(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return tokenizer_lib.dialogue_texts(RECORDS)

    tok = tokenizer_lib.load_tokenizer(None, str(tmp_path), texts=texts, vocab_size=500)
    assert calls == [1]
    vocab_path = tmp_path / tokenizer_lib.VOCAB_FILENAME
    lines = vocab_path.read_text(encoding="utf-8").splitlines()
    assert tuple(lines[:5]) == tokenizer_lib.SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == 4

    text = "这只猫好可爱，红色的圆圈在跳舞"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    # The BERT normalizer makes every CJK character (and the full-width comma) a token.
    assert tok.convert_ids_to_tokens(ids) == list(text)
    assert tok.decode(ids).replace(" ", "") == text
    # Latin text is lower-cased and still known; unseen characters map to [UNK].
    assert tok.tokenize("CAT") == ["cat"]
    assert tok.tokenize("鲸") == ["[UNK]"]

    mtime = os.path.getmtime(vocab_path)
    again = tokenizer_lib.load_tokenizer(None, str(tmp_path), texts=texts, vocab_size=500)
    assert calls == [1], "the saved vocab must be reused, not retrained"
    assert os.path.getmtime(vocab_path) == mtime
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    # Without training text, an existing vocab is enough.
    assert tokenizer_lib.load_tokenizer(None, str(tmp_path)).vocab == tok.vocab


def test_training_is_deterministic(tmp_path):
    a = tokenizer_lib.train_wordpiece_vocab(tokenizer_lib.dialogue_texts(RECORDS), vocab_size=300)
    b = tokenizer_lib.train_wordpiece_vocab(tokenizer_lib.dialogue_texts(RECORDS), vocab_size=300)
    assert a == b
    assert "猫" in a and len(set(a)) == len(a)


def test_pretrained_vocab_file_and_directory(tmp_path):
    tokens = [*tokenizer_lib.SPECIAL_TOKENS, "你", "好", "猫", "cat", "##s"]
    vocab_file = tmp_path / "vocab.txt"
    tokenizer_lib.write_vocab(tokens, str(vocab_file))
    tok = tokenizer_lib.load_tokenizer(str(vocab_file))
    # The transformers-5 trap: a tokenizer built with vocab_file= would give [UNK] for all of these.
    assert tok("你好猫 cats", add_special_tokens=False)["input_ids"] == [5, 6, 7, 8, 9]

    hf_dir = tmp_path / "bert-like"
    tok.save_pretrained(str(hf_dir))
    loaded = tokenizer_lib.load_tokenizer(str(hf_dir), data_dir=str(tmp_path / "unused"))
    assert isinstance(loaded, transformers.PreTrainedTokenizerBase)
    assert loaded("你好猫")["input_ids"] == [2, 5, 6, 7, 3]
    assert not (tmp_path / "unused").exists()


def test_errors_are_explicit(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local HF directory"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no training text"):
        tokenizer_lib.load_tokenizer(None, str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        tokenizer_lib.load_tokenizer(None)


# ---------------------------------------------------------------------------------------------
# LLM tokenizers: loading, special ids, decoding.
# ---------------------------------------------------------------------------------------------

CHINESE = ["视频里转的是啥", "红色三角啊", "我看到一个红色三角", "同问", "hello world"]
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
# Llama-2 closes an assistant turn with " </s>" (a space first); GLM-4 writes nothing after it.
LLAMA2 = "{% for m in messages %}{{ m['content'] + ' ' + (eos_token if m['role'] == 'assistant' else '') }}{% endfor %}"  # noqa: E501
GLM4 = (
    "[gMASK]<sop>{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}{% endfor %}"  # noqa: E501
)


def byte_level_bpe(path, special, template=None, **tokens):
    """A byte-level BPE tokenizer saved like an LLM checkpoint's (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CHINESE * 10 + ["system user assistant"], trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    if template:
        hf.chat_template = template
    hf.save_pretrained(str(path))
    return str(path)


def test_llm_tokenizer_directories_load_with_auto_tokenizer(tmp_path):
    path = byte_level_bpe(
        tmp_path / "qwen", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )  # fmt: skip
    assert not tokenizer_lib.is_wordpiece_dir(path)
    tok = tokenizer_lib.load_tokenizer(path, data_dir=str(tmp_path / "unused"))
    assert not tokenizer_lib.is_wordpiece(tok) and tok.chat_template == CHATML
    ids = tok.encode("红色三角啊", add_special_tokens=False)
    assert (
        tok.decode(ids) == "红色三角啊"
        and tokenizer_lib.cached_tokenizer(path).encode("红色三角啊", add_special_tokens=False)
        == ids
    )
    # A named LLM class decides without reading tokenizer.json; BERT classes stay WordPiece.
    config = tmp_path / "qwen" / "tokenizer_config.json"
    for cls, wordpiece in (("Qwen2Tokenizer", False), ("BertTokenizerFast", True)):
        config.write_text(json.dumps({"tokenizer_class": cls}), encoding="utf-8")
        assert tokenizer_lib.is_wordpiece_dir(path) is wordpiece
    # transformers 5 saves a BERT tokenizer as tokenizer.json only: still WordPiece.
    bert = tokenizer_lib.load_tokenizer(None, str(tmp_path / "v"), texts=CHINESE, vocab_size=100)
    bert.save_pretrained(str(tmp_path / "bert"))
    assert tokenizer_lib.is_wordpiece_dir(str(tmp_path / "bert"))
    loaded = tokenizer_lib.load_tokenizer(str(tmp_path / "bert"))
    assert isinstance(loaded, transformers.BertTokenizerFast)
    assert loaded("红色")["input_ids"] == bert("红色")["input_ids"]


def test_special_ids_of_wordpiece_gpt2_and_chat_tokenizers(tmp_path):
    wp = tokenizer_lib.load_tokenizer(None, str(tmp_path / "v"), texts=CHINESE, vocab_size=100)
    ids = tokenizer_lib.special_ids(wp)
    assert ids.wordpiece and ids.vocab_size == len(wp)
    assert (ids.pad_id, ids.cls_id, ids.sep_id, ids.mask_id) == (0, 2, 3, 4)
    assert (ids.bos_id, ids.eos_id, ids.end_id, ids.stop_ids) == (2, None, 3, (3,))
    assert ids.require("pad_id", "mask_id") == {"pad_id": 0, "mask_id": 4}

    # GPT-2 style: one <|endoftext|> for bos / eos / unk, no pad, no chat template.
    gpt2 = tokenizer_lib.load_tokenizer(
        byte_level_bpe(
            tmp_path / "gpt2",
            ["<|endoftext|>"],
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )  # fmt: skip
    )
    ids = tokenizer_lib.special_ids(gpt2)
    eot = gpt2.convert_tokens_to_ids("<|endoftext|>")
    assert not ids.wordpiece and ids.vocab_size == len(gpt2)
    assert (ids.pad_id, ids.bos_id, ids.eos_id, ids.end_id, ids.stop_ids) == (
        eot, eot, eot, eot, (eot,)
    )  # fmt: skip
    assert (ids.cls_id, ids.sep_id, ids.mask_id) == (None, None, None)
    with pytest.raises(ValueError, match=r"lacks \['\[CLS\]', '\[SEP\]'\]"):
        ids.require("pad_id", "cls_id", "sep_id")

    # Qwen style: the chat template's <|im_end|> ends a response; a base model's eos stops too.
    qwen = tokenizer_lib.load_tokenizer(
        byte_level_bpe(
            tmp_path / "qwen",
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            CHATML,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )  # fmt: skip
    )
    eot, im_end = qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    ids = tokenizer_lib.special_ids(qwen)
    assert (ids.pad_id, ids.bos_id, ids.eos_id) == (eot, None, eot)
    assert (ids.end_id, ids.stop_ids) == (im_end, (im_end, eot))

    # Llama-2's " </s>" ends at </s>, not at the space; GLM-4 (nothing after a turn) at eos.
    for name, template in (("llama2", LLAMA2), ("glm4", GLM4)):
        special = ["</s>", "<s>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>"]
        tok = tokenizer_lib.load_tokenizer(
            byte_level_bpe(tmp_path / name, special, template, eos_token="</s>", bos_token="<s>")
        )
        eos = tok.convert_tokens_to_ids("</s>")
        ids = tokenizer_lib.special_ids(tok)
        assert (ids.end_id, ids.stop_ids, ids.pad_id, ids.bos_id) == (
            eos, (eos,), eos, tok.convert_tokens_to_ids("<s>"),
        ), name  # fmt: skip


def test_config_special_ids_follow_the_pipeline_tokenizer(tmp_path):
    import ml_collections

    from tiktalk_jax import input_pipeline

    cfg = input_pipeline.default_config()
    cfg.vocab_dir, cfg.vocab_size = str(tmp_path), 321
    # No vocabulary trained yet: the trained vocabulary's conventions.
    ids = tokenizer_lib.config_special_ids(cfg)
    assert (ids.vocab_size, ids.pad_id, ids.cls_id, ids.sep_id, ids.mask_id) == (321, 0, 2, 3, 4)
    assert ids.stop_ids == (3,) and ids.wordpiece
    tok = tokenizer_lib.load_tokenizer(None, str(tmp_path), texts=CHINESE, vocab_size=100)
    assert tokenizer_lib.config_special_ids(cfg) == tokenizer_lib.special_ids(tok)
    path = byte_level_bpe(
        tmp_path / "qwen", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )  # fmt: skip
    given = ml_collections.ConfigDict(dict(cfg), type_safe=False)
    given.tokenizer = path
    ids = tokenizer_lib.config_special_ids(given)
    assert ids == tokenizer_lib.special_ids(tokenizer_lib.load_tokenizer(path))
    assert ids.stop_ids == (ids.end_id,) == (ids.eos_id,)


def test_decode_bpe_to_text_and_wordpiece_by_joining_pieces(tmp_path):
    qwen = tokenizer_lib.load_tokenizer(
        byte_level_bpe(
            tmp_path / "qwen",
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            CHATML,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )  # fmt: skip
    )
    start, im_end = qwen.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    text = "我看到一个红色三角 hello world"
    ids = [start, *qwen.encode(text, add_special_tokens=False), im_end, 7, 8]
    assert tokenizer_lib.decode(qwen, ids, [im_end]) == text  # special tokens skipped
    assert tokenizer_lib.decode(qwen, ids, [im_end, None]) == text
    assert tokenizer_lib.decode(qwen, np.array(ids[1:4]), ()) == qwen.decode(ids[1:4])
    wp = tokenizer_lib.load_tokenizer(None, str(tmp_path / "v"), texts=CHINESE, vocab_size=100)
    ids = wp("红色三角 hello world", add_special_tokens=True)["input_ids"]
    assert tokenizer_lib.decode(wp, ids, [wp.sep_token_id]) == "红色三角hello world"
    assert tokenizer_lib.join_wordpieces(["hel", "##lo", "鲸", "[UNK]", "[SEP]"]) == "hello鲸\ufffd"
