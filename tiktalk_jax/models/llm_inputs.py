"""The `llm` batch formatter (numpy only): a chat-style prompt from the video title and the
dialogue context, the response after it.

Registered with the input pipeline as "llm" when this module is imported. Two templates:

Chat template (the tokenizer has one, e.g. a Qwen2.5 / GLM-4 / Llama-3 chat checkpoint): the
tokenizer's own template renders

    system     SYSTEM_PROMPT (dropped if the template refuses a system turn)
    user       USER_TEMPLATE: "视频标题：{title}\\n评论区对话：\\n{turn_1}\\n...\\n{turn_n}"
    assistant  the generation prompt (`add_generation_prompt=True`)

and the response is `{response}{end}`, `end` being the first token the template writes after an
assistant message (Qwen: `<|im_end|>`; the tokenizer's eos when the template writes nothing).

Plain template (no chat template: the WordPiece vocabulary trained on the data, or a base LLM):

    {bos}视频标题：{title}{sep}{turn_1}{sep}...{turn_n}{sep}回复：      response: {response}{end}

bos: [CLS] / the tokenizer's bos token (none if it has neither); sep: [SEP] (BERT
normalizers drop newlines) else the tokenizer's "\\n"; end: the eos token, else [SEP]. With the
trained vocabulary, end = [SEP] and pad = [PAD], which is where the evaluator stops reading.

Both are assembled from token pieces: the template text around the title and the turns is
rendered once with marker strings and tokenized once per formatter; an example's title and turns
are tokenized alone (in one batched call) and spliced in. A BPE tokenizer may merge across a
piece boundary differently when encoding the whole rendered string; the pieces always decode to
that string.

Outputs (B batch, Lc = max_context_len, Lr = max_response_len, R = num_references):
  prompt_ids   int32[B, Lc], prompt_mask bool[B, Lc]   LEFT-padded: the prompt ends at slot
               Lc - 1, next to the response, and generation continues every row from there.
               The title keeps its first `max_title_len` tokens (default 32); then the most
               recent turns that fit are kept (the latest alone too long: its end).
  response_ids int32[B, Lr], response_mask bool[B, Lr]  `response end`, right-padded; a
               truncated response keeps its end token. The loss is on these tokens only.
  eval, when num_references > 0: references_ids int32[B, R, Lr], references_mask (all-padding
    rows where a record has fewer responses), laid out like response_ids.

Tokenizer. `config.input.tokenizer`, a local HF directory, is the LLM's own tokenizer (byte-level
BPE, chat template; `tokenizer.load_tokenizer` reads it with `AutoTokenizer`); unset, the
pipeline's WordPiece vocabulary trained on the data. Special ids come from
`tokenizer.special_ids`.

Evaluation hooks (registered on the `llm` and `blip2` families): `decode_text` turns generated
ids into text with the tokenizer itself (stopping at the template's end token / eos; byte-level
BPE decoded to UTF-8, special tokens skipped; WordPiece pieces joined), `encode_candidates` lays
retrieval candidates out exactly like `response_ids` (`response end`, right-padded).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib

FORMATTER = "llm"
# The paper's LLM baseline is told what the data is; the wording is ours (the paper gives none).
SYSTEM_PROMPT = "你是短视频评论区里的一位观众。根据视频标题和评论区的对话，写出下一条回复。"
USER_TEMPLATE = "视频标题：{title}\n评论区对话：\n{context}"
PLAIN_TITLE = "视频标题："
PLAIN_REPLY = "回复："
DEFAULT_MAX_TITLE_LEN = 32

# Markers substituted into the template before it is split into pieces (private-use code
# points: no chat template or tokenizer gives them a meaning).
_TITLE, _CONTEXT, _RESPONSE = "\ue000TITLE\ue000", "\ue001CONTEXT\ue001", "\ue002RESPONSE\ue002"


def tokenizer_for(input_config: ml_collections.ConfigDict, given: Any = None) -> Any:
    """The tokenizer the `llm` formatter uses: `input_config.tokenizer`'s when it is a local HF
    directory (`tokenizer.load_tokenizer`: the LLM's own), else `given` (the pipeline's: a
    vocab.txt or the trained one)."""
    path = input_config.get("tokenizer")
    if path and os.path.isdir(path):
        return tokenizer_lib.cached_tokenizer(path)
    if given is None:
        raise ValueError("no tokenizer: pass the pipeline's, or set config.input.tokenizer")
    return given


def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return _backend(tokenizer).encode(text, add_special_tokens=False).ids if text else []


class Template(NamedTuple):
    """The prompt as token pieces: `before_title title after_title turn (turn_sep turn)...
    after_context`, then the response and `end_id`."""

    before_title: tuple[int, ...]
    after_title: tuple[int, ...]
    turn_sep: tuple[int, ...]
    after_context: tuple[int, ...]
    end_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # generation stops at any of these (end_id first)
    chat: bool  # rendered by the tokenizer's chat template
    text: str  # the prompt with {title} and {context} placeholders (logs, docs)

    @property
    def fixed_len(self) -> int:
        """Prompt tokens that are not title or turns (with one turn)."""
        return len(self.before_title) + len(self.after_title) + len(self.after_context)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _chat_messages(tokenizer: Any, user: str) -> list[dict[str, str]]:
    """System + user turns, or the user turn alone when the template rejects a system turn."""
    with_system = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    try:
        _render(tokenizer, with_system, True)
        return with_system
    except Exception:  # noqa: BLE001 - jinja templates raise whatever they like
        return with_system[1:]


def _chat_template(tokenizer: Any, ids: tokenizer_lib.SpecialIds) -> Template:
    user = USER_TEMPLATE.format(title=_TITLE, context=_CONTEXT)
    messages = _chat_messages(tokenizer, user)
    prompt = _render(tokenizer, messages, True)
    if prompt.count(_TITLE) != 1 or prompt.count(_CONTEXT) != 1:
        raise ValueError("the chat template does not render the user message verbatim")
    before, rest = prompt.split(_TITLE)
    between, after = rest.split(_CONTEXT)
    if ids.end_id is None:
        raise ValueError("the chat template closes no assistant turn and there is no eos token")
    text = prompt.replace(_TITLE, "{title}").replace(_CONTEXT, "{context}")
    return Template(
        before_title=tuple(_encode(tokenizer, before)),
        after_title=tuple(_encode(tokenizer, between)),
        turn_sep=tuple(_encode(tokenizer, "\n")),
        after_context=tuple(_encode(tokenizer, after)),
        end_id=ids.end_id,
        pad_id=ids.pad_id,
        stop_ids=ids.stop_ids,
        chat=True,
        text=text,
    )


def _plain_template(tokenizer: Any, ids: tokenizer_lib.SpecialIds) -> Template:
    bos, end = ids.bos_id, ids.end_id
    sep = [ids.sep_id] if ids.sep_id is not None else _encode(tokenizer, "\n")
    if end is None or not sep:
        raise ValueError("the tokenizer has neither an eos nor a [SEP] token to end a response")
    backend = _backend(tokenizer)
    name = lambda ids: "".join(backend.id_to_token(i) for i in ids)  # noqa: E731
    return Template(
        before_title=tuple(([bos] if bos is not None else []) + _encode(tokenizer, PLAIN_TITLE)),
        after_title=tuple(sep),
        turn_sep=tuple(sep),
        after_context=tuple(sep + _encode(tokenizer, PLAIN_REPLY)),
        end_id=end,
        pad_id=ids.pad_id,
        stop_ids=(end,),
        chat=False,
        text=(
            f"{name([bos]) if bos is not None else ''}{PLAIN_TITLE}{{title}}{name(sep)}"
            f"{{context}}{name(sep)}{PLAIN_REPLY}"
        ),
    )


def make_template(tokenizer: Any) -> Template:
    """The tokenizer's chat template as pieces when it has one, else the plain template (ids
    from `tokenizer.special_ids`)."""
    ids = tokenizer_lib.special_ids(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return _chat_template(tokenizer, ids)
    return _plain_template(tokenizer, ids)


def token_spec(config: ml_collections.ConfigDict) -> tokenizer_lib.SpecialIds:
    """The special ids (vocab_size, pad_id, end_id, stop_ids, ...) of the tokenizer the pipeline
    gives `config`'s data: `tokenizer.config_special_ids(config.input)`."""
    return tokenizer_lib.config_special_ids(config.input)


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = _backend(tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def decode_text(config: ml_collections.ConfigDict, tokenizer: Any, tokens: np.ndarray) -> list[str]:
    """Registry `decode_text`: generated ids `int[N, T]` -> N texts, each up to the first stop
    id (the template's end token, the eos; padding follows them), decoded by the tokenizer
    (`tokenizer.decode`: no special tokens, no byte-level artefacts)."""
    tok = tokenizer_for(config.input, tokenizer)
    ids = tokenizer_lib.special_ids(tok)
    return [tokenizer_lib.decode(tok, row, ids.stop_ids) for row in np.asarray(tokens)]


def encode_candidates(
    config: ml_collections.ConfigDict, tokenizer: Any, candidates: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Registry `encode_candidates`: texts `[N][C]` -> `(int32[N, C, Lr], bool[N, C, Lr])` laid
    out like `response_ids` (`response end`, pad-filled; a truncated candidate keeps its end
    token), so a candidate is scored exactly as a response is trained."""
    tok = tokenizer_for(config.input, tokenizer)
    t = make_template(tok)
    lr = int(config.input.max_response_len)
    n, c = len(candidates), len(candidates[0])
    tokens = _encode_batch(tok, [text for row in candidates for text in row])
    ids = np.full((n * c, lr), t.pad_id, np.int32)
    lengths = np.zeros((n * c,), np.int32)
    for i, row in enumerate(tokens):
        kept = [*row[: lr - 1], t.end_id]
        ids[i, : len(kept)] = kept
        lengths[i] = len(kept)
    mask = np.arange(lr)[None, :] < lengths[:, None]
    return ids.reshape(n, c, lr), mask.reshape(n, c, lr)


@ip.register_formatter(FORMATTER, batched=True)
class LlmFormatter:
    """Batched formatter (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool):
        self.tokenizer = tokenizer_for(config, tokenizer)
        self.template = make_template(self.tokenizer)
        self.lc = int(config.max_context_len)
        self.lr = int(config.max_response_len)
        self.max_title = int(config.get("max_title_len", DEFAULT_MAX_TITLE_LEN))
        self.num_references = 0 if train else int(config.get("num_references", 0))
        need = self.template.fixed_len + self.max_title + 1
        if self.lc < need:
            raise ValueError(
                f"max_context_len {self.lc} leaves no room for the dialogue: the template takes "
                f"{self.template.fixed_len} tokens and the title up to {self.max_title} "
                f"(max_title_len); use at least {need}"
            )
        if self.lr < 2:
            raise ValueError("max_response_len must be at least 2 (a token and the end)")

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return _encode_batch(self.tokenizer, texts)

    def prompt(self, title: list[int], turns: list[list[int]]) -> list[int]:
        """The prompt tokens of one example (at most Lc; see the module docstring)."""
        t = self.template
        title = title[: self.max_title]
        budget = self.lc - t.fixed_len - len(title)
        kept: list[list[int]] = []
        for turn in reversed(turns):
            cost = len(turn) + (len(t.turn_sep) if kept else 0)
            if cost <= budget:
                kept.append(turn)
                budget -= cost
            else:
                if not kept:  # the latest turn alone is too long: keep its end
                    kept.append(turn[len(turn) - budget :])
                break
        context: list[int] = []
        for i, turn in enumerate(reversed(kept)):
            context += [*t.turn_sep, *turn] if i else turn
        return [*t.before_title, *title, *t.after_title, *context, *t.after_context]

    def _response(self, tokens: list[int], out: np.ndarray) -> int:
        ids = [*tokens[: self.lr - 1], self.template.end_id]
        out[: len(ids)] = ids
        return len(ids)

    def __call__(self, records: Sequence[ip.Record]) -> dict[str, np.ndarray]:
        n_refs = max(self.num_references, 1)
        texts: list[str] = []
        spans = []  # per record: (title index, n turns, n responses) into `texts`
        for r in records:
            turns = [ip.as_text(t) for t in r["context"]]
            responses = [ip.as_text(t) for t in list(r["responses"])[:n_refs]]
            spans.append((len(texts), len(turns), len(responses)))
            texts += [ip.as_text(r.get("title", "")), *turns, *responses]
        tokens = self._encode(texts)
        b, pad = len(records), self.template.pad_id
        prompt = np.full((b, self.lc), pad, np.int32)
        prompt_len = np.zeros((b,), np.int32)
        refs = np.full((b, n_refs, self.lr), pad, np.int32)
        refs_len = np.zeros((b, n_refs), np.int32)
        for i, (start, n_turns, n_resp) in enumerate(spans):
            ids = self.prompt(tokens[start], tokens[start + 1 : start + 1 + n_turns])
            prompt[i, self.lc - len(ids) :] = ids
            prompt_len[i] = len(ids)
            first = start + 1 + n_turns
            for j in range(n_resp):
                refs_len[i, j] = self._response(tokens[first + j], refs[i, j])
        refs_mask = np.arange(self.lr) < refs_len[..., None]
        batch = {
            "prompt_ids": prompt,
            "prompt_mask": np.arange(self.lc)[None, :] >= self.lc - prompt_len[:, None],
            "response_ids": refs[:, 0].copy(),
            "response_mask": refs_mask[:, 0].copy(),
        }
        if self.num_references:
            batch["references_ids"], batch["references_mask"] = refs, refs_mask
        return batch
