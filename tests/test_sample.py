"""Tests for the synthetic sample release (tiktalk_jax/sample.py)."""

import collections
import json
import re

import av
import numpy as np
import pytest

from tiktalk_jax import sample


def _decode(path):
    with av.open(path) as container:
        n_audio = len(container.streams.audio)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    audio = None
    if n_audio:
        with av.open(path) as container:
            audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)[0]
    return frames, audio


def test_write_video_round_trips(tmp_path):
    frames = np.zeros((12, 64, 96, 3), np.uint8)
    frames[:, 16:48, 24:72, 1] = 255  # a green box
    t = np.arange(16000) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    path = str(tmp_path / "a.mp4")
    sample.write_video(path, frames, fps=12, audio=audio)
    got, got_audio = _decode(path)
    assert got.shape == (12, 64, 96, 3)
    assert got[0, 32, 48, 1] > 200 and got[0, 32, 48, 0] < 50
    assert got[0, 2, 2].max() < 30
    assert got_audio is not None and abs(len(got_audio) - 16000) < 2048
    spectrum = np.abs(np.fft.rfft(got_audio[2048:14000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(got_audio[2048:14000])
    assert abs(peak_hz - 1000) < 20


def test_write_video_without_audio_and_deterministic(tmp_path):
    frames = np.full((5, 32, 32, 3), 128, np.uint8)
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    sample.write_video(a, frames, fps=5, audio=None)
    sample.write_video(b, frames, fps=5, audio=None)
    got, got_audio = _decode(a)
    assert got.shape == (5, 32, 32, 3) and got_audio is None
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


# ---------------------------------------------------------------------------------------------
# The generated release. One module-scoped copy keeps the suite fast (about 3 s per generation).

_MENTION = re.compile(r"[@＠]\S+\s")
_BRACKET = re.compile(r"\[[^\]]{1,6}\]")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def _genuine(comment) -> bool:
    """Non-empty after stripping mentions, bracket emoticons and emoji, and liked at least once."""
    text = _BRACKET.sub("", _MENTION.sub("", comment["text"]))
    return bool(_CJK.search(text)) and comment["likes"] > 0


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    summary = sample.write_sample(str(out), seed=0)
    data = {s: json.loads((out / f"{s}.json").read_text("utf-8")) for s in ("train", "val", "test")}
    kinds = json.loads((out / "sample_kinds.json").read_text("utf-8"))
    return out, summary, data, kinds


def _good(summary, split):
    return [
        vid
        for vid, v in summary["videos"].items()
        if v["split"] == split and v["bad"] in (None, "no_audio")
    ]


def _contexts(record):
    """Ids of comments (level-1 or reply) with >= 5 genuine direct replies."""
    out = []
    for top in record["comments"]:
        direct = collections.Counter(
            r["reply_to"] or top["id"] for r in top["replies"] if _genuine(r)
        )
        out += [cid for cid, n in direct.items() if n >= 5]
    return out


def _all_text(records):
    texts = []
    for record in records.values():
        if isinstance(record["comments"], list):
            for top in record["comments"]:
                texts += [top["text"]] + [r["text"] for r in top["replies"]]
    return "\n".join(texts)


def test_layout(release):
    out, summary, data, kinds = release
    assert sorted(p.name for p in out.iterdir()) == [
        "knowledge.tsv",
        "sample_captions.json",
        "sample_kinds.json",
        "test.json",
        "train.json",
        "val.json",
        "videos",
    ]
    for split, records in data.items():
        assert set(records) == {v for v, a in summary["videos"].items() if a["split"] == split}
        for vid in _good(summary, split):
            assert re.fullmatch(r"\d{19}", vid)
            assert (out / "videos" / f"{vid}.mp4").stat().st_size > 1000
            record = records[vid]
            assert record["title"] and record["category"] in sample.CATEGORIES
            for top in record["comments"]:
                assert {"id", "text", "likes", "replies"} <= set(top)
                for r in top["replies"]:
                    assert set(r) == {"id", "text", "likes", "reply_to"}
    lines = (out / "knowledge.tsv").read_text("utf-8").splitlines()
    assert lines[0] == "head\trelation\ttail"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == summary["knowledge_rows"] and all(len(r) == 3 for r in rows)
    assert all(r[0].startswith("PersonX ") for r in rows)
    assert {r[1] for r in rows} >= {"xAttr", "xWant", "xEffect", "oReact"}
    assert set(kinds.values()) == set(sample.KINDS)


def test_captions_name_each_videos_colour_and_shape_only(release):
    out, summary, _, _ = release
    captions = json.loads((out / sample.CAPTIONS_FILE).read_text("utf-8"))
    assert set(captions) == set(summary["videos"])
    sound_words = [w for w in sample.SOUNDS.values()] + ["哔", "噪音", "沙沙"]
    for video_id, texts in captions.items():
        attrs = summary["videos"][video_id]
        colour, shape = sample.COLOURS[attrs["colour"]][0], sample.SHAPES[attrs["shape"]]
        assert len(texts) == len(sample.CAPTION_TEMPLATES) == len(set(texts))
        for text in texts:
            assert colour in text and shape in text, (video_id, text)
            others = [c for c, _ in sample.COLOURS.values() if c != colour]
            assert not any(w in text for w in others + sound_words), text


def test_deterministic_and_cli(release, tmp_path, capsys):
    out, summary, _, _ = release
    again = tmp_path / "again"
    summary2 = sample.main([str(again)])
    assert "train:" in capsys.readouterr().out
    assert summary2["splits"] == summary["splits"]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    sample.write_sample(str(other), seed=1)
    assert (other / "train.json").read_bytes() != (out / "train.json").read_bytes()


def test_counts(release):
    _, summary, data, kinds = release
    train = data["train"]
    n_train = sum(
        _genuine(r)
        for vid in _good(summary, "train")
        for top in train[vid]["comments"]
        for r in top["replies"]
    )
    assert n_train >= 600
    assert summary["splits"]["train"]["dialogues"] >= 600
    assert 35 <= len(_good(summary, "train")) <= 45
    for split in ("val", "test"):
        good = _good(summary, split)
        assert 8 <= len(good) <= 12
        contexts = {f"{vid}/{cid}" for vid in good for cid in _contexts(data[split][vid])}
        assert len(contexts) >= 40
        # The kinds file names exactly the 5-reference contexts of the good videos.
        assert contexts == {k for k in kinds if k.split("/")[0] in good}
        assert summary["splits"][split]["contexts"] == len(contexts)
    # Train kinds are keyed by reply ids of train videos.
    train_replies = {
        f"{vid}/{r['id']}"
        for vid in train
        if isinstance(train[vid]["comments"], list)
        for top in train[vid]["comments"]
        for r in top["replies"]
    }
    train_keys = {k for k in kinds if k.split("/")[0] in train}
    assert train_keys <= train_replies and len(train_keys) >= 600


def test_every_kind_in_every_split_and_balanced(release):
    _, summary, data, kinds = release
    for split, records in data.items():
        counts = collections.Counter(v for k, v in kinds.items() if k.split("/")[0] in records)
        assert set(counts) == set(sample.KINDS), split
        assert max(counts.values()) <= 1.5 * min(counts.values()), (split, counts)


def test_knowledge_heads_only_in_eval(release):
    out, summary, data, kinds = release
    tsv = (out / "knowledge.tsv").read_text("utf-8")
    text = {split: _all_text(records) for split, records in data.items()}
    for split, entries in (
        ("val", sample.KNOWLEDGE_VAL_ONLY),
        ("test", sample.KNOWLEDGE_TEST_ONLY),
    ):
        for event, head, tail, _, _ in entries:
            assert f"{head}\txAttr\t{tail}\n" in tsv
            assert event in text[split] and tail in text[split], (split, head)
            for other in set(data) - {split}:
                assert event not in text[other] and tail not in text[other], (split, other, head)
        assert summary[f"{split}_only_heads"] == [e[1] for e in entries]
    # Train heads are learnable: each appears in train and its tail in the train replies.
    for event, _, tail, _, _ in sample.KNOWLEDGE_TRAIN:
        assert event in text["train"] and tail in text["train"]
    # Every eval knowledge context is about an eval-only head, and the characters of eval-only
    # tails all occur in train text (trained embeddings), while the tails themselves never do.
    events = {e[0]: e for e in sample.KNOWLEDGE_VAL_ONLY + sample.KNOWLEDGE_TEST_ONLY}
    checked = 0
    for split in ("val", "test"):
        for vid, record in data[split].items():
            for top in record["comments"] if isinstance(record["comments"], list) else []:
                if _kinds_of(kinds, vid, top) == {"knowledge"}:
                    assert any(e in top["text"] for e in events), top["text"]
                    checked += 1
    assert checked >= 20
    for _, _, tail, _, _ in sample.KNOWLEDGE_VAL_ONLY + sample.KNOWLEDGE_TEST_ONLY:
        assert set(tail) <= set(text["train"]) and tail not in text["train"], tail


def _kinds_of(kinds, vid, top):
    """Kinds of the eval contexts that start with level-1 comment `top`."""
    ids = {top["id"]} | {r["id"] for r in top["replies"]}
    return {kinds[f"{vid}/{i}"] for i in ids if f"{vid}/{i}" in kinds}


def test_bad_items(release):
    out, summary, data, kinds = release
    bad = summary["bad"]
    assert set(bad) == {
        "no_audio",
        "truncated_mp4",
        "malformed_record",
        "reply_cycle",
        "duplicate_comment_id",
        "zero_byte_mp4",
        "missing_mp4",
        "unsafe_video_id",
    }
    videos = out / "videos"
    assert (videos / f"{bad['zero_byte_mp4']}.mp4").stat().st_size == 0
    assert not (videos / f"{bad['missing_mp4']}.mp4").exists()
    assert bad["missing_mp4"] in data["test"]
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(videos / f"{bad['truncated_mp4']}.mp4"))
    frames, audio = _decode(str(videos / f"{bad['no_audio']}.mp4"))
    assert frames.shape[0] == sample.NUM_FRAMES and audio is None
    assert summary["videos"][bad["no_audio"]]["has_audio"] is False
    assert not isinstance(data["train"][bad["malformed_record"]]["comments"], list)
    unsafe = bad["unsafe_video_id"]
    assert "/" in unsafe and ".." in unsafe and unsafe in data["test"]
    assert not any(k.startswith(unsafe) for k in kinds)
    replies = [r for top in data["train"][bad["reply_cycle"]]["comments"] for r in top["replies"]]
    to = {r["id"]: r["reply_to"] for r in replies}
    assert any(t is not None and to.get(t) == i for i, t in to.items())
    comments = data["train"][bad["duplicate_comment_id"]]["comments"]
    ids = [c["id"] for c in comments] + [r["id"] for c in comments for r in c["replies"]]
    assert len(ids) - len(set(ids)) == 1
    # Good videos carry none of these faults: unique ids, every reply_to resolves.
    for split, records in data.items():
        for vid in _good(summary, split):
            for top in records[vid]["comments"]:
                ids = {r["id"] for r in top["replies"]}
                assert len(ids) == len(top["replies"])
                assert all(r["reply_to"] is None or r["reply_to"] in ids for r in top["replies"])


def test_cleaning_material_present(release):
    _, _, data, _ = release
    text = "\n".join(_all_text(records) for records in data.values())
    for needle in ("@小王 ", "哈哈哈哈哈哈", "233333", "[捂脸]", "[赞]", "[泣不成声]", "😂"):
        assert needle in text, needle
    comments = [
        c
        for records in data.values()
        for record in records.values()
        if isinstance(record["comments"], list)
        for top in record["comments"]
        for c in [top] + top["replies"]
    ]
    assert sum(not _genuine(c) and c["likes"] > 0 for c in comments) >= 3  # empty after cleaning
    assert sum(c["likes"] == 0 for c in comments) >= 3


def test_no_leaks_in_titles_or_questions(release):
    _, summary, data, kinds = release
    for records in data.values():
        for record in records.values():
            assert not any(w in record["title"] for w in sample.ATTRIBUTE_WORDS), record["title"]
    # Vision/audio contexts do not say the answer; every reference does.
    checked = 0
    for split in ("val", "test"):
        for vid in _good(summary, split):
            attrs = summary["videos"][vid]
            colour = sample.COLOURS[attrs["colour"]][0]
            shape = sample.SHAPES[attrs["shape"]]
            sound = sample.SOUNDS[attrs["sound"]]
            for top in data[split][vid]["comments"]:
                chain = {top["id"]: [top["text"]]}
                for r in top["replies"]:
                    chain[r["id"]] = chain[r["reply_to"] or top["id"]] + [r["text"]]
                for cid, context in chain.items():
                    kind = kinds.get(f"{vid}/{cid}")
                    if kind not in ("vision", "audio"):
                        continue
                    assert not any(w in t for t in context for w in sample.ATTRIBUTE_WORDS), context
                    refs = [
                        r
                        for r in top["replies"]
                        if (r["reply_to"] or top["id"]) == cid and _genuine(r)
                    ]
                    keys = (colour, shape) if kind == "vision" else (sound,)
                    assert refs and all(any(k in r["text"] for k in keys) for r in refs), refs
                    checked += 1
    assert checked >= 40


def test_media_matches_attributes(release):
    out, summary, _, _ = release
    good = [(vid, v) for vid, v in summary["videos"].items() if v["bad"] is None]
    seen_colours, seen_sounds = set(), set()
    for vid, v in good:
        if v["colour"] in seen_colours and v["sound"] in seen_sounds:
            continue
        seen_colours.add(v["colour"])
        seen_sounds.add(v["sound"])
        frames, audio = _decode(str(out / "videos" / f"{vid}.mp4"))
        assert frames.shape == (sample.NUM_FRAMES, sample.FRAME_SIZE, sample.FRAME_SIZE, 3)
        pixels = frames.reshape(-1, 3).astype(np.int32)
        saturated = pixels.max(1) - pixels.min(1) > 100
        assert 0.1 < saturated.mean() < 0.5  # one large shape on a grey background
        mean = pixels[saturated].mean(0)
        names = list(sample.COLOURS)
        dists = [np.abs(mean - np.array(sample.COLOURS[n][1])).sum() for n in names]
        assert names[int(np.argmin(dists))] == v["colour"]
        seg = audio[2048:-2048]
        spectrum = np.abs(np.fft.rfft(seg))
        flatness = np.exp(np.log(spectrum + 1e-9).mean()) / spectrum.mean()
        if v["sound"] == "noise":
            assert flatness > 0.5
        else:
            assert flatness < 0.3
            peak = np.argmax(spectrum) * sample.SAMPLE_RATE / len(seg)
            assert abs(peak - sample.TONE_HZ[v["sound"]]) < 10, (v["sound"], peak)
            rms = np.sqrt((seg[: len(seg) // 400 * 400].reshape(-1, 400) ** 2).mean(1))
            quiet = (rms < 0.05).mean()
            assert (0.3 < quiet < 0.7) if v["sound"] == "beeps" else quiet < 0.05
    assert seen_colours == set(sample.COLOURS) and seen_sounds == set(sample.SOUNDS)
