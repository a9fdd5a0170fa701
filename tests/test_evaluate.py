"""tiktalk_jax.evaluate: detokenization, candidate encoding, per-kind scores, files, config.

The end-to-end eval of a trained Maria checkpoint (restore, decoding over the mesh, scores files,
determinism) is in test_maria_e2e.py, which shares its sample build with the training tests.
"""

import json

import ml_collections
import numpy as np
import pytest

from tiktalk_jax import evaluate, metrics
from tiktalk_jax import tokenizer as tokenizer_lib

TEXTS = ["红色的圆转得好快", "一直是哔哔声", "真是自律", "hello world 好", "同问"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_lib.load_tokenizer(
        None, str(tmp_path_factory.mktemp("vocab")), texts=TEXTS * 3, vocab_size=200
    )


def test_detokenize_joins_chinese_pieces_and_keeps_english_words_apart():
    assert evaluate.detokenize(["红", "色", "的", "圆"]) == "红色的圆"
    assert evaluate.detokenize(["hel", "##lo", "world", "好", "ok"]) == "hello world好ok"
    assert evaluate.detokenize(["[CLS]", "好", "[UNK]", "[SEP]", "[PAD]"]) == "好\ufffd"
    assert evaluate.detokenize(["a", "1", "##0"]) == "a 10"


def test_decode_tokens_stops_at_sep_or_pad_and_round_trips(tok):
    backend = tok.backend_tokenizer
    sep, pad = backend.token_to_id("[SEP]"), backend.token_to_id("[PAD]")
    for text in ("红色的圆转得好快", "真是自律"):
        ids = backend.encode(text, add_special_tokens=False).ids
        row = np.array([*ids, sep, 7, 7, pad], np.int32)
        assert evaluate.decode_tokens(tok, row, [sep, pad]) == text
    assert evaluate.decode_tokens(tok, np.array([pad, 9]), [sep, pad]) == ""


def test_encode_candidates_uses_the_response_layout(tok):
    backend = tok.backend_tokenizer
    cls, sep, pad = (backend.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    ids, mask = evaluate.encode_candidates(tok, [["同问", "红色的圆转得好快"]], max_len=6)
    assert ids.shape == mask.shape == (1, 2, 6) and ids.dtype == np.int32
    short = backend.encode("同问", add_special_tokens=False).ids
    assert ids[0, 0].tolist() == [cls, *short, sep] + [pad] * (4 - len(short))
    assert mask[0, 0].sum() == len(short) + 2
    # Truncated like the formatters' responses: the [SEP] survives.
    long = backend.encode("红色的圆转得好快", add_special_tokens=False).ids
    assert ids[0, 1].tolist() == [cls, *long[:4], sep] and mask[0, 1].all()


def _records(kinds):
    refs = {
        "vision": ["红色的圆", "是红色", "红色啊", "我看是红色", "红色的"],
        "audio": ["哔哔声", "一直是哔哔声", "好吵的哔哔声", "哔哔", "是哔哔声"],
    }
    return [
        {"dialogue_id": f"v/{i}", "video_id": "v", "context": ["问"], "responses": refs[k]}
        for i, k in enumerate(kinds)
    ]


def test_compute_scores_overall_and_per_kind_match_direct_metric_calls():
    kinds_list = ["vision", "audio", "vision", "audio", "vision"]
    records = _records(kinds_list)
    hyps = ["红色的圆", "哔哔声", "蓝色", "是哔哔声", "红色"]
    rng = np.random.default_rng(0)
    cand = rng.normal(size=(5, 20))
    kinds = {r["dialogue_id"]: k for r, k in zip(records, kinds_list)}
    settings = ml_collections.ConfigDict(dict(tokenize="char", skip_meteor=True))
    scores = evaluate.compute_scores(records, hyps, cand, kinds, settings)
    refs = [r["responses"] for r in records]
    assert scores["num_examples"] == 5
    assert scores["nlg_scores"] == metrics.nlg_scores(hyps, refs, skip_meteor=True)
    assert scores["retrieval"] == metrics.retrieval_metrics(cand, num_positives=5)
    vision = [0, 2, 4]
    want = metrics.nlg_scores(
        [hyps[i] for i in vision], [refs[i] for i in vision], skip_meteor=True
    )
    got = scores["per_kind"]["vision"]
    assert got["num_examples"] == 3 and got["meteor"] is None
    assert {k: got[k] for k in want} == want
    assert got["mean_rank"] == metrics.retrieval_metrics(cand[vision])["mean_rank"]
    flat = evaluate._scalars("test", scores)
    assert flat["test/bleu2"] == scores["nlg_scores"]["bleu2"]
    assert flat["test/audio/recall@1"] == scores["per_kind"]["audio"]["recall@1"]
    assert "test/meteor" not in flat and "test/vision/num_examples" not in flat


def test_find_kinds_file_explicit_or_next_to_the_data(tmp_path):
    config = ml_collections.ConfigDict(
        dict(input=dict(data_dir=str(tmp_path / "data")), eval=dict(kinds_file=None)),
        type_safe=False,
    )
    assert evaluate.find_kinds_file(config) is None
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "sample_kinds.json").write_text("{}")
    assert evaluate.find_kinds_file(config) == str(tmp_path / "raw" / "sample_kinds.json")
    config.eval.kinds_file = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        evaluate.find_kinds_file(config)


def test_load_config_reads_the_runs_config_json(tmp_path):
    from configs import maria as maria_config

    config = maria_config.get_config("variant=tv,size=tiny,data_dir=/data")
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    loaded = evaluate.load_config(str(tmp_path))
    assert loaded.model.variant == "tv" and loaded.input.max_audio == 0
    assert loaded.decode.num_beams == 5 and loaded.input.data_dir == "/data"
    changed = evaluate._with_eval_split(loaded, "val")
    assert list(changed.input.eval_splits) == ["val"] and loaded.eval.split == "test"
    with pytest.raises(FileNotFoundError, match="pass --config"):
        evaluate.load_config(str(tmp_path / "missing"))


def test_write_generations_one_json_line_per_dialogue(tmp_path):
    records = _records(["vision", "audio"])
    cand = np.array([[0.0, 1, 2, 3, 4, 5, 0], [9.0, 1, 1, 1, 1, 10, 11]])
    path = str(tmp_path / "g.jsonl")
    evaluate._write_generations(path, records, ["红", "哔"], cand, {"v/0": "vision"})
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [g["hypothesis"] for g in lines] == ["红", "哔"]
    assert lines[0]["references"] == records[0]["responses"] and lines[0]["context"] == ["问"]
    assert [g["kind"] for g in lines] == ["vision", None]
    # Best ground truth 4.0 beaten by 5.0 -> rank 2; 9.0 beaten by 10 and 11 -> rank 3.
    assert [g["best_reference_rank"] for g in lines] == [2, 3]
