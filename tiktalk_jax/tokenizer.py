"""Tokenizer loading: a pretrained HF vocabulary, or a WordPiece vocab trained on the train split.

Real runs point `pretrained` at a local HF directory (e.g. a `bert-base-chinese` download) or at a
BERT `vocab.txt`. Nothing can be downloaded on the machines this project targets, so without one
a WordPiece vocabulary is trained with the `tokenizers` library on the train split's text (titles,
context turns, responses, optionally extra text such as knowledge tails) and saved as `vocab.txt`
next to the dataset files; later calls (and other hosts) load that file instead of retraining.

The trained vocabulary follows bert-base-chinese's conventions so a checkpoint's embedding table
and the formatters do not care which one is in use: BERT normalizer (lower case, CJK characters
split into single-character words), BERT pre-tokenizer, `##` continuation prefix, and the special
tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` first (ids 0..4).

Trap (transformers 5): `BertTokenizerFast(vocab_file=...)` is silently ignored and yields a
tokenizer that maps everything to `[UNK]`; we always pass the vocabulary itself (`vocab=`).
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILENAME = "vocab.txt"

TextSource = Iterable[str] | Callable[[], Iterable[str]]


def _as_text(value: Any) -> str:
    """TFDS data sources return Text features as bytes; in-memory sources use str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def dialogue_texts(
    source: Sequence[Mapping[str, Any]], extra_text: Iterable[str] = ()
) -> Iterator[str]:
    """Yields the text of a dialogues split: every title once, every context turn, every response.

    Args:
      source: random-access dialogues records (`tfds.data_source` or a list of dicts).
      extra_text: more text to learn the vocabulary from (e.g. knowledge tails).
    """
    seen_titles = set()
    for i in range(len(source)):
        record = source[i]
        # Titles repeat for every dialogue of a video: count each once so frequencies stay honest.
        title = _as_text(record.get("title", ""))
        if title and title not in seen_titles:
            seen_titles.add(title)
            yield title
        for field in ("context", "responses"):
            for turn in record.get(field, ()):
                yield _as_text(turn)
    for text in extra_text:
        yield _as_text(text)


def train_wordpiece_vocab(
    texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 1
) -> list[str]:
    """Trains a BERT-style WordPiece vocabulary; returns the tokens in id order.

    Every character seen in `texts` is kept (CJK characters are words of their own after the BERT
    normalizer), so Chinese text of the training split never maps to `[UNK]`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise RuntimeError(f"special tokens are not first in the trained vocab: {tokens[:8]}")
    return tokens


def write_vocab(tokens: Sequence[str], path: str) -> None:
    """Writes one token per line, atomically: hosts sharing a file system may race to write it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".vocab-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for token in tokens:
            f.write(token + "\n")
    os.replace(tmp, path)


def read_vocab(path: str) -> dict[str, int]:
    """Reads a BERT vocab.txt into token -> id (line number)."""
    vocab = collections.OrderedDict()
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    return vocab


def tokenizer_from_vocab(
    path: str, *, do_lower_case: bool = True
) -> transformers.PreTrainedTokenizerBase:
    """A BERT fast tokenizer over a vocab.txt (passes the vocab itself; see module docstring)."""
    return transformers.BertTokenizerFast(vocab=read_vocab(path), do_lower_case=do_lower_case)


def load_tokenizer(
    pretrained: str | None,
    data_dir: str | None = None,
    *,
    texts: TextSource | None = None,
    vocab_size: int = 8000,
    min_frequency: int = 1,
) -> transformers.PreTrainedTokenizerBase:
    """Returns a BERT fast tokenizer.

    Args:
      pretrained: a local HF tokenizer directory (e.g. bert-base-chinese), or a `vocab.txt` file;
        None to use (or train) the vocabulary stored with the dataset.
      data_dir: where the dataset's `vocab.txt` lives (e.g. the dialogues builder's version dir).
        Used only when `pretrained` is None.
      texts: the training text (an iterable of str, or a zero-argument callable returning one so the
        split is only read when training is needed); see `dialogue_texts`. Required when
        `data_dir` has no vocab.txt yet.
      vocab_size: upper bound on the trained vocabulary (the sample's character set is far smaller).
      min_frequency: tokens seen fewer times are not added (characters are always kept).
    """
    if pretrained:
        if os.path.isdir(pretrained):
            return transformers.BertTokenizerFast.from_pretrained(pretrained)
        if os.path.isfile(pretrained):
            return tokenizer_from_vocab(pretrained)
        raise FileNotFoundError(
            f"pretrained tokenizer {pretrained!r} is neither a local HF directory nor a vocab.txt "
            "(nothing is downloaded; point it at a local copy of e.g. bert-base-chinese)"
        )
    if not data_dir:
        raise ValueError(
            "load_tokenizer needs `pretrained` or a `data_dir` to keep a trained vocab in"
        )
    path = os.path.join(data_dir, VOCAB_FILENAME)
    if not os.path.exists(path):
        if texts is None:
            raise FileNotFoundError(
                f"{path} does not exist and no training text was given to build it"
            )
        text_iter = texts() if callable(texts) else texts
        tokens = train_wordpiece_vocab(
            text_iter, vocab_size=vocab_size, min_frequency=min_frequency
        )
        write_vocab(tokens, path)
        logging.info("Trained a WordPiece vocab of %d tokens -> %s", len(tokens), path)
    return tokenizer_from_vocab(path)
