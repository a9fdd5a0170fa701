"""Metrics: nlg_scores against direct pycocoevalcap runs, Dist-n, METEOR robustness, retrieval."""

import os
import stat

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from tiktalk_jax import metrics
from tiktalk_jax.metrics import nlg

# Hand-made Chinese pairs: exact, partial and no overlap; 3 references each.
HYPS = ["我也觉得很好看", "哈哈笑死我了", "这是哪里啊", "今天天气真不错", "不知道", "好可爱的猫"]
REFS = [
    ["我觉得很好看", "真的好看", "一般般吧"],
    ["笑死我了哈哈", "太好笑了", "哈哈哈"],
    ["这是云南吧", "好像是大理", "我也想去"],
    ["天气真不错啊", "今天天气真不错", "出去玩吧"],
    ["我也不知道", "谁知道呢", "问问别人"],
    ["这只猫好可爱", "好可爱", "想养一只猫"],
]


def chars(text):
    return " ".join(text.replace(" ", ""))


def direct_run(hyps, refs_k, meteor):
    """One pycocoevalcap run, single reference per example, char-tokenized by hand."""
    res = {i: [chars(h)] for i, h in enumerate(hyps)}
    gts = {i: [chars(r)] for i, r in enumerate(refs_k)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        "bleu2": 100 * bleu[1],
        "bleu4": 100 * bleu[3],
        "meteor": 100 * meteor.compute_score(gts, res)[0],
        "rouge_l": 100 * float(Rouge().compute_score(gts, res)[0]),
        "cider": 100 * float(Cider().compute_score(gts, res)[0]),
    }


@pytest.fixture(scope="module")
def stock_meteor():
    # pycocoevalcap's own wrapper, untouched, under a UTF-8 English locale it inherits.
    saved = {k: os.environ.get(k) for k in ("LC_ALL", "LANG")}
    os.environ.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    try:
        scorer = Meteor()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield scorer
    scorer.meteor_p.kill()


@pytest.fixture(scope="module")
def direct_runs(stock_meteor):
    return [direct_run(HYPS, [r[k] for r in REFS], stock_meteor) for k in range(3)]


def test_single_reference_equals_direct_pycocoevalcap(direct_runs):
    ours = metrics.nlg_scores(HYPS, [[r[1]] for r in REFS])
    for key, value in direct_runs[1].items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < ours["bleu2"] < 100 and 0 < ours["meteor"] < 100 and ours["cider"] > 0


def test_k_references_average_single_reference_runs(direct_runs):
    ours = metrics.nlg_scores(HYPS, REFS)
    for key in direct_runs[0]:
        expected = np.mean([run[key] for run in direct_runs])
        assert ours[key] == pytest.approx(expected, abs=1e-9), key
    # The protocol matters: pooling the 3 references in one multi-reference run differs.
    res = {i: [chars(h)] for i, h in enumerate(HYPS)}
    pooled = {i: [chars(r) for r in refs] for i, refs in enumerate(REFS)}
    assert ours["cider"] != pytest.approx(100 * Cider().compute_score(pooled, res)[0], rel=1e-3)
    assert set(ours) == {"bleu2", "bleu4", "meteor", "rouge_l", "cider", "dist2", "dist3"}


def test_dist_n_hand_counts():
    # char bigrams: 我爱 爱你 | 我爱 爱他 | (none) | 你好 -> 4 distinct / 5 total.
    # char trigrams: 我爱你 | 我爱他 -> 2 / 2.
    scores = metrics.nlg_scores(
        ["我爱你", "我爱他", "", "你好"], [["a"], ["b"], ["c"], ["d"]], skip_meteor=True
    )
    assert scores["dist2"] == pytest.approx(80.0)
    assert scores["dist3"] == pytest.approx(100.0)
    assert metrics.distinct_n([["a", "a", "a", "a"]], 2) == pytest.approx(1 / 3)
    assert metrics.distinct_n([["a"], []], 2) == 0.0


def test_tokenize_modes():
    assert metrics.tokenize_text("你好 世界\n!", "char") == ["你", "好", "世", "界", "!"]
    assert metrics.tokenize_text(" 你好  世界\t", "space") == ["你好", "世界"]
    assert metrics.tokenize_text("a\u200bb\x00c", "space") == ["a", "b", "c"]
    assert metrics.tokenize_text("我今天去北京大学", "jieba") == ["我", "今天", "去", "北京大学"]
    with pytest.raises(ValueError, match="tokenize"):
        metrics.tokenize_text("x", "bpe")
    hyps, refs = ["我今天去北京大学", "天气很好"], [["我明天去北京大学"], ["今天天气很好"]]
    # "space" scores pre-tokenized text exactly as the built-in segmenter would.
    pre = lambda s, mode: " ".join(metrics.tokenize_text(s, mode))
    for mode in ("char", "jieba"):
        direct = metrics.nlg_scores(hyps, refs, tokenize=mode, skip_meteor=True)
        spaced = metrics.nlg_scores(
            [pre(h, mode) for h in hyps],
            [[pre(r, mode) for r in rs] for rs in refs],
            tokenize="space",
            skip_meteor=True,
        )
        assert direct == spaced
    word = metrics.nlg_scores(hyps, refs, tokenize="jieba", skip_meteor=True)
    char = metrics.nlg_scores(hyps, refs, tokenize="char", skip_meteor=True)
    assert word["bleu2"] != pytest.approx(char["bleu2"])


def test_meteor_chinese_and_nasty_strings():
    meteor = metrics.get_meteor()
    same = metrics.nlg_scores(["我爱你"], [["我爱你"]])["meteor"]
    none = metrics.nlg_scores(["他们走"], [["我爱你"]])["meteor"]
    part = metrics.nlg_scores(["我爱他们"], [["我爱你"]])["meteor"]
    assert same == pytest.approx(100.0) and none == 0.0 and 0 < part < 100
    # A newline would desynchronize the line protocol; a '|||' in a reference would split it.
    clean, _ = meteor.compute_score({0: ["我 爱 你"], 1: ["a b"]}, {0: ["我 爱 你"], 1: ["a b"]})
    nasty, _ = meteor.compute_score(
        {0: ["我 爱\n你"], 1: ["a ||| b"]}, {0: ["我\r\n爱 你\x07"], 1: ["a b"]}
    )
    assert nasty == pytest.approx(clean)
    # Empty hypotheses and references crash no scorer.
    empty_hyp = metrics.nlg_scores(["", ""], [["我爱你"], ["好"]])
    assert all(empty_hyp[k] == 0.0 for k in ("bleu2", "bleu4", "meteor", "rouge_l", "cider"))
    assert empty_hyp["dist2"] == 0.0
    all_empty = metrics.nlg_scores(["你好", "|||"], [[""], ["\n"]], tokenize="space")
    assert all_empty["cider"] == 0.0 and all_empty["bleu4"] == pytest.approx(0.0, abs=1e-5)
    assert meteor is metrics.get_meteor()  # the JVM is reused


def test_meteor_forces_english_locale(monkeypatch):
    # Under a German JVM locale the jar cannot parse its own statistics.
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Duser.language=de -Duser.country=DE")
    monkeypatch.setenv("_JAVA_OPTIONS", "-Duser.language=de -Duser.country=DE")
    scorer = nlg._Meteor()
    try:
        score, per_example = scorer.compute_score({0: ["你 好"]}, {0: ["你 好"]})
        assert score == pytest.approx(1.0) and per_example == [pytest.approx(1.0)]
    finally:
        scorer.close()


def _fake_java(tmp_path, body):
    path = tmp_path / "java"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_meteor_failures_raise_instead_of_hanging(tmp_path):
    dead = nlg._Meteor(java=_fake_java(tmp_path, "echo 'no jar here' >&2; exit 3"))
    with pytest.raises(metrics.MeteorError, match="no jar here"):
        dead.compute_score({0: ["a"]}, {0: ["a"]})
    assert not dead.lock.locked()
    silent = nlg._Meteor(java=_fake_java(tmp_path, "exec sleep 600"))
    with pytest.raises(metrics.MeteorError):
        silent.compute_score({0: ["a"]}, {0: ["a"]}, timeout_s=1.0)
    silent.close()


def test_missing_java_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(nlg, "_meteor_instance", None)
    with pytest.raises(metrics.JavaNotFoundError, match="apt-get install default-jre-headless"):
        metrics.nlg_scores(["你好"], [["你好"]])
    skipped = metrics.nlg_scores(["你好"], [["你好"]], skip_meteor=True)
    assert skipped["meteor"] is None and skipped["bleu2"] == pytest.approx(100.0, abs=1e-5)
    assert "skipped" in metrics.scores_metadata("char", skip_meteor=True)["meteor"]
    assert metrics.scores_metadata("char")["java_version"] == "not found"
    # $JAVA_HOME/bin/java is the fallback.
    (tmp_path / "bin").mkdir()
    java = _fake_java(tmp_path / "bin", "exit 0")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    assert metrics.find_java() == java


def test_scores_metadata():
    meta = metrics.scores_metadata("jieba")
    assert meta["segmenter_version"] == __import__("jieba").__version__
    assert meta["aggregation"] == "per-reference average over K"
    assert meta["pycocoevalcap_version"] and "openjdk" in meta["java_version"].lower()
    assert metrics.scores_metadata("char")["segmenter_version"] is None
    with pytest.raises(ValueError):
        metrics.nlg_scores(["a"], [["a"], ["b"]], skip_meteor=True)
    with pytest.raises(ValueError, match="same number"):
        metrics.nlg_scores(["a", "b"], [["a"], ["b", "c"]], skip_meteor=True)


def test_retrieval_metrics_hand_made():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.3, 0.2],  # best 0.9 -> rank 1; each: 1, 4
            [0.2, 0.4, 0.5, 0.4, 0.1],  # best 0.4 ties a negative -> rank 3; each: 3, 3
            [0.0, 0.0, 0.0, 0.0, 0.0],  # all tied -> rank 4; each: 4, 4
        ]
    )
    best = metrics.retrieval_metrics(scores, num_positives=2, ks=(1, 3))
    assert best == pytest.approx({"recall@1": 100 / 3, "recall@3": 200 / 3, "mean_rank": 8 / 3})
    each = metrics.retrieval_metrics(scores, num_positives=2, mode="each", ks=(1, 3))
    assert each == pytest.approx({"recall@1": 100 / 6, "recall@3": 50.0, "mean_rank": 19 / 6})
    rng = np.random.default_rng(0)
    perfect = np.concatenate([rng.uniform(1, 2, (4, 5)), rng.uniform(0, 1, (4, 95))], axis=1)
    assert metrics.retrieval_metrics(perfect) == {
        "recall@1": 100.0,
        "recall@5": 100.0,
        "recall@10": 100.0,
        "mean_rank": 1.0,
    }
    worst = metrics.retrieval_metrics(-perfect)
    assert worst["mean_rank"] == 96.0 and worst["recall@10"] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_metrics(np.full((1, 100), np.nan))


def test_sample_negatives_deterministic_and_excluding():
    exclude = [range(5 * i, 5 * i + 5) for i in range(40)]  # example i owns pool [5i, 5i+5)
    neg = metrics.sample_negatives(40, 200, 95, seed=3, exclude=exclude)
    assert neg.shape == (40, 95)
    assert np.array_equal(neg, metrics.sample_negatives(40, 200, 95, seed=3, exclude=exclude))
    assert not np.array_equal(neg, metrics.sample_negatives(40, 200, 95, seed=4, exclude=exclude))
    for i, row in enumerate(neg):
        assert len(set(row.tolist())) == 95
        assert not set(row.tolist()) & set(exclude[i])
        assert row.min() >= 0 and row.max() < 200
    # An example's draw does not depend on how many examples there are.
    assert np.array_equal(neg[:7], metrics.sample_negatives(7, 200, 95, 3, exclude=exclude[:7]))
    with pytest.raises(ValueError, match="not its own"):
        metrics.sample_negatives(1, 99, 95, exclude=[range(5)])


def test_retrieval_candidates_never_contain_own_responses():
    refs = [[f"r{i}_{k}" for k in range(5)] for i in range(30)]
    refs[1][0] = refs[0][0] = "哈哈哈"  # a reply shared verbatim by two dialogues
    pool, exclude = metrics.build_response_pool(refs)
    assert (
        len(pool) == 149
        and pool.index("哈哈哈") in exclude[0]
        and pool.index("哈哈哈") in exclude[1]
    )
    cands = metrics.retrieval_candidates(refs, num_negatives=95, seed=0)
    assert cands == metrics.retrieval_candidates(refs, num_negatives=95, seed=0)
    for own, row in zip(refs, cands):
        assert len(row) == 100 and row[:5] == own
        assert not set(row[5:]) & set(own)
        assert len(set(row[5:])) == 95
