"""Tokenizers: loading any local HF tokenizer or training a WordPiece vocab on the train split;
the special ids every model family reads; decoding generated ids to text.

Real runs point `pretrained` at a local HF directory (a `bert-base-chinese` download, or an LLM
checkpoint's own tokenizer: Qwen2.5 / Llama-3 / GLM-4 `tokenizer.json` + `tokenizer_config.json`
with a chat template) or at a BERT `vocab.txt`. BERT (WordPiece) directories load as
`BertTokenizerFast`, every other tokenizer through `AutoTokenizer` (`is_wordpiece_dir`). Nothing
can be downloaded on the machines this project targets, so without one
a WordPiece vocabulary is trained with the `tokenizers` library on the train split's text (titles,
context turns, responses, optionally extra text such as knowledge tails) and saved as `vocab.txt`
next to the dataset files; later calls (and other hosts) load that file instead of retraining.

The trained vocabulary follows bert-base-chinese's conventions so a checkpoint's embedding table
and the formatters do not care which one is in use: BERT normalizer (lower case, CJK characters
split into single-character words), BERT pre-tokenizer, `##` continuation prefix, and the special
tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` first (ids 0..4).

Trap (transformers 5): `BertTokenizerFast(vocab_file=...)` is silently ignored and yields a
tokenizer that maps everything to `[UNK]`; we always pass the vocabulary itself (`vocab=`).

Special ids (`special_ids`, `config_special_ids`): the one place that says which ids pad, start,
end and stop a sequence for any tokenizer, BERT conventions (`[PAD] [CLS] [SEP] [MASK]`) or an
LLM's (pad / bos / eos tokens, the chat template's end-of-turn token such as `<|im_end|>`).

Decoding (`decode`): WordPiece pieces are joined without spaces (Chinese) with `##` stripped;
any other tokenizer decodes with its own decoder (byte-level BPE bytes -> UTF-8), special tokens
skipped.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILENAME = "vocab.txt"
# tokenizer_config.json classes that are WordPiece with BERT's conventions ("Fast" stripped).
WORDPIECE_CLASSES = frozenset({"BertTokenizer", "BertJapaneseTokenizer"})

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


def is_wordpiece_dir(path: str) -> bool:
    """Whether the HF tokenizer directory `path` is a BERT (WordPiece) tokenizer.

    `tokenizer_config.json`'s `tokenizer_class` decides when it names a class; a generic class
    (`PreTrainedTokenizerFast`, transformers 5's `TokenizersBackend`) or none defers to
    `tokenizer.json`'s model type; a directory with only a `vocab.txt` is BERT.
    """
    config_path = os.path.join(path, "tokenizer_config.json")
    cls = None
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            cls = json.load(f).get("tokenizer_class")
    if cls:
        cls = cls.removesuffix("Fast")
        if cls in WORDPIECE_CLASSES:
            return True
        if cls not in ("PreTrainedTokenizer", "TokenizersBackend"):
            return False
    tokenizer_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        with open(tokenizer_json, encoding="utf-8") as f:
            return json.load(f).get("model", {}).get("type") == "WordPiece"
    return os.path.isfile(os.path.join(path, VOCAB_FILENAME))


def _load_pretrained(path: str) -> transformers.PreTrainedTokenizerBase:
    if os.path.isdir(path):
        if is_wordpiece_dir(path):
            return transformers.BertTokenizerFast.from_pretrained(path)
        # LLM tokenizers (byte-level BPE, chat template). No trust_remote_code: a checkpoint
        # whose tokenizer is Python code (GLM-4's original `tokenization_chatglm.py`) needs its
        # tokenizer.json conversion (e.g. the `-hf` releases).
        return transformers.AutoTokenizer.from_pretrained(path)
    if os.path.isfile(path):
        return tokenizer_from_vocab(path)
    raise FileNotFoundError(
        f"pretrained tokenizer {path!r} is neither a local HF directory nor a vocab.txt "
        "(nothing is downloaded; point it at a local copy of e.g. bert-base-chinese)"
    )


@functools.lru_cache(maxsize=8)
def _cached_pretrained(path: str, mtime: float) -> transformers.PreTrainedTokenizerBase:
    del mtime  # part of the key: a rewritten vocab.txt is read again
    return _load_pretrained(path)


def cached_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    """`load_tokenizer(path)` of a local directory or vocab.txt, loaded once per process (model
    builders, formatters and the evaluator ask for it many times; an LLM's tokenizer.json takes
    a second to parse)."""
    path = os.path.abspath(path)
    mtime = os.path.getmtime(path) if os.path.exists(path) else 0.0
    return _cached_pretrained(path, mtime)


def load_tokenizer(
    pretrained: str | None,
    data_dir: str | None = None,
    *,
    texts: TextSource | None = None,
    vocab_size: int = 8000,
    min_frequency: int = 1,
) -> transformers.PreTrainedTokenizerBase:
    """Returns a HF fast tokenizer: BERT's for WordPiece vocabularies, else `AutoTokenizer`'s.

    Args:
      pretrained: a local HF tokenizer directory (e.g. bert-base-chinese, or an LLM checkpoint's
        tokenizer.json + tokenizer_config.json), or a `vocab.txt` file; None to use (or train)
        the vocabulary stored with the dataset.
      data_dir: where the dataset's `vocab.txt` lives (e.g. the dialogues builder's version dir).
        Used only when `pretrained` is None.
      texts: the training text (an iterable of str, or a zero-argument callable returning one so the
        split is only read when training is needed); see `dialogue_texts`. Required when
        `data_dir` has no vocab.txt yet.
      vocab_size: upper bound on the trained vocabulary (the sample's character set is far smaller).
      min_frequency: tokens seen fewer times are not added (characters are always kept).
    """
    if pretrained:
        return _load_pretrained(pretrained)
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


# ---------------------------------------------------------------------------------------------
# Special ids of any tokenizer.
# ---------------------------------------------------------------------------------------------

# Where `SpecialIds.require` names the missing token: BERT's names for the ids BERT formats need.
_BERT_NAMES = {"pad_id": "[PAD]", "cls_id": "[CLS]", "sep_id": "[SEP]", "mask_id": "[MASK]"}
# Stands for a response while finding the token a chat template closes an assistant turn with
# (a private-use code point: no template or tokenizer gives it a meaning).
_RESPONSE_MARKER = "\ue002RESPONSE\ue002"


class SpecialIds(NamedTuple):
    """The special token ids of a tokenizer (None: it has no such token).

    vocab_size: tokens including added ones (the embedding table needs at least this many).
    pad_id: `[PAD]`, else the pad token, else eos, else 0 (padding is always masked).
    cls_id, sep_id, mask_id: BERT's `[CLS] [SEP] [MASK]`.
    bos_id: the start of a sequence: `[CLS]`, else the bos token.
    eos_id: the tokenizer's eos token.
    end_id: the token that ends a response: the chat template's end of an assistant turn
      (Qwen `<|im_end|>`, Llama-3 `<|eot_id|>`; eos when the template writes no special token
      after it), else `[SEP]`, else eos.
    stop_ids: generation stops at any of these: end_id first, then eos.
    wordpiece: BERT vocabulary conventions (`##` pieces; text is decoded by joining pieces).
    """

    vocab_size: int
    pad_id: int
    cls_id: int | None
    sep_id: int | None
    mask_id: int | None
    bos_id: int | None
    eos_id: int | None
    end_id: int | None
    stop_ids: tuple[int, ...]
    wordpiece: bool

    def require(self, *names: str) -> dict[str, int]:
        """`{name: id}` of the named fields; ValueError naming the tokens the vocabulary lacks."""
        missing = [_BERT_NAMES.get(n, n) for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks {missing}")
        return {n: int(getattr(self, n)) for n in names}


def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def is_wordpiece(tokenizer: Any) -> bool:
    """Whether `tokenizer` (HF fast or `tokenizers.Tokenizer`) is a WordPiece model."""
    return type(_backend(tokenizer).model).__name__ == "WordPiece"


def _token_id(tokenizer: Any, *names: str) -> int | None:
    """Id of the first of `names` the tokenizer has: a literal token ("[SEP]") or the name of
    one of its special-token attributes ("eos_token")."""
    backend = _backend(tokenizer)
    for name in names:
        token = getattr(tokenizer, name, None) if name.endswith("_token") else name
        if token:
            i = backend.token_to_id(str(token))
            if i is not None:
                return int(i)
    return None


def chat_end_id(tokenizer: Any) -> int | None:
    """The token a chat template writes right after an assistant message (None: no template,
    or it writes no special token there, e.g. GLM-4, whose turns end at the next role token)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = {"role": "user", "content": "?"}
    answer = {"role": "assistant", "content": _RESPONSE_MARKER}
    rendered = None
    for messages in ([user, answer], [{"role": "system", "content": "?"}, user, answer]):
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
            break
        except Exception:  # noqa: BLE001, S112 - jinja templates raise whatever they like
            continue
    if not rendered or _RESPONSE_MARKER not in rendered:
        return None
    closing = rendered.split(_RESPONSE_MARKER, 1)[1]
    ids = _backend(tokenizer).encode(closing, add_special_tokens=False).ids if closing else []
    # The first special token, so that a template closing with " </s>" (a space first) ends at
    # </s>, not at the space.
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return next((int(i) for i in ids if i in special), None)


def special_ids(tokenizer: Any) -> SpecialIds:
    """The special ids of a HF tokenizer (see `SpecialIds`)."""
    cls_id, sep_id = _token_id(tokenizer, "[CLS]", "cls_token"), _token_id(tokenizer, "[SEP]")
    eos_id = _token_id(tokenizer, "eos_token")
    pad_id = _token_id(tokenizer, "[PAD]", "pad_token", "eos_token")
    end_id = chat_end_id(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if end_id is None:
        end_id = sep_id if sep_id is not None else eos_id
    return SpecialIds(
        vocab_size=int(_backend(tokenizer).get_vocab_size(with_added_tokens=True)),
        pad_id=0 if pad_id is None else pad_id,
        cls_id=cls_id,
        sep_id=sep_id,
        mask_id=_token_id(tokenizer, "[MASK]", "mask_token"),
        bos_id=cls_id if cls_id is not None else _token_id(tokenizer, "bos_token"),
        eos_id=eos_id,
        end_id=end_id,
        stop_ids=tuple(dict.fromkeys(i for i in (end_id, eos_id) if i is not None)),
        wordpiece=is_wordpiece(tokenizer),
    )


def trained_vocab_file(input_config: Any) -> str | None:
    """The `vocab.txt` the pipeline trained (and reuses) for `input_config`'s data, if it exists
    yet: in `vocab_dir`, else in the dataset's directory."""
    vocab_dir = input_config.get("vocab_dir")
    if not vocab_dir:
        from tiktalk_jax import input_pipeline  # imports this module

        try:
            vocab_dir = input_pipeline.dataset_dir(
                input_config.get("data_dir"), input_config.dataset
            )
        except FileNotFoundError:
            return None
    path = os.path.join(vocab_dir, VOCAB_FILENAME)
    return path if os.path.isfile(path) else None


def config_special_ids(input_config: Any) -> SpecialIds:
    """The special ids of the tokenizer the pipeline gives `input_config`'s data (as
    `input_pipeline.make_datasets` resolves it): `input_config.tokenizer` (a HF directory or a
    vocab.txt), else the vocab.txt trained for the data, else (not trained yet) the trained
    vocabulary's conventions: `SPECIAL_TOKENS` first, at most `input_config.vocab_size` tokens."""
    path = input_config.get("tokenizer") or trained_vocab_file(input_config)
    if path:
        return special_ids(cached_tokenizer(str(path)))
    pad, cls, sep, mask = (SPECIAL_TOKENS.index(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
    return SpecialIds(
        vocab_size=int(input_config.vocab_size),
        pad_id=pad,
        cls_id=cls,
        sep_id=sep,
        mask_id=mask,
        bos_id=cls,
        eos_id=None,
        end_id=sep,
        stop_ids=(sep,),
        wordpiece=True,
    )


# ---------------------------------------------------------------------------------------------
# Ids -> text.
# ---------------------------------------------------------------------------------------------

# WordPiece tokens that never appear in decoded text ([UNK] is kept, as one character).
_DROPPED_PIECES = frozenset({"[PAD]", "[CLS]", "[SEP]", "[MASK]"})
UNK_TEXT = "\ufffd"


def join_wordpieces(pieces: Sequence[str]) -> str:
    """WordPiece pieces -> text, for Chinese: pieces are joined without spaces and `##` is
    stripped; a space is kept only between two ASCII alphanumeric words (so "hello world"
    survives). Special tokens are dropped; `[UNK]` becomes U+FFFD (one character)."""
    out = ""
    for piece in pieces:
        if piece in _DROPPED_PIECES:
            continue
        if piece == "[UNK]":
            out += UNK_TEXT
        elif piece.startswith("##"):
            out += piece[2:]
        elif (
            out
            and out[-1].isascii()
            and out[-1].isalnum()
            and piece[0].isascii()
            and (piece[0].isalnum())
        ):
            out += " " + piece
        else:
            out += piece
    return out


def decode(tokenizer: Any, ids: Sequence[int], stop_ids: Iterable[int] = ()) -> str:
    """Ids `int[T]` up to the first of `stop_ids` -> text: WordPiece vocabularies by
    `join_wordpieces`; any other tokenizer by its own decoder (byte-level BPE bytes -> UTF-8),
    special tokens skipped."""
    stops = {int(i) for i in stop_ids if i is not None}
    kept = []
    for i in ids:
        if int(i) in stops:
            break
        kept.append(int(i))
    if is_wordpiece(tokenizer):
        return join_wordpieces(tokenizer.convert_ids_to_tokens(kept))
    return tokenizer.decode(kept, skip_special_tokens=True)
