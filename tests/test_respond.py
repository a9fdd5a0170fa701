"""Using a trained model: `respond` on a bundled sample video (one shot and interactive, through
the command line), its errors, the features it computes equal to the extracted ones, the export
of the trained run, the model card evaluation writes, and beam search's n-best hypotheses.

A tiny T+V+A+K Maria is trained a few steps on the bundled sample once for the module (as
test_maria_e2e does), then evaluated (which writes the model card).
"""

import dataclasses
import functools
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiktalk_jax import decoding, evaluate, export, main, model_card, respond, train
from tiktalk_jax import features as features_lib
from tiktalk_jax.models import maria

STEPS = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESPONSE_LINE = re.compile(r"^  (\d+)\. \[(-?\d+\.\d+)\] (.+)$")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, config, workdir, a test-split video with features) of a tiny T+V+A+K run."""
    from tfds_builder import tiktalk
    from tiktalk_jax import sample

    root = tmp_path_factory.mktemp("respond")
    raw, data = str(root / "raw"), str(root / "data")
    sample.write_sample(raw, seed=0)
    tiktalk.build(raw, data, "dialogues")
    tiktalk.build(raw, data, "media", num_workers=1)
    feats = main.extract_sample_features(data)
    main.prepare_sample_knowledge(raw, data)
    main.write_sample_vocab(raw, data)
    config = main.sample_config("tvak", str(root), feats, STEPS)
    config.model.bert.update(
        dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    config.mesh.update(dict(data=8, fsdp=1))
    config.input.batch_size = 16
    config.decode.max_new_tokens = 6
    config.eval.skip_meteor = True
    config.eval.num_negatives = 0  # no candidate scoring: one compilation less
    workdir = str(root / "run")
    train.train_and_evaluate(config, workdir)
    evaluate.evaluate(config, workdir)
    video_id = features_lib.FeatureTable(feats["frames"][0], "test").keys[0]
    return str(root), config, workdir, os.path.join(raw, "videos", f"{video_id}.mp4")


def _respond(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "tiktalk_jax.respond", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def _turns(stdout):
    """[(context line, [(score, text)])] of respond's output."""
    turns = []
    for line in stdout.splitlines():
        if line.startswith("context: "):
            turns.append((line.removeprefix("context: "), []))
        elif m := RESPONSE_LINE.match(line):
            assert int(m[1]) == len(turns[-1][1]) + 1
            turns[-1][1].append((float(m[2]), m[3]))
    return turns


def test_one_shot_prints_the_top_responses_with_their_scores(run, capsys):
    _, _, workdir, video = run
    args = [f"--workdir={workdir}", f"--video={video}", "--context=视频里转的是啥"]
    assert respond.main([*args, "--context=你猜", "--title=三角", "--num_responses=3"]) == 0
    stdout = capsys.readouterr().out
    ((context, responses),) = _turns(stdout)
    assert context == "视频里转的是啥 / 你猜"
    assert "knowledge: " in stdout  # the T+V+A+K variant retrieves knowledge
    assert len(responses) == 3
    scores = [s for s, _ in responses]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)


def test_interactive_command_grows_the_context_with_each_turn(run):
    _, _, workdir, video = run
    result = _respond(
        f"--workdir={workdir}", f"--video={video}", "--context=今天我生日", "--interactive",
        stdin="谢谢你\n中间那个是什么颜色\n/quit\nnot read\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    turns = _turns(result.stdout)
    assert len(turns) == 3, result.stdout  # the given context, then two turns; /quit ends
    for (before, responses), (after, _), said in zip(
        turns, turns[1:], ["谢谢你", "中间那个是什么颜色"]
    ):
        best = responses[0][1]
        # The best reply joins the context (an empty one, printed as <empty>, does not).
        assert after == (
            f"{before} / {said}" if best == "<empty>" else f"{before} / {best} / {said}"
        )
    assert "not read" not in result.stdout


class _Echo:
    """A stand-in responder: replies "re:<last turn>" (and "" to "silence")."""

    retriever = None

    def respond(self, context, *, title="", features=None):
        text = "" if context[-1] == "silence" else f"re:{context[-1]}"
        return [respond.Response(text, -1.0), respond.Response("b", -2.0)], ""


@pytest.mark.parametrize(
    "given, stdin, contexts",
    [
        ([], "a\nb\n", ["a", "a / re:a / b"]),  # EOF ends
        (["x"], "y\n\nz\n", ["x", "x / re:x / y"]),  # an empty line ends
        ([], "/quit\nz\n", []),  # nothing said
        (["silence"], "y\n", ["silence", "silence / y"]),  # an empty reply is not appended
    ],
)
def test_conversation_loop(given, stdin, contexts):
    out = io.StringIO()
    respond.converse(_Echo(), given, interactive=True, stdin=io.StringIO(stdin), out=out)
    assert [c for c, _ in _turns(out.getvalue())] == contexts


def test_a_corrupt_video_fails_with_a_clear_error(run, tmp_path):
    _, _, workdir, _ = run
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    result = _respond(f"--workdir={workdir}", f"--video={bad}", "--context=这是什么")
    assert result.returncode != 0
    assert "respond: error: video" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr and "context:" not in result.stdout


def test_user_errors_are_reported_without_a_traceback(run, tmp_path, capsys):
    _, config, workdir, video = run
    cases = [
        ([f"--workdir={workdir}", f"--video={tmp_path}/none.mp4", "--context=x"], "does not exist"),
        ([f"--workdir={workdir}", f"--video={video}", "--context=  "], "context is empty"),
        ([f"--workdir={workdir}", "--context=x"], "needs a --video"),
        ([f"--workdir={workdir}", f"--video={video}", "--context=x", "--num_responses=0"], ">= 1"),
        ([f"--workdir={tmp_path}", f"--video={video}", "--context=x"], "not a training workdir"),
    ]
    for argv, message in cases:
        assert respond.main(argv) == 1
        assert message in capsys.readouterr().err
    # A workdir with a config but no checkpoint.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config.to_dict()))
    assert respond.main([f"--workdir={empty}", f"--video={video}", "--context=x"]) == 1
    assert "no checkpoint in" in capsys.readouterr().err
    other = config.to_dict()
    other["model"]["name"] = "gpt2"
    (empty / "config.json").write_text(json.dumps(other))
    assert respond.main([f"--workdir={empty}", f"--video={video}", "--context=x"]) == 1
    assert "'gpt2' is not supported by respond (supported: maria)" in capsys.readouterr().err


def test_video_features_are_the_extracted_and_standardized_ones(run):
    """The same decoding, encoders and standardization as the training data: respond's features
    of a sample video equal the features dataset's record, standardized as the pipeline does."""
    _, config, _, video = run
    video_id = os.path.splitext(os.path.basename(video))[0]
    for table in respond.video_tables(config):
        directory = maria.features_dir(config, table)
        meta = features_lib.read_metadata(directory)
        mean, std, _ = maria.feature_stats(directory, config.input.train_split)
        encoder = respond.FeatureEncoder(directory, (mean, std))
        ours = encoder(respond.decode_video(video, respond.media_options(meta)))
        stored = features_lib.FeatureTable(directory, "test")
        row = stored[stored.keys.index(video_id)]["features"]
        assert ours.shape == row.shape and len(row) > 0
        np.testing.assert_allclose(ours, (row - mean) / std, atol=1e-4)


def test_the_trained_run_exports_and_transformers_reproduces_its_logits(run, tmp_path):
    import torch
    import transformers

    _, config, workdir, _ = run
    out = str(tmp_path / "hf")
    assert export.main([f"--workdir={workdir}", f"--out={out}"]) == 0
    hf = transformers.BertForMaskedLM.from_pretrained(out).eval()
    model = export.restore_model(config, workdir, STEPS)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, model.config.bert.vocab_size, size=(2, 9))
    types = rng.integers(0, 3, size=(2, 9))
    mask = np.arange(9)[None] < np.array([[9], [6]])
    ours = jax.jit(lambda i, t, m: model.mlm_logits(model.bert(i, t, m)))(
        jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask)
    )
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask.astype(np.int64)),
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours)[mask], theirs[mask], atol=1e-4, rtol=1e-4)
    from safetensors.numpy import load_file

    media = load_file(os.path.join(out, export.PROJECTIONS_FILE))
    mean, std, _ = maria.feature_stats(maria.features_dir(config, "audio"), "train")
    np.testing.assert_array_equal(media["audio.feature_mean"], mean)
    assert media["frames.proj.weight"].shape == (32, config.input.frame_dim)
    hf_config = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
    assert (
        hf_config["maria"]["variant"] == "tvak" and hf_config["maria"]["checkpoint_step"] == STEPS
    )


def test_evaluation_writes_a_model_card(run):
    _, _, workdir, _ = run
    path = model_card.model_card_path(workdir, "test", STEPS)
    card = open(path, encoding="utf-8").read()
    scores = json.load(open(evaluate.scores_path(workdir, "test", STEPS), encoding="utf-8"))
    assert card.startswith(f"# Model card: maria tvak, step {STEPS}, test split")
    assert f"checkpoint step {STEPS} of {STEPS} configured steps" in card
    rouge = scores["nlg_scores"]["rouge_l"]
    row = rf"^\| all \| {scores['num_examples']} \| [^|]+ \| [^|]+ \| - \| {rouge:.2f} \| "
    assert re.search(row, card, re.M)  # METEOR skipped: "-"
    assert "RANDOM-INIT encoder" in card and "## Sample generations" in card
    first = json.loads(open(evaluate.generations_path(workdir, "test", STEPS)).readline())
    assert f"**{first['dialogue_id']}**" in card


# ---------------------------------------------------------------------------------------------
# Beam search's n best hypotheses (what respond prints), against a plain-Python port of the
# original `BeamHypotheses(num_keep_best)`.
# ---------------------------------------------------------------------------------------------

V, B, BOS, PAD, SEP = 10, 2, 1, 0, 2


def _toy(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(V, V)).astype(np.float32)
    pos = rng.normal(size=(12, V)).astype(np.float32)
    pos[:, SEP] += 0.5 * np.arange(12)
    bias = (2.0 * rng.normal(size=(B, V))).astype(np.float32)
    return w, bias, pos


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def ref_n_best(tables, cfg):
    w, bias, pos = tables
    k, steps, lp, n = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty, cfg.num_keep_best
    rows, scores = [[BOS] for _ in range(B * k)], np.zeros(B * k)
    scores.reshape(B, k)[:, 1:] = -1e9
    hyps, done = [[] for _ in range(B)], [False] * B
    for cur_len in range(1, steps + 1):
        logp = []
        for i in range(B * k):
            logits = (sum(w[t] for t in rows[i]) + bias[i // k] + pos[len(rows[i])]).astype(float)
            for t in set(rows[i]):  # repetition penalty
                logits[t] = logits[t] * 3.0 if logits[t] < 0 else logits[t] / 3.0
            logp.append(_log_softmax(logits) + scores[i])
        logp, nxt = np.stack(logp), []
        for b in range(B):
            flat = logp[b * k : (b + 1) * k].reshape(-1)
            order = np.argsort(-flat, kind="stable")[: 2 * k]
            worst = min(h[0] for h in hyps[b]) if len(hyps[b]) == n else None
            done[b] = done[b] or (worst is not None and worst >= flat[order[0]] / steps**lp)
            if done[b]:
                nxt += [(0.0, PAD, b * k)] * k
                continue
            beam = []
            for idx in order:
                src, word = divmod(int(idx), V)
                if word in cfg.eos_ids or cur_len == steps:
                    hyp = rows[b * k + src][:cur_len] + ([] if word in cfg.eos_ids else [word])
                    score = flat[idx] / len(hyp) ** lp
                    if len(hyps[b]) < n or score > min(h[0] for h in hyps[b]):
                        hyps[b].append((score, hyp))
                        if len(hyps[b]) > n:
                            hyps[b].remove(min(hyps[b], key=lambda h: h[0]))
                else:
                    beam.append((flat[idx], word, b * k + src))
                if len(beam) == k:
                    break
            nxt += beam + [(-1e9, PAD, b * k)] * (k - len(beam))
        scores = np.array([s for s, _, _ in nxt])
        rows = [rows[src][:cur_len] + [word] for _, word, src in nxt]
        if all(done):
            break
    return [sorted(h, key=lambda h: -h[0]) for h in hyps]


CFG = decoding.SearchConfig(
    max_new_tokens=6, num_beams=3, num_keep_best=4, bos_id=BOS, eos_ids=(SEP, PAD), pad_id=PAD
)


def _step(tables, state, tokens, cur_len):
    w, bias, pos = tables
    last = jax.lax.dynamic_index_in_dim(tokens, cur_len - 1, axis=1, keepdims=False)
    h = state + w[last]
    return h + jnp.repeat(bias, tokens.shape[0] // B, axis=0) + pos[cur_len], h


@functools.partial(jax.jit, static_argnames="cfg")
def _beams(tables, cfg):
    rows = B * cfg.num_beams
    step = functools.partial(_step, tables)
    return decoding.beam_search(step, jnp.zeros((rows, V)), B, cfg)


def test_beam_search_returns_the_n_best_hypotheses():
    for seed in range(3):  # one compilation: the toy model's tables are arguments
        tables = _toy(seed)
        out = _beams(tuple(map(jnp.asarray, tables)), CFG)
        assert out.tokens.shape == (B, 4, 6) and out.scores.shape == (B, 4)
        for b, hyps in enumerate(ref_n_best(tables, CFG)):
            assert len(hyps) == 4
            for j, (score, hyp) in enumerate(hyps):
                n = int(out.lengths[b, j])
                assert n == len(hyp) - 1
                np.testing.assert_array_equal(out.tokens[b, j, :n], hyp[1:])
                np.testing.assert_allclose(out.scores[b, j], score, rtol=1e-5)
    # num_keep_best=1 keeps the output shapes of a plain beam search. Keeping more hypotheses
    # only delays the stop, so the best of the n-best search is at least as good.
    one = _beams(tuple(map(jnp.asarray, tables)), dataclasses.replace(CFG, num_keep_best=1))
    assert one.tokens.shape == (B, 6)
    assert np.all(np.asarray(one.scores) <= np.asarray(out.scores[:, 0]) + 1e-6)
    with pytest.raises(ValueError, match="needs beam search"):
        decoding.greedy_search(functools.partial(_step, tables), jnp.zeros((B, V)), B, CFG)
