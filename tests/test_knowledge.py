"""Knowledge: C3KG reader, sentence encoders (vs PyTorch), sharded retrieval, cache, side table."""

import json
import os
import pickle

import jax
import numpy as np
import pytest
import torch
import transformers

from tiktalk_jax import input_pipeline, sample
from tiktalk_jax.knowledge import c3kg, prepare, retrieval
from tiktalk_jax.knowledge.sentence_encoder import LexicalEncoder, Pooling, SentenceEncoder

# ---------------------------------------------------------------------------------------------
# Reader.
# ---------------------------------------------------------------------------------------------

TSV_WITH_HEADER = (
    "\ufeffid\ttail\trelation\thead\tscore\n"  # header: other order, extra columns, BOM
    "1\t自律\txAttr\tPersonX 每天跑步\t0.9\n"
    "2\t保持身材\txwant\tPersonX 每天跑步\t0.8\n"  # relation case differs
    "\n"
    "3\tnone\txEffect\tPersonX 每天跑步\t0.1\n"  # ATOMIC's none placeholder
    "4\t自律\txAttr\tPersonX 每天跑步\t0.9\n"  # duplicate
    "5\t  \txReact\tPersonX 每天跑步\t0.2\n"  # empty tail
    "6\tonly three\n"  # too few columns
    "7\tPersonX 洗澡\tnext_sentence\tPersonX 每天跑步\t1\n"  # event flow
    "8\t跑步鞋\tnext_entity\t跑步\t1\n"  # concept flow
    "9\t难过\temotion_cause\t失恋\t1\n"
    "10\t安慰\tintent_console\t难过\t1\n"  # emotion-intent flow (C3KG's intent_<act> edges)
    "11\t公园\tAtLocation\t跑步\t1\n"  # ATOMIC-2020 relation outside the families
)


def test_reader_header_extra_columns_and_bad_rows(tmp_path):
    path = tmp_path / "kg.tsv"
    path.write_text(TSV_WITH_HEADER, encoding="utf-8")
    kg = c3kg.read_tsv(str(path))
    report = kg.report
    assert report.header is not None and report.rows == 11 and report.kept == 7
    assert report.skipped == {
        "none_tail": 1,
        "duplicate": 1,
        "empty_field": 1,
        "too_few_columns": 1,
    }
    # Line numbers are 1-based file lines (the header is line 1, line 4 is blank).
    assert report.examples["none_tail"] == [5]
    assert report.examples["duplicate"] == [6]
    assert report.examples["empty_field"] == [7]
    assert report.examples["too_few_columns"] == [8]
    assert report.unknown_relations == {"AtLocation": 1}
    assert kg.heads == ["PersonX 每天跑步", "跑步", "失恋", "难过"]
    assert kg.tails[0] == {"xAttr": ["自律"], "xWant": ["保持身材"], "event": ["PersonX 洗澡"]}
    assert kg.tails[1] == {"concept": ["跑步鞋"], "other": ["公园"]}
    assert kg.tails[2] == {"emotion_cause": ["难过"]}
    assert kg.tails[3] == {"emotion_intent": ["安慰"]}
    # Tails in the order of the families asked for; heads without them are flagged.
    assert kg.tails_of(0, ("xWant", "xAttr")) == ["保持身材", "自律"]
    assert kg.tails_of(0, c3kg.ALL_FAMILIES, max_tails=2) == ["PersonX 洗澡", "自律"]
    assert kg.has_families(("xAttr",)) == [True, False, False, False]
    assert "4 of" not in report.summary() and "none_tail" in report.summary()


def test_reader_without_header_and_family_names(tmp_path):
    path = tmp_path / "kg.tsv"
    path.write_text("a\tHasSubEvent\tb\textra\tcols\nc\tx-need\td\n\nbad line\n", "utf-8")
    kg = c3kg.read_tsv(str(path))
    assert kg.report.header is None and kg.report.kept == 2
    assert kg.report.skipped == {"too_few_columns": 1}
    assert kg.tails == [{"HasSubEvent": ["b"]}, {"xNeed": ["d"]}]
    assert c3kg.relation_family("Emotion-Intent Flow") == "emotion_intent"
    assert c3kg.relation_family("next_utterance") == "event"
    assert c3kg.check_families(["xattr", "EVENT"]) == ("xAttr", "event")
    with pytest.raises(ValueError, match="unknown relation family"):
        c3kg.check_families(["xFoo"])
    # The hash is of the file bytes: any edit changes it.
    before = kg.sha256
    path.write_text("a\tHasSubEvent\tb\n", "utf-8")
    assert c3kg.read_tsv(str(path)).sha256 != before


# ---------------------------------------------------------------------------------------------
# Sentence encoder vs sentence-transformers' computation in PyTorch.
# ---------------------------------------------------------------------------------------------

MAX_SEQ = 16
TEXTS = [
    "我室友每天都去跑步",
    "  今天好冷啊  ",  # stripped like sentence-transformers
    "好",
    "",
    "Hello World 跑步",
    "这个视频里的红色圆形转得好快啊，背景音乐是什么，有人知道吗？我也想知道",  # truncated
    "天天熬夜打游戏",
    "把房间收拾得一尘不染",
    "一个人去爬雪山",
    "我饿了",
    "晚安好梦",
    "排队三小时买奶茶",
]


def _vocab() -> list[str]:
    chars = sorted({c for t in TEXTS for c in t.lower() if not c.isspace()})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", *chars]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random-init HF BERT + its tokenizer saved as a HF directory."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("st")
    vocab = _vocab()
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    tok = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    base = root / "hf"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    return {"root": root, "model": model, "tokenizer": tok, "hf_dir": base}


def _write_st_dir(tiny_bert, name, modes, normalize, subfolder, dense=None):
    """Lays out a sentence-transformers directory the way sentence-transformers saves one."""
    path = tiny_bert["root"] / name
    tdir = path / subfolder if subfolder else path
    tiny_bert["model"].save_pretrained(tdir)
    tiny_bert["tokenizer"].save_pretrained(tdir)
    (tdir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": MAX_SEQ, "do_lower_case": False})
    )
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": subfolder,
            "type": "sentence_transformers.models.Transformer",
        }
    ]
    pool = {f"pooling_mode_{k}": False for k in ("cls_token", "mean_tokens", "max_tokens")}
    pool.update(
        word_embedding_dimension=32,
        pooling_mode_mean_sqrt_len_tokens=False,
        pooling_mode_weightedmean_tokens=False,
        pooling_mode_lasttoken=False,
        include_prompt=True,
    )
    key = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens"}
    for m in modes:
        pool[f"pooling_mode_{key[m]}"] = True
    (path / "1_Pooling").mkdir(parents=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    if dense is not None:
        (path / "2_Dense").mkdir()
        cfg = {
            "in_features": dense.in_features,
            "out_features": dense.out_features,
            "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh",
        }
        (path / "2_Dense" / "config.json").write_text(json.dumps(cfg))
        sd = {f"linear.{k}": v for k, v in dense.state_dict().items()}
        torch.save(sd, path / "2_Dense" / "pytorch_model.bin")
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
    if normalize:
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": f"{len(modules)}_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (path / f"{len(modules) - 1}_Normalize").mkdir()
    (path / "modules.json").write_text(json.dumps(modules))
    return path


def _reference(tiny_bert, texts, modes, normalize, dense=None, max_len=MAX_SEQ):
    """sentence-transformers' Transformer.tokenize + forward + Pooling (+Dense, Normalize)."""
    enc = tiny_bert["tokenizer"](
        [t.strip() for t in texts],
        padding=True,
        truncation="longest_first",
        max_length=max_len,
        return_tensors="pt",
    )
    with torch.no_grad():
        tokens = tiny_bert["model"](**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        out = []
        if "cls" in modes:
            out.append(tokens[:, 0])
        if "max" in modes:
            out.append(torch.where(mask == 0, torch.full_like(tokens, -1e9), tokens).max(1)[0])
        if "mean" in modes:
            out.append((tokens * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9))
        emb = torch.cat(out, 1)
        if dense is not None:
            emb = torch.tanh(dense(emb))
        if normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    return emb.numpy()


@pytest.mark.parametrize(
    "modes,normalize,subfolder,with_dense",
    [
        (("mean",), True, "", False),
        (("cls",), False, "0_Transformer", False),
        (("max",), True, "", False),
        (("cls", "mean"), True, "", True),
    ],
)
def test_sentence_encoder_matches_torch(tiny_bert, modes, normalize, subfolder, with_dense):
    dense = None
    if with_dense:
        torch.manual_seed(1)
        dense = torch.nn.Linear(32 * len(modes), 24)
    name = "st_" + "_".join(modes) + ("_n" if normalize else "") + ("_d" if with_dense else "")
    path = _write_st_dir(tiny_bert, name, modes, normalize, subfolder, dense)
    enc = SentenceEncoder.from_pretrained(str(path))
    assert enc.max_seq_length == MAX_SEQ and enc.pooling == Pooling(modes)
    got = enc.encode(TEXTS, batch_size=4)
    want = _reference(tiny_bert, TEXTS, modes, normalize, dense)
    assert got.shape == want.shape == (len(TEXTS), 24 if with_dense else 32 * len(modes))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # Length buckets (8 and 16 here) bound the compiles; a second call compiles nothing.
    assert 1 <= enc.num_compiles <= 2
    compiles = enc.num_compiles
    np.testing.assert_array_equal(enc.encode(TEXTS, batch_size=4), got)
    assert enc.num_compiles == compiles


def test_plain_hf_dir_means_mean_pooling_and_mesh_sharding(tiny_bert):
    """No modules.json: mean pooling, no normalisation (as sentence-transformers does); the
    encoder sharded over 8 devices gives the same vectors; identity follows the files."""
    enc = SentenceEncoder.from_pretrained(str(tiny_bert["hf_dir"]))
    assert enc.pooling.modes == ("mean",) and not enc.normalize
    want = _reference(tiny_bert, TEXTS, ("mean",), False, max_len=64)
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=8), want, atol=1e-4, rtol=0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    assert mesh.size == 8
    sharded = SentenceEncoder.from_pretrained(str(tiny_bert["hf_dir"]), mesh=mesh)
    assert sharded.identity == enc.identity
    np.testing.assert_allclose(sharded.encode(TEXTS, batch_size=8), want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------------------------


def _brute_force(heads, queries, k):
    h = heads / np.maximum(np.linalg.norm(heads, axis=1, keepdims=True), 1e-12)
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    s = q @ h.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def test_head_index_planted_duplicates_and_device_count_invariance():
    rng = np.random.default_rng(0)
    n, d, k = 1003, 24, 5
    heads = rng.normal(size=(n, d)).astype(np.float32)
    heads[500] = heads[17]  # an exact tie: the lower index must win
    planted = rng.choice(n, 40, replace=False)
    planted = planted[(planted != 500) & (planted != 17)]
    queries = heads[planted] + 0.01 * rng.normal(size=(len(planted), d)).astype(np.float32)
    queries = np.concatenate([queries, heads[[17]], rng.normal(size=(300, d)).astype(np.float32)])

    devices = np.asarray(jax.devices())
    meshes = {
        "1": jax.sharding.Mesh(devices[:1], ("heads",)),
        "8": jax.sharding.Mesh(devices, ("heads",)),
        "2x4": jax.sharding.Mesh(devices.reshape(2, 4), ("data", "model")),
    }
    results = {}
    for name, mesh in meshes.items():
        index = retrieval.HeadIndex(heads, mesh=mesh, head_block=64, query_chunk=128)
        assert index.block == 64  # from N and head_block only
        results[name] = index.search(queries, k)
    scores, idx = results["1"]
    for name in ("8", "2x4"):
        np.testing.assert_array_equal(results[name][0], scores)
        np.testing.assert_array_equal(results[name][1], idx)
    # Planted near-duplicates come first; the tie goes to the lower head index.
    np.testing.assert_array_equal(idx[: len(planted), 0], planted)
    tie_row = len(planted)
    assert list(idx[tie_row, :2]) == [17, 500]
    assert scores[tie_row, 0] == scores[tie_row, 1]
    want_s, want_i = _brute_force(heads, queries, k)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    agree = (idx == want_i).mean()
    assert agree > 0.99  # only float near-ties may order differently


def test_head_index_fewer_heads_than_k():
    heads = np.eye(3, 4, dtype=np.float32)
    index = retrieval.HeadIndex(heads, mesh=jax.sharding.Mesh(np.asarray(jax.devices()), ("h",)))
    scores, idx = index.search(np.array([[0, 1, 0, 0]], np.float32), k=5)
    assert list(idx[0]) == [1, 0, 2, -1, -1]
    assert scores[0, 0] == pytest.approx(1.0) and np.isneginf(scores[0, 3:]).all()


def _sample_like_kg():
    triples = []
    for _, head, attr, want, effect in sample.KNOWLEDGE_TRAIN + sample.KNOWLEDGE_DISTRACTORS:
        triples += [(head, "xAttr", attr), (head, "xWant", want), (head, "xEffect", effect)]
    triples.append((sample.KNOWLEDGE_TRAIN[0][1], "next_sentence", "PersonX 喝水"))
    return c3kg.from_triples(triples)


def test_lexical_near_duplicates_threshold_and_knowledge_text():
    kg = _sample_like_kg()
    enc = LexicalEncoder.fit(kg.heads)
    assert enc.dim == len(enc.buckets) + 1  # small vocabulary: exact, unhashed TF-IDF
    cfg = retrieval.RetrievalConfig(k=2, families=("xAttr", "event"), title_mode="none")
    r = retrieval.KnowledgeRetriever(kg, enc, cfg)
    records = [
        {"dialogue_id": f"d{i}", "title": "", "context": ["我朋友" + item[0]]}
        for i, item in enumerate(sample.KNOWLEDGE_TRAIN)
    ]
    records.append({"dialogue_id": "none", "title": "", "context": ["哦"]})  # no shared n-gram
    out = r.retrieve(records)
    for item, o in zip(sample.KNOWLEDGE_TRAIN, out):
        assert o["heads"][0] == item[1]
        assert o["knowledge"].split(";")[0] == item[2]  # the xAttr tail leads
    # Families order the tails: xAttr before event flow, joined with ";"; scores descend.
    assert out[0]["knowledge"].startswith(f"{sample.KNOWLEDGE_TRAIN[0][2]};PersonX 喝水")
    assert out[0]["scores"][0] >= out[0]["scores"][-1]
    assert out[-1] == {"dialogue_id": "none", "knowledge": "", "heads": [], "scores": []}
    # Only heads with tails in the chosen families are indexed.
    cfg = retrieval.RetrievalConfig(families=("event",))
    only_event = retrieval.KnowledgeRetriever(kg, enc, cfg)
    assert list(only_event.head_ids) == [0]
    # The same knowledge from a retriever on one device.
    one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("heads",))
    assert retrieval.KnowledgeRetriever(kg, enc, r.config, mesh=one).retrieve(records) == out


def test_random_encoder_for_plumbing():
    kg = _sample_like_kg()
    enc = prepare.make_encoder("random", kg, random_hidden=64, random_layers=1)
    emb = enc.encode(kg.heads[:5], batch_size=4)
    assert emb.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # Seeded: the same KG gives the same encoder identity (its cache key).
    again = prepare.make_encoder("random", kg, random_hidden=64, random_layers=1)
    assert again.identity == enc.identity
    with pytest.raises(ValueError, match="lexical, random or a local directory"):
        prepare.make_encoder("no/such/dir", kg)


def test_title_modes():
    kg = _sample_like_kg()
    enc = LexicalEncoder.fit(kg.heads)
    event, head = sample.KNOWLEDGE_TRAIN[0][:2]
    rec = {"dialogue_id": "x", "title": f"{event}的一天", "context": ["真的假的"]}
    by_mode = {}
    for mode in ("vector", "text", "none"):
        cfg = retrieval.RetrievalConfig(k=1, title_mode=mode)
        by_mode[mode] = retrieval.KnowledgeRetriever(kg, enc, cfg).retrieve([rec])[0]
    assert by_mode["vector"]["heads"] == [head]
    assert by_mode["text"]["heads"] == [head]
    assert by_mode["none"]["heads"] == []  # the context alone shares nothing with any head


class _CountingEncoder:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    identity = property(lambda self: self.inner.identity)
    dim = property(lambda self: self.inner.dim)

    def encode(self, texts, batch_size=64, progress=False):
        self.calls += 1
        return self.inner.encode(texts, batch_size=batch_size)


def test_head_embedding_cache_reuse_and_invalidation(tmp_path):
    kg_path = tmp_path / "kg.tsv"
    kg_path.write_text("PersonX 跑步\txAttr\t自律\nPersonX 熬夜\txAttr\t贪玩\n", "utf-8")
    cache = str(tmp_path / "cache")
    kg = c3kg.read_tsv(str(kg_path))
    enc = _CountingEncoder(LexicalEncoder.fit(kg.heads))
    first = retrieval.head_embeddings(kg, enc, cache_dir=cache)
    again = retrieval.head_embeddings(c3kg.read_tsv(str(kg_path)), enc, cache_dir=cache)
    assert enc.calls == 1 and np.array_equal(first, again)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 1
    # A changed KG file (even with the same heads) is re-encoded under a new key.
    kg_path.write_text("PersonX 跑步\txAttr\t自律\nPersonX 熬夜\txAttr\t累\n", "utf-8")
    retrieval.head_embeddings(c3kg.read_tsv(str(kg_path)), enc, cache_dir=cache)
    assert enc.calls == 2
    # So is a different encoder.
    other = _CountingEncoder(LexicalEncoder.fit(kg.heads, ngrams=(1, 1)))
    assert other.identity != enc.identity
    retrieval.head_embeddings(kg, other, cache_dir=cache)
    assert other.calls == 1
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 3


# ---------------------------------------------------------------------------------------------
# The bundled sample and the side table.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_release(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    summary = sample.write_sample(str(raw), seed=0)
    return raw, summary


def _raw_eval_knowledge_contexts(raw):
    """val/test knowledge contexts from the raw json (comment chain up to the keyed comment) and
    the head each one paraphrases."""
    kinds = json.loads((raw / "sample_kinds.json").read_text("utf-8"))
    events = sample.KNOWLEDGE_TRAIN + sample.KNOWLEDGE_VAL_ONLY + sample.KNOWLEDGE_TEST_ONLY
    out = []
    for split in ("val", "test"):
        for vid, video in json.loads((raw / f"{split}.json").read_text("utf-8")).items():
            if not isinstance(video["comments"], list):
                continue
            for top in video["comments"]:
                by_id = {top["id"]: top} | {r["id"]: r for r in top["replies"]}
                for cid, comment in by_id.items():
                    if kinds.get(f"{vid}/{cid}") != "knowledge":
                        continue
                    chain = [comment]
                    while chain[0] is not top:
                        chain.insert(0, by_id[chain[0].get("reply_to") or top["id"]])
                    context = [c["text"] for c in chain]
                    head = next(e[1] for e in events if e[0] in context[0])
                    out.append(
                        dict(
                            dialogue_id=f"{vid}/{cid}",
                            title=video["title"],
                            context=context,
                            head=head,
                            split=split,
                        )
                    )
    return out


def test_sample_knowledge_contexts_find_their_head(sample_release):
    raw, summary = sample_release
    kg = c3kg.read_tsv(str(raw / "knowledge.tsv"))
    contexts = _raw_eval_knowledge_contexts(raw)
    eval_only = set(summary["val_only_heads"]) | set(summary["test_only_heads"])
    assert len(contexts) >= 20 and any(c["head"] in eval_only for c in contexts)
    cfg = retrieval.RetrievalConfig(k=3)
    r = retrieval.KnowledgeRetriever(kg, LexicalEncoder.fit(kg.heads), cfg)
    out = r.retrieve(contexts)
    for c, o in zip(contexts, out):
        assert c["head"] in o["heads"], (c, o)
    top1 = np.mean([o["heads"][0] == c["head"] for c, o in zip(contexts, out)])
    assert top1 >= 0.9


def test_prepare_writes_a_joinable_side_table(tmp_path):
    kg = _sample_like_kg()
    r = retrieval.KnowledgeRetriever(
        kg, LexicalEncoder.fit(kg.heads), retrieval.RetrievalConfig(k=1)
    )
    sources = {
        split: [
            {
                "dialogue_id": f"{split}/{i}",
                "title": "",
                "context": ["我哥" + item[0], "真的假的"],
                "responses": [item[2]],
            }
            for i, item in enumerate(sample.KNOWLEDGE_TRAIN[start : start + 6])
        ]
        for split, start in (("train", 0), ("val", 6))
    }
    out_dir = str(tmp_path / "knowledge")
    manifest = prepare.prepare(sources, r, out_dir)
    assert manifest["splits"]["val"]["dialogues"] == 6
    assert manifest["splits"]["val"]["with_knowledge"] == 6
    assert json.loads((tmp_path / "knowledge" / "manifest.json").read_text())["kg_sha256"]

    table = prepare.KnowledgeTable(prepare.table_path(out_dir, "val"))
    assert len(table) == 6 and table.keys == [f"val/{i}" for i in range(6)]
    assert table[0]["heads"] == [sample.KNOWLEDGE_TRAIN[6][1]]
    table = pickle.loads(pickle.dumps(table))  # grain workers get a pickled copy
    assert [t["dialogue_id"] for t in table.__getitems__([5, 1])] == ["val/5", "val/1"]

    # Joined by the input pipeline: the formatter sees record["knowledge"].
    tables = prepare.side_tables(out_dir, ["val"])
    records_out = []

    def formatter(records):
        records_out.extend(records)
        return {"n": np.array([len(r["knowledge"]["knowledge"]) for r in records])}

    ds = input_pipeline.eval_dataset(
        sources["val"],
        formatter,
        global_batch_size=4,
        process_index=0,
        process_count=1,
        side_tables=tables["val"],
    )
    batches = list(ds)
    assert len(batches) == 2 and batches[1]["example_mask"].sum() == 2
    for rec in records_out[:6]:
        item = next(x for x in sample.KNOWLEDGE_TRAIN if x[0] in rec["context"][0])
        assert rec["knowledge"]["dialogue_id"] == rec["dialogue_id"]
        assert rec["knowledge"]["knowledge"].split(";")[0] == item[2]


def test_prepare_cli_on_the_built_sample(sample_release, tmp_path):
    """End to end: TFDS dialogues built from the sample -> prepare CLI (lexical) -> tables whose
    val/test knowledge dialogues lead with the right xAttr tail."""
    from tfds_builder import tiktalk

    raw, _ = sample_release
    data_dir = str(tmp_path / "data")
    tiktalk.build(str(raw), data_dir, "dialogues")
    manifest = prepare.main(
        [f"--data_dir={data_dir}", f"--kg={raw / 'knowledge.tsv'}", "--encoder=lexical", "--k=2"]
    )
    version_dir = input_pipeline.dataset_dir(data_dir)
    assert sorted(manifest["splits"]) == ["test", "train", "val"]
    assert os.listdir(os.path.join(version_dir, "knowledge_cache"))
    kinds = json.loads((raw / "sample_kinds.json").read_text("utf-8"))
    events = sample.KNOWLEDGE_TRAIN + sample.KNOWLEDGE_VAL_ONLY + sample.KNOWLEDGE_TEST_ONLY
    checked = 0
    for split in ("val", "test"):
        source = input_pipeline.open_split(version_dir, split)
        table = prepare.KnowledgeTable(prepare.table_path(f"{version_dir}/knowledge", split))
        assert table.keys == [
            retrieval.as_text(source[i]["dialogue_id"]) for i in range(len(source))
        ]
        for i in range(len(source)):
            dialogue_id = retrieval.as_text(source[i]["dialogue_id"])
            if kinds.get(dialogue_id) != "knowledge":
                continue
            first_turn = retrieval.as_text(source[i]["context"][0])
            item = next(e for e in events if e[0] in first_turn)
            assert table[i]["knowledge"].split(";")[0] == item[2], (first_turn, table[i])
            checked += 1
    assert checked >= 20
