"""Tokenizer: training a WordPiece vocab on the train split, reuse, and pretrained loading."""

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
