"""Input pipeline: exact resume, host sharding, determinism, eval padding, joins, formatting."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib

CHARS = "一二三四五六七八九十红橙黄绿蓝紫圆方猫狗高低音滴好看哈"


def make_records(n, *, num_refs=1, seed=0):
    """Dialogues in the `tiktalk/dialogues` schema; dialogue i's response starts with its number."""
    rng = np.random.default_rng(seed)

    def text(k):
        return "".join(rng.choice(list(CHARS), size=k))

    records = []
    for i in range(n):
        turns = [text(int(rng.integers(2, 8))) for _ in range(int(rng.integers(1, 4)))]
        refs = [f"{i} " + text(int(rng.integers(2, 6))) for _ in range(num_refs)]
        records.append(
            dict(
                dialogue_id=f"v{i % 7}/c{i}",
                video_id=f"v{i % 7}",
                title=text(5),
                category="",
                context=turns,
                responses=refs,
                emoticons=[],
            )
        )
    return records


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    texts = list(tokenizer_lib.dialogue_texts(make_records(50, num_refs=5)))
    texts.append(" ".join(str(i) for i in range(100)))
    return tokenizer_lib.load_tokenizer(None, str(d), texts=texts, vocab_size=400)


def input_config(**overrides):
    cfg = ip.default_config()
    cfg.max_context_len = 24
    cfg.max_response_len = 10
    cfg.update(overrides)
    return cfg


def fmt(tok, train=True, **overrides):
    return ip.get_formatter("dialogue_text", input_config(**overrides), tok, train=train)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def epoch_orders(batches):
    return np.concatenate([b["record_index"] for b in batches])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restore_resumes_at_exactly_the_next_batch(tok, num_workers):
    records = make_records(37)
    # 37 examples, batches of 4: epoch boundaries fall inside batches 9 and 18.
    make = lambda: ip.train_dataset(
        records, fmt(tok), global_batch_size=4, seed=3, num_workers=num_workers
    )
    reference = take(iter(make()), 22)
    it = iter(make())
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # must survive a checkpoint as JSON
    expected_next = take(it, 15)
    if num_workers:
        it.close()
    restored = iter(make())
    restored.set_state(state)
    resumed = take(restored, 15)
    if num_workers:
        restored.close()
    assert_batches_equal(resumed, reference[7:22])
    assert_batches_equal(resumed, expected_next)
    # Shapes are fixed and every training example is real.
    for b in resumed:
        assert b["context_ids"].shape == (4, 24) and b["context_ids"].dtype == np.int32
        assert b["response_ids"].shape == (4, 10)
        assert b["example_mask"].all()


def test_each_epoch_is_a_new_permutation_and_seeds_matter(tok):
    records = make_records(12)
    order = lambda seed: epoch_orders(
        take(iter(ip.train_dataset(records, fmt(tok), global_batch_size=1, seed=seed)), 36)
    )
    a = order(0)
    np.testing.assert_array_equal(a, order(0))  # same seed, same run again
    assert not np.array_equal(a, order(1))
    epochs = a.reshape(3, 12)
    for e in epochs:
        assert sorted(e) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1])
    # The formatted content follows the index: the response starts with the dialogue number.
    batch = next(iter(ip.train_dataset(records, fmt(tok), global_batch_size=1, seed=0)))
    number = tok.decode(batch["response_ids"][0], skip_special_tokens=True).split()[0]
    assert number == str(batch["record_index"][0])


def test_two_hosts_see_disjoint_data_covering_the_split(tok):
    records = make_records(23)
    train_seen, eval_seen = [], []
    for host in (0, 1):
        train = ip.train_dataset(
            records,
            fmt(tok),
            global_batch_size=2,
            seed=0,
            num_epochs=1,
            process_index=host,
            process_count=2,
        )
        train_seen.append(set(epoch_orders(list(train)).tolist()))
        evals = list(
            ip.eval_dataset(
                records, fmt(tok, False), global_batch_size=4, process_index=host, process_count=2
            )
        )
        eval_seen.append(
            set(np.concatenate([b["record_index"][b["example_mask"]] for b in evals]).tolist())
        )
    for seen in (train_seen, eval_seen):
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(23))
    with pytest.raises(ValueError, match="not divisible"):
        ip.train_dataset(records, fmt(tok), global_batch_size=3, seed=0, process_count=2)


def test_eval_is_in_order_padded_and_equal_length_on_every_host(tok):
    records = make_records(37, num_refs=5)
    # 37 examples over 2 hosts with a global batch of 8: 19 and 18 examples -> 5 batches of 4 each.
    assert ip.num_eval_batches(37, 8, 2) == 5
    per_host = []
    for host in (0, 1):
        ds = ip.eval_dataset(
            records, fmt(tok, False), global_batch_size=8, process_index=host, process_count=2
        )
        batches = list(ds)
        assert len(batches) == 5
        per_host.append(batches)
        mask = np.concatenate([b["example_mask"] for b in batches])
        index = np.concatenate([b["record_index"] for b in batches])
        assert mask.dtype == bool and mask.sum() == (19 if host == 0 else 18)
        np.testing.assert_array_equal(index[mask], np.arange(host, 37, 2))
        assert (index[~mask] == -1).all() and not mask[mask.sum() :].any()
        for b in batches:
            assert b["context_ids"].shape == (4, 24)
            assert b["references_ids"].shape == (4, 5, 10)
            assert b["references_mask"].shape == (4, 5, 10)
            np.testing.assert_array_equal(b["references_ids"][:, 0], b["response_ids"])
    # A second pass yields the same batches.
    again = list(
        ip.eval_dataset(
            records, fmt(tok, False), global_batch_size=8, process_index=0, process_count=2
        )
    )
    assert_batches_equal(again, per_host[0])


def test_context_truncation_keeps_the_most_recent_turns(tok):
    f = fmt(tok, max_context_len=10, max_response_len=5)
    records = [
        dict(context=["一二三", "四五", "六七八"], responses=["红橙黄绿蓝紫"]),
        dict(context=["一二", "三四五六七八九十红橙黄"], responses=["猫"]),
        dict(context=["猫"], responses=["狗"]),
    ]
    batch = f(records)
    tokens = [tok.convert_ids_to_tokens(row) for row in batch["context_ids"]]
    # 1 + (2+1) + (3+1) = 8 <= 10 fits the last two turns; adding the first (3+1) would not.
    assert tokens[0] == ["[CLS]", "四", "五", "[SEP]", "六", "七", "八", "[SEP]", "[PAD]", "[PAD]"]
    # The latest turn alone overflows: its last 8 tokens are kept.
    assert tokens[1] == ["[CLS]", "六", "七", "八", "九", "十", "红", "橙", "黄", "[SEP]"]
    assert tokens[2][:3] == ["[CLS]", "猫", "[SEP]"]
    np.testing.assert_array_equal(batch["context_mask"].sum(1), [8, 10, 3])
    # Responses keep their start and always end in [SEP].
    resp = [tok.convert_ids_to_tokens(row) for row in batch["response_ids"]]
    assert resp[0] == ["[CLS]", "红", "橙", "黄", "[SEP]"]
    assert resp[2] == ["[CLS]", "狗", "[SEP]", "[PAD]", "[PAD]"]
    np.testing.assert_array_equal(batch["response_mask"].sum(1), [5, 3, 3])
    assert "references_ids" not in batch


def test_formatter_accepts_tfds_bytes_records(tok):
    f = fmt(tok, train=False)
    as_str = dict(context=["红色圆", "好看"], responses=["猫", "狗"])
    as_bytes = dict(
        context=np.array([t.encode() for t in as_str["context"]], dtype=object),
        responses=np.array([t.encode() for t in as_str["responses"]], dtype=object),
    )
    a, b = f([as_str]), f([as_bytes])
    assert_batches_equal([a], [b])
    # Two references: rows 2..4 are padding.
    assert b["references_mask"][0].any(-1).tolist() == [True, True, False, False, False]


def test_side_table_join_by_key(tok):
    records = make_records(20)
    media = [
        dict(video_id=f"v{k}", brightness=np.float32(k) / 10, frames=np.full((2, 3), k))
        for k in reversed(range(7))
    ]

    @ip.register_formatter("test_media_brightness")
    def _factory(config, tokenizer, *, train):
        del config, tokenizer, train
        return lambda r: dict(
            brightness=np.asarray(r["media"]["brightness"], np.float32),
            video=np.asarray(int(r["video_id"][1:]), np.int32),
            frames=np.asarray(r["media"]["frames"], np.int32),
        )

    f = ip.get_formatter("test_media_brightness", input_config(), tok, train=False)
    table = ip.SideTable("media", media, key="video_id")
    batches = list(ip.eval_dataset(records, f, global_batch_size=4, side_tables=[table]))
    video = np.concatenate([b["video"] for b in batches])
    np.testing.assert_allclose(np.concatenate([b["brightness"] for b in batches]), video / 10)
    assert batches[0]["frames"].shape == (4, 2, 3)
    assert (batches[0]["frames"][:, 0, 0] == batches[0]["video"]).all()
    assert table.index() == {f"v{k}": 6 - k for k in range(7)}

    with pytest.raises(ValueError, match="already registered"):
        ip.register_formatter("test_media_brightness")(_factory)
    with pytest.raises(KeyError, match="unknown formatter"):
        ip.get_formatter("no_such_model", input_config(), tok, train=True)


def test_missing_side_key_is_an_error_or_a_recorded_skip(tok):
    records = make_records(21)
    partial = [dict(video_id=f"v{k}", x=k) for k in range(7) if k != 3]  # v3 lacks media
    table = lambda: ip.SideTable("media", partial, key="video_id")
    with pytest.raises(KeyError, match=r"video_id='v3' not found in side table 'media'"):
        ip.train_dataset(records, fmt(tok), global_batch_size=2, seed=0, side_tables=[table()])

    indices, skipped = ip.join_indices(records, [table()], on_missing="skip")
    assert skipped == [f"v3/c{i}" for i in (3, 10, 17)]
    assert set(indices.tolist()) == set(range(21)) - {3, 10, 17}
    ds = ip.train_dataset(
        records, fmt(tok), global_batch_size=2, seed=0, side_tables=[table()], on_missing="skip"
    )
    seen = epoch_orders(take(iter(ds), 27))
    assert set(seen.tolist()) == set(indices.tolist())

    with pytest.raises(ValueError, match="duplicate key"):
        ip.SideTable("media", partial + partial[:1], key="video_id").index()


def test_make_datasets_from_config(tok, tmp_path):
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(name="dialogue_text"))
    config.input = input_config(batch_size=4, eval_batch_size=4, vocab_dir=str(tmp_path))
    sources = {"train": make_records(15), "val": make_records(6, num_refs=5, seed=1)}
    data = ip.make_datasets(config, sources=sources, process_index=0, process_count=1)
    assert (tmp_path / "vocab.txt").exists()  # trained on the train split and saved
    train_batch = next(iter(data.train))
    assert train_batch["context_ids"].shape == (4, 24)
    val = list(data.evals["val"])
    assert len(val) == data.num_eval_batches["val"] == 2
    assert val[1]["example_mask"].tolist() == [True, True, False, False]
    assert data.skipped == {"train": [], "val": []}
    assert data.eval_sources["val"] is sources["val"]


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_make_global_shards_the_batch_over_data_axes(axis_type):
    kind = getattr(jax.sharding.AxisType, axis_type.capitalize())
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(kind,) * 2)
    batch = {
        "ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
        "example_mask": np.array([True] * 6 + [False] * 2),
    }
    out = ip.make_global(batch, mesh)
    for k, v in batch.items():
        assert out[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(out[k]), v)
        assert out[k].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
        shards = out[k].addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
    # A mesh without an fsdp axis shards over "data" alone; rows are split 4 ways.
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind,) * 2)
    out2 = ip.make_global(batch, mesh2)
    assert out2["ids"].sharding.spec == jax.sharding.PartitionSpec(("data",))
    assert {s.data.shape for s in out2["ids"].addressable_shards} == {(2, 5)}


def _write_tfds(records, data_dir):
    """A TFDS ArrayRecord dataset with the dialogues feature spec (stands in for the builder)."""
    import tensorflow_datasets as tfds

    class TinyDialogues(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            seq = tfds.features.Sequence(text)
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    dict(
                        dialogue_id=text,
                        video_id=text,
                        title=text,
                        category=text,
                        context=seq,
                        responses=seq,
                        emoticons=seq,
                    )
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for r in records:
                yield r["dialogue_id"], r

    builder = TinyDialogues(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def test_text_records_reader_matches_tfds(tok, tmp_path):
    records = make_records(13, num_refs=2)
    records[4]["emoticons"] = ["[捂脸]", "[赞]"]
    builder = _write_tfds(records, str(tmp_path))
    tfds_source = builder.as_data_source(split="train")
    fast = ip.open_split(builder.data_dir, "train")
    assert isinstance(fast, ip.TextRecords) and len(fast) == 13
    everything = list(range(13))
    for a, b in zip(tfds_source.__getitems__(everything), fast.__getitems__(everything)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k], k
    assert fast[3] == tfds_source[3]
    by_id = {
        as_bytes["dialogue_id"].decode(): as_bytes for as_bytes in fast.__getitems__(everything)
    }
    assert by_id["v4/c4"]["emoticons"] == ["[捂脸]".encode(), "[赞]".encode()]
    assert not ip.TextRecords.supports(records)
    # Both readers feed identical batches.
    run = lambda src: take(iter(ip.train_dataset(src, fmt(tok), global_batch_size=4, seed=1)), 5)
    assert_batches_equal(run(tfds_source), run(fast))


def test_builder_dialogues_and_media_through_the_pipeline(tmp_path):
    """The TFDS builder's dummy release, built to ArrayRecord, read back through the pipeline."""
    import os

    from tfds_builder import tiktalk

    manual_dir = os.path.join(os.path.dirname(tiktalk.__file__), "dummy_data")
    data_dir = str(tmp_path / "data")
    dialogues = tiktalk.build(manual_dir, data_dir, "dialogues")
    media = tiktalk.build(manual_dir, data_dir, "media", num_workers=1)

    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(name="dialogue_text"))
    config.input = input_config(
        data_dir=data_dir, batch_size=2, eval_batch_size=2, eval_splits=("val", "test")
    )
    sides = {
        s: [ip.SideTable("media", media.as_data_source(split=s), key="video_id")]
        for s in ("train", "val", "test")
    }
    data = ip.make_datasets(config, side_tables=sides, process_index=0, process_count=1)
    # The vocab is trained on the train split and stored with the dataset.
    vocab = os.path.join(dialogues.data_dir, tokenizer_lib.VOCAB_FILENAME)
    assert os.path.exists(vocab)
    assert data.skipped == {"train": [], "val": [], "test": []}

    train_source = ip.open_split(dialogues.data_dir, "train")
    assert isinstance(train_source, ip.TextRecords)
    tfds_train = dialogues.as_data_source(split="train")
    assert [train_source[i] for i in range(len(tfds_train))] == [
        tfds_train[i] for i in range(len(tfds_train))
    ]

    batches = take(iter(data.train), 4)  # 4 train dialogues: two epochs
    seen = np.concatenate([b["record_index"] for b in batches])
    assert sorted(seen[:4].tolist()) == sorted(seen[4:].tolist()) == list(range(len(tfds_train)))
    tok = data.tokenizer
    for b in batches:
        for row, i in zip(b["response_ids"], b["record_index"]):
            response = tfds_train[int(i)]["responses"][0].decode()
            decoded = tok.decode(row, skip_special_tokens=True).replace(" ", "")
            assert decoded == response.lower().replace(" ", "")
            assert tok.unk_token_id not in row

    for split in ("val", "test"):
        evals = list(data.evals[split])
        assert len(evals) == data.num_eval_batches[split] == 1
        (b,) = evals
        assert b["example_mask"].tolist() == [True, False]
        assert b["references_ids"].shape == (2, 5, 10)
        assert b["references_mask"][0].any(-1).all()  # 5 references each

    # The media side table joins by video_id: a per-example formatter sees the video's record.
    @ip.register_formatter("test_media_frames")
    def _frames(config, tokenizer, *, train):
        del config, tokenizer, train
        return lambda r: dict(
            num_frames=np.int32(len(r["media"]["frames"])),
            same_video=np.bool_(r["media"]["video_id"] == r["video_id"]),
        )

    f = ip.get_formatter("test_media_frames", config.input, tok, train=True)
    ds = ip.train_dataset(
        train_source, f, global_batch_size=2, seed=0, side_tables=sides["train"], process_count=1
    )
    b = next(iter(ds))
    assert b["same_video"].all() and (b["num_frames"] >= 1).all()
