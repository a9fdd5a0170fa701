"""Beam search and greedy search under jit: static shapes, one `lax.while_loop`, any model.

The searches know nothing about models. A model supplies a step function

    step_fn(state, tokens: int[N, 1 + max_new_tokens], cur_len: int32[]) -> (logits[N, V], state)

returning the next-token logits of every row given `tokens[:, :cur_len]` (slot 0 holds the start
token; slots >= cur_len hold `pad_id`). `state` is any pytree (a key/value cache, or the inputs of
a full recompute); beam search reorders it with `reorder_fn(state, rows)` after every step (by
default every leaf is gathered along axis 0; a model whose cache has per-example parts shared by
all beams passes its own). N = batch for greedy, batch * num_beams for beam search (beams of an
example are adjacent rows).

The algorithm is the one of the original Maria / OSCAR code (`modeling_utils.py`, itself the
transformers 2.x `generate`), vectorised over the batch:
  * repetition penalty (CTRL): the raw logits of every token already in the row (start token
    included) are divided by the penalty when positive, multiplied when negative;
  * beam search: log-softmax, add the beam's running sum, take the top `candidates_per_beam *
    num_beams` (word, beam) pairs of the example; walk them best first: a pair whose word is an
    end token (or any pair at the last step) closes a hypothesis, the others become the next
    beams until `num_beams` are found. The `num_keep_best` best hypotheses are kept per example
    (the original's `BeamHypotheses(num_keep_best)`; 1 by default, as Maria decodes), ranked by
    `sum_logprob / len ** length_penalty`, `len` counting the start token and the words (not the
    end token). An example is done when it keeps `num_keep_best` hypotheses and the worst of them
    scores at least the best live candidate could: `best_sum / max_new_tokens ** length_penalty`.
    The loop stops when every example is done or after `max_new_tokens` steps;
  * greedy: argmax of the penalised logits; a finished row appends `pad_id`; the score is the sum
    of the chosen tokens' log-probabilities (end token included);
  * sampling (`sample_search`, as HF's `do_sample=True` warpers): the penalised logits are divided
    by `temperature`, cut to the `top_k` largest (0: no cut), then to the smallest set whose
    probability reaches `top_p` (1.0: no cut), and a token is drawn from what is left; finished
    rows append `pad_id` as in greedy; the score sums the log-probabilities of the drawn tokens
    under the cut distribution.

Deliberate deviation: at the last step the original closes hypotheses WITHOUT the word just chosen
(yet counts its log-probability) and greedy overwrites the last word with the end token; here the
word is kept, so `max_new_tokens` words can be generated. `max_new_tokens` counts decode steps;
the original's `max_length` counted the start token too (its `max_gen_length=20` = 19 steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
State = Any
StepFn = Callable[[State, Array, Array], tuple[Array, State]]
ReorderFn = Callable[[State, Array], State]

_DEAD = -1e9  # score of a beam slot that has no candidate (as the original's initial beams)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Search settings (hashable: a static argument of jitted functions).

    Defaults are Maria's: beam 5, 20 steps, length penalty 0.3, repetition penalty 3, end at
    [SEP] or [PAD] (bert-base-chinese ids; pass the tokenizer's).
    """

    max_new_tokens: int = 20
    num_beams: int = 5
    length_penalty: float = 0.3
    repetition_penalty: float = 3.0
    bos_id: int = 101
    eos_ids: tuple[int, ...] = (102, 0)
    pad_id: int = 0
    candidates_per_beam: int = 2
    # Beam search only: hypotheses returned per example (> 1: `SearchOutput` gains an axis).
    num_keep_best: int = 1
    # Sampling only (`sample_search`).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if min(self.max_new_tokens, self.num_beams, self.candidates_per_beam) < 1 or (
            self.num_keep_best < 1
        ):
            raise ValueError(f"invalid search config {self}")
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings in {self}")


class SearchOutput(NamedTuple):
    """tokens `int[B, max_new_tokens]`: the words, then `eos_ids[0]` when the hypothesis ended
    with an end token, then `pad_id`; lengths `int[B]`: words (end token excluded); scores
    `float[B]`: beam: `sum_logprob / (1 + length) ** length_penalty`; greedy: `sum_logprob`.

    Beam search with `num_keep_best = n > 1`: tokens `int[B, n, max_new_tokens]`, lengths and
    scores `[B, n]`, best first; a slot no hypothesis reached has score -inf and length 0."""

    tokens: Array
    lengths: Array
    scores: Array


def is_end(tokens: Array, eos_ids: tuple[int, ...]) -> Array:
    """`bool[...]`: which tokens are end tokens (none when `eos_ids` is empty)."""
    out = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        out = out | (tokens == e)
    return out


def apply_repetition_penalty(logits: Array, tokens: Array, cur_len: Array, penalty: float) -> Array:
    """CTRL repetition penalty on `logits: float[N, V]` for the tokens in `tokens[:, :cur_len]`."""
    if penalty == 1.0:
        return logits
    n, v = logits.shape
    filled = jnp.arange(tokens.shape[1])[None, :] < cur_len
    # Unfilled slots scatter out of range and are dropped.
    cols = jnp.where(filled, tokens, v)
    seen = jnp.zeros((n, v), bool).at[jnp.arange(n)[:, None], cols].set(True, mode="drop")
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def default_reorder(state: State, rows: Array) -> State:
    """Gathers every array leaf of `state` along axis 0: `new[i] = old[rows[i]]`."""
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), state)


def _initial_tokens(n: int, cfg: SearchConfig) -> Array:
    tokens = jnp.full((n, cfg.max_new_tokens + 1), cfg.pad_id, jnp.int32)
    return tokens.at[:, 0].set(cfg.bos_id)


def _finish(words: Array, lengths: Array, ended: Array, cfg: SearchConfig) -> Array:
    """`words[B, L]` -> words[:length], then eos_ids[0] where `ended`, then pad."""
    pos = jnp.arange(words.shape[1])[None, :]
    eos = cfg.eos_ids[0] if cfg.eos_ids else cfg.pad_id
    out = jnp.where(pos < lengths[:, None], words, cfg.pad_id)
    return jnp.where((pos == lengths[:, None]) & ended[:, None], eos, out).astype(jnp.int32)


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Top-k then top-p (nucleus) cut of `logits: float[N, V]`: removed tokens get -inf.

    Top-p keeps the most likely tokens until their probability reaches `top_p` (the first one
    always). Tokens tied with the last kept one are kept too.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(desc, num_kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _token_by_token(
    step_fn: StepFn,
    state: State,
    batch_size: int,
    cfg: SearchConfig,
    choose: Callable[[Array, Array], tuple[Array, Array]],
) -> SearchOutput:
    """One token per row and step; `choose(logits, cur_len) -> (token, logprob)`."""
    if cfg.num_keep_best != 1:
        raise ValueError("num_keep_best > 1 needs beam search (greedy / sampling keep one)")
    steps = cfg.max_new_tokens

    def cond(carry):
        cur_len, _, unfinished, _, _ = carry
        return (cur_len <= steps) & jnp.any(unfinished)

    def body(carry):
        cur_len, tokens, unfinished, sum_logprobs, state = carry
        logits, state = step_fn(state, tokens, cur_len)
        logits = apply_repetition_penalty(
            logits.astype(jnp.float32), tokens, cur_len, cfg.repetition_penalty
        )
        next_token, logp = choose(logits, cur_len)
        sum_logprobs = sum_logprobs + jnp.where(unfinished, logp, 0.0)
        add = jnp.where(unfinished, next_token, cfg.pad_id)
        tokens = jax.lax.dynamic_update_slice(tokens, add[:, None], (0, cur_len))
        unfinished = unfinished & ~is_end(add, cfg.eos_ids)
        return cur_len + 1, tokens, unfinished, sum_logprobs, state

    carry = (
        jnp.int32(1),
        _initial_tokens(batch_size, cfg),
        jnp.ones((batch_size,), bool),
        jnp.zeros((batch_size,), jnp.float32),
        state,
    )
    _, tokens, _, sum_logprobs, _ = jax.lax.while_loop(cond, body, carry)
    words = tokens[:, 1:]
    ends = is_end(words, cfg.eos_ids)
    ended = jnp.any(ends, axis=1)
    lengths = jnp.where(ended, jnp.argmax(ends, axis=1), steps).astype(jnp.int32)
    return SearchOutput(_finish(words, lengths, ended, cfg), lengths, sum_logprobs)


def _chosen_logprob(logits: Array, token: Array) -> Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]


def greedy_search(
    step_fn: StepFn, state: State, batch_size: int, cfg: SearchConfig
) -> SearchOutput:
    """Greedy decoding of `batch_size` rows (see the module docstring)."""

    def choose(logits, cur_len):
        del cur_len
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return token, _chosen_logprob(logits, token)

    return _token_by_token(step_fn, state, batch_size, cfg, choose)


def sample_search(
    step_fn: StepFn, state: State, batch_size: int, cfg: SearchConfig, rng: Array
) -> SearchOutput:
    """Temperature / top-k / top-p sampling of `batch_size` rows (see the module docstring);
    `rng` is a PRNG key, step t draws with `fold_in(rng, t)`."""

    def choose(logits, cur_len):
        cut = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
        token = jax.random.categorical(jax.random.fold_in(rng, cur_len), cut, axis=-1)
        token = token.astype(jnp.int32)
        return token, _chosen_logprob(cut, token)

    return _token_by_token(step_fn, state, batch_size, cfg, choose)


class _BeamCarry(NamedTuple):
    cur_len: Array  # int32[]: tokens per row so far (start token included)
    tokens: Array  # int32[B*K, 1 + L]
    beam_scores: Array  # float32[B, K]: running sum of log-probabilities
    done: Array  # bool[B]
    hyp_tokens: Array  # int32[B, N, 1 + L]: kept hypotheses (start token included), best first
    hyp_len: Array  # int32[B, N]: their lengths (start token included)
    hyp_ended: Array  # bool[B, N]: closed by an end token (False: by the length limit)
    hyp_score: Array  # float32[B, N]: their normalised scores (-inf: empty slot)
    state: State


def beam_search(
    step_fn: StepFn,
    state: State,
    batch_size: int,
    cfg: SearchConfig,
    reorder_fn: ReorderFn = default_reorder,
) -> SearchOutput:
    """Beam search over `batch_size` examples; `state` holds `batch_size * num_beams` rows (beams
    of an example adjacent). See the module docstring for the algorithm."""
    b, k, steps = batch_size, cfg.num_beams, cfg.max_new_tokens
    n_keep = cfg.num_keep_best
    n_cand = cfg.candidates_per_beam * k
    lp = cfg.length_penalty
    bound_den = float(steps) ** lp  # the original's (max_length - 1) ** length_penalty

    def cond(c: _BeamCarry):
        return (c.cur_len <= steps) & ~jnp.all(c.done)

    def body(c: _BeamCarry) -> _BeamCarry:
        logits, state = step_fn(c.state, c.tokens, c.cur_len)
        vocab = logits.shape[-1]
        logits = apply_repetition_penalty(
            logits.astype(jnp.float32), c.tokens, c.cur_len, cfg.repetition_penalty
        )
        logp = jax.nn.log_softmax(logits) + c.beam_scores.reshape(b * k)[:, None]
        top_scores, top_idx = jax.lax.top_k(logp.reshape(b, k * vocab), n_cand)  # [B, C]
        src_beam, word = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)

        full = jnp.all(jnp.isfinite(c.hyp_score), axis=1)
        worst = c.hyp_score[:, -1]
        done = c.done | (full & (worst >= top_scores[:, 0] / bound_den))
        eos = is_end(word, cfg.eos_ids)
        closes = eos | (c.cur_len == steps)
        live = ~closes
        # Candidates are walked best first and the walk stops once k live ones are taken.
        live_before = jnp.cumsum(live, axis=1) - live
        walked = live_before < k

        # Hypotheses: every walked closing candidate competes with the kept ones; the best
        # n_keep stay. lax.top_k puts the lower index first among equal scores, so a kept
        # hypothesis wins a tie against a new one, and earlier-walked candidates against later.
        cand_len = jnp.where(eos, c.cur_len, c.cur_len + 1)
        norm = top_scores / cand_len.astype(jnp.float32) ** lp
        norm = jnp.where(walked & closes & ~done[:, None], norm, -jnp.inf)
        rows = jnp.take_along_axis(
            c.tokens.reshape(b, k, -1), src_beam[:, :, None], axis=1
        )  # [B, C, 1 + L]
        slot = jnp.arange(steps + 1)[None, None, :] == c.cur_len
        rows = jnp.where(slot & ~eos[:, :, None], word[:, :, None], rows)
        pool_score = jnp.concatenate([c.hyp_score, norm], axis=1)
        best, keep = jax.lax.top_k(pool_score, n_keep)  # [B, N]
        pick = lambda kept, new: jnp.take_along_axis(
            jnp.concatenate([kept, new], axis=1),
            keep.reshape(keep.shape + (1,) * (kept.ndim - 2)),
            axis=1,
        )
        hyp_tokens = pick(c.hyp_tokens, rows)
        hyp_len = pick(c.hyp_len, cand_len)
        hyp_ended = pick(c.hyp_ended, eos)

        # Next beams: the first k live candidates (dead slots when fewer; done examples get
        # (score 0, pad, beam 0) as in the original).
        pick_live = (walked & live)[:, None, :] & (
            live_before[:, None, :] == jnp.arange(k)[None, :, None]
        )
        found = jnp.any(pick_live, axis=2)  # [B, K]
        idx = jnp.argmax(pick_live, axis=2)
        new_scores = jnp.where(found, jnp.take_along_axis(top_scores, idx, axis=1), _DEAD)
        new_words = jnp.where(found, jnp.take_along_axis(word, idx, axis=1), cfg.pad_id)
        new_src = jnp.where(found, jnp.take_along_axis(src_beam, idx, axis=1), 0)
        new_scores = jnp.where(done[:, None], 0.0, new_scores)
        new_words = jnp.where(done[:, None], cfg.pad_id, new_words)
        new_src = jnp.where(done[:, None], 0, new_src)

        flat = (jnp.arange(b)[:, None] * k + new_src).reshape(b * k)
        tokens = jnp.take(c.tokens, flat, axis=0)
        tokens = jax.lax.dynamic_update_slice(
            tokens, new_words.reshape(b * k, 1).astype(jnp.int32), (0, c.cur_len)
        )
        return _BeamCarry(
            c.cur_len + 1,
            tokens,
            new_scores.astype(jnp.float32),
            done,
            hyp_tokens,
            hyp_len,
            hyp_ended,
            best,
            reorder_fn(state, flat),
        )

    beam_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_DEAD)
    carry = _BeamCarry(
        jnp.int32(1),
        _initial_tokens(b * k, cfg),
        beam_scores,
        jnp.zeros((b,), bool),
        _initial_tokens(b * n_keep, cfg).reshape(b, n_keep, -1),
        jnp.ones((b, n_keep), jnp.int32),
        jnp.zeros((b, n_keep), bool),
        jnp.full((b, n_keep), -jnp.inf, jnp.float32),
        state,
    )
    out = jax.lax.while_loop(cond, body, carry)
    filled = jnp.isfinite(out.hyp_score)
    lengths = jnp.where(filled, out.hyp_len - 1, 0).reshape(b * n_keep).astype(jnp.int32)
    ended = (out.hyp_ended & filled).reshape(b * n_keep)
    words = out.hyp_tokens[:, :, 1:].reshape(b * n_keep, steps)
    tokens = _finish(words, lengths, ended, cfg)
    if n_keep == 1:
        return SearchOutput(tokens, lengths, out.hyp_score[:, 0])
    return SearchOutput(tokens.reshape(b, n_keep, steps), lengths.reshape(b, n_keep), out.hyp_score)
