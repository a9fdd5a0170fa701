"""Generic beam / greedy search against a plain-Python port of the original Maria search."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiktalk_jax import decoding

V, B = 12, 3
BOS, PAD, SEP = 1, 0, 2


def _tables(seed, eos_boost):
    """A toy model whose logits depend on the whole history (so beam reordering matters)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(V, V)).astype(np.float32)
    bias = (2.0 * rng.normal(size=(B, V))).astype(np.float32)
    pos = rng.normal(size=(16, V)).astype(np.float32)
    pos[:, SEP] += eos_boost * np.arange(16)  # the end token gets likelier with length
    return w, bias, pos


def _ref_logits(tables, b, history):
    w, bias, pos = tables
    return sum(w[t] for t in history) + bias[b] + pos[len(history)]


def _penalise(logits, history, penalty):
    out = logits.astype(np.float64).copy()
    for t in set(history):
        out[t] = out[t] * penalty if out[t] < 0 else out[t] / penalty
    return out


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def ref_beam_search(tables, cfg):
    """The original `_generate_beam_search` + `BeamHypotheses(n_hyp=1)`, loop by loop, with the
    last step keeping its word (the documented deviation)."""
    k, steps, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    rows = [[BOS] for _ in range(B * k)]
    scores = np.zeros(B * k)
    scores.reshape(B, k)[:, 1:] = -1e9
    hyps, done = [None] * B, [False] * B
    cur_len = 1
    while cur_len <= steps:
        logp = np.stack(
            [
                _log_softmax(
                    _penalise(_ref_logits(tables, i // k, rows[i]), rows[i], cfg.repetition_penalty)
                )
                + scores[i]
                for i in range(B * k)
            ]
        )
        nxt = []
        for b in range(B):
            flat = logp[b * k : (b + 1) * k].reshape(-1)
            order = np.argsort(-flat, kind="stable")[: cfg.candidates_per_beam * k]
            best_next = flat[order[0]]
            done[b] = done[b] or (hyps[b] is not None and hyps[b][0] >= best_next / steps**lp)
            if done[b]:
                nxt += [(0.0, PAD, b * k)] * k
                continue
            beam = []
            for idx in order:
                src, word = divmod(int(idx), V)
                s = flat[idx]
                if word in cfg.eos_ids or cur_len == steps:
                    ended = word in cfg.eos_ids
                    hyp = rows[b * k + src][:cur_len] + ([] if ended else [word])
                    norm = s / len(hyp) ** lp
                    if hyps[b] is None or norm > hyps[b][0]:
                        hyps[b] = (norm, hyp, ended)
                else:
                    beam.append((s, word, b * k + src))
                if len(beam) == k:
                    break
            beam += [(-1e9, PAD, b * k)] * (k - len(beam))
            nxt += beam
        scores = np.array([s for s, _, _ in nxt])
        rows = [rows[src][:cur_len] + [w] for _, w, src in nxt]
        cur_len += 1
        if all(done):
            break
    return hyps


def ref_greedy(tables, cfg):
    out = []
    for b in range(B):
        row, total = [BOS], 0.0
        for _ in range(cfg.max_new_tokens):
            logits = _penalise(_ref_logits(tables, b, row), row, cfg.repetition_penalty)
            word = int(np.argmax(logits))
            total += _log_softmax(logits)[word]
            row.append(word)
            if word in cfg.eos_ids:
                break
        out.append((row[1:], total))
    return out


def _step(tables, state, tokens, cur_len):
    w, bias, pos = tables
    last = jax.lax.dynamic_index_in_dim(tokens, cur_len - 1, axis=1, keepdims=False)
    h = state + w[last]
    rows_per_example = tokens.shape[0] // B
    logits = h + jnp.repeat(bias, rows_per_example, axis=0) + pos[cur_len]
    return logits, h


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def _search(tables, cfg, greedy):
    rows = B if greedy else B * cfg.num_beams
    state = jnp.zeros((rows, V), jnp.float32)
    step = functools.partial(_step, tables)
    if greedy:
        return decoding.greedy_search(step, state, B, cfg)
    return decoding.beam_search(step, state, B, cfg)


CFG = decoding.SearchConfig(
    max_new_tokens=7, num_beams=3, bos_id=BOS, eos_ids=(SEP, PAD), pad_id=PAD
)


@pytest.mark.parametrize("seed", range(6))
def test_beam_search_matches_the_original_algorithm(seed):
    tables = _tables(seed, eos_boost=0.6 * (seed % 3))
    out = jax.device_get(_search(tuple(map(jnp.asarray, tables)), CFG, False))
    for b, (score, hyp, ended) in enumerate(ref_beam_search(tables, CFG)):
        words = hyp[1:]
        n = len(words)
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], words)
        rest = out.tokens[b, n:]
        if ended:
            assert rest[0] == SEP and (rest[1:] == PAD).all()
        else:
            assert n == CFG.max_new_tokens
        np.testing.assert_allclose(out.scores[b], score, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_greedy_matches_the_original_algorithm(seed):
    tables = _tables(seed, eos_boost=0.8)
    out = jax.device_get(_search(tuple(map(jnp.asarray, tables)), CFG, True))
    for b, (words, total) in enumerate(ref_greedy(tables, CFG)):
        ended = words[-1] in CFG.eos_ids
        n = len(words) - int(ended)
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], words[:n])
        np.testing.assert_allclose(out.scores[b], total, rtol=1e-5)


def test_search_without_end_tokens_runs_every_step():
    cfg = decoding.SearchConfig(max_new_tokens=5, num_beams=2, bos_id=BOS, eos_ids=(), pad_id=PAD)
    tables = tuple(map(jnp.asarray, _tables(0, eos_boost=3.0)))
    for greedy in (False, True):
        out = _search(tables, cfg, greedy)
        assert (np.asarray(out.lengths) == 5).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
    tokens = jnp.array([[0, 1, 3, 2]])  # slot 3 (token 2) is not filled yet
    out = decoding.apply_repetition_penalty(logits, tokens, jnp.int32(3), 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -2.0]])
    assert decoding.apply_repetition_penalty(logits, tokens, 3, 1.0) is logits
