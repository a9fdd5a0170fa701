"""Comment trees -> dialogues, the 5-reference rule, the jsonl layout and bad text input.

These run the builder's text stages (raw readers + dialogues.prepare) without TFDS; the TFDS
build itself is covered by tests/test_tfds_build.py.
"""

import json

import pytest

from tfds_builder.tiktalk import dialogues, raw
from tfds_builder.tiktalk.fake_release import (
    comment,
    dialogue_line,
    eval_video,
    reply,
    video,
    write_json,
    write_jsonl,
)
from tfds_builder.tiktalk.report import Report


def prepare(root, **opts):
    report = Report("dialogues", "1.0.0", root)
    layout = raw.check_layout(root, need_videos=False)
    text_opts = dialogues.TextOptions(blocklist=raw.read_blocklist(layout.blocklist), **opts)
    return dialogues.prepare(layout, text_opts, report), report


def by_id(ds):
    return {d.dialogue_id: d for d in ds}


def skipped(report, split):
    return report.to_dict()["splits"][split]["skipped"]


# ------------------------------------------------------------------------------------------
# Splitting


def test_every_reply_is_one_train_dialogue_with_its_ancestor_chain(tmp_path):
    chain = [reply("r1", "第一层")] + [
        reply(f"r{i}", f"第{i}层", 0, f"r{i - 1}") for i in range(2, 7)
    ]
    write_json(tmp_path, "train", {"v": video("标题", [comment("c", "顶层评论", 3, chain)])})
    out, _ = prepare(tmp_path)
    got = by_id(out["train"])
    assert sorted(got) == [f"v/r{i}" for i in range(1, 7)]
    assert got["v/r1"].context == ("顶层评论",)
    assert got["v/r6"].context == ("顶层评论", "第一层", "第2层", "第3层", "第4层", "第5层")
    assert got["v/r6"].responses == ("第6层",)
    assert got["v/r3"].title == "标题" and got["v/r3"].video_id == "v"


def test_null_absent_or_level1_reply_to_answers_the_level1_comment(tmp_path):
    replies = [
        reply("r1", "空的回复对象", 0, None),
        {"id": "r2", "text": "没有reply_to字段", "likes": 1},
        reply("r3", "直接回复顶层", 0, "c"),
    ]
    write_json(tmp_path, "train", {"v": video("t", [comment("c", "顶层", 0, replies)])})
    out, _ = prepare(tmp_path)
    assert {d.dialogue_id: d.context for d in out["train"]} == {
        "v/r1": ("顶层",),
        "v/r2": ("顶层",),
        "v/r3": ("顶层",),
    }


def test_emoticons_and_cleaning_in_dialogues(tmp_path):
    replies = [reply("r1", "@小明 哈哈哈哈哈哈😂"), reply("r2", "[赞]真的", 0, "r1")]
    vid = video("好看的视频[捂脸]", [comment("c", "看哭了[泣不成声]", 0, replies)], category="搞笑")
    write_json(tmp_path, "train", {"v": vid})
    out, _ = prepare(tmp_path)
    d = by_id(out["train"])["v/r2"]
    assert d.title == "好看的视频"
    assert d.category == "搞笑"
    assert d.context == ("看哭了", "哈哈哈")
    assert d.responses == ("真的",)
    assert d.emoticons == ("[泣不成声]", "😂", "[赞]")


def test_empty_after_cleaning_drops_comment_and_its_subtree(tmp_path):
    replies = [
        reply("r1", "[捂脸][捂脸]"),  # empty after cleaning
        reply("r2", "下面的回复", 0, "r1"),  # its context would lose a turn
        reply("r3", "正常回复"),
    ]
    write_json(tmp_path, "train", {"v": video("t", [comment("c", "顶层", 0, replies)])})
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["v/r3"]
    assert report.ids("train", "empty_after_cleaning") == ["v/r1"]
    assert report.ids("train", "ancestor_dropped") == ["v/r2"]


def test_video_without_replies_is_dropped(tmp_path):
    write_json(
        tmp_path,
        "train",
        {
            "lonely": video("t", [comment("c1", "没人理我"), comment("c2", "我也是")]),
            "empty": video("t", []),
            "ok": video("t", [comment("c", "有人吗", 0, [reply("r", "有")])]),
        },
    )
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["ok/r"]
    assert report.ids("train", "no_replies") == ["lonely", "empty"]


def test_likes_thresholds(tmp_path):
    replies = [reply("r1", "少赞", 1), reply("r2", "其子", 50, "r1"), reply("r3", "多赞", 10)]
    write_json(
        tmp_path,
        "train",
        {
            "v": {**video("t", [comment("c", "顶层", 20, replies)]), "likes": 100},
            "w": {**video("t", [comment("c", "顶层", 20, [reply("r", "回复", 9)])]), "likes": 5},
        },
    )
    everything, _ = prepare(tmp_path)  # default keeps everything, likes 0 included
    assert len(everything["train"]) == 4
    out, report = prepare(tmp_path, min_likes=5, min_video_likes=10)
    assert [d.dialogue_id for d in out["train"]] == ["v/r3"]
    assert report.ids("train", "below_likes_threshold") == ["v/r1"]
    assert report.ids("train", "ancestor_dropped") == ["v/r2"]
    assert report.ids("train", "below_video_likes_threshold") == ["w"]


def test_blocklist_file_drops_matching_comments(tmp_path):
    replies = [reply("r1", "加我VX领红包"), reply("r2", "正常"), reply("r3", "@vx小助手 你好")]
    write_json(tmp_path, "train", {"v": video("t", [comment("c", "顶层", 0, replies)])})
    (tmp_path / "blocklist.txt").write_text("vx\n红包\n", "utf-8")
    out, report = prepare(tmp_path)
    # r3's match is only inside an @mention (a nickname): not blocked.
    assert [d.dialogue_id for d in out["train"]] == ["v/r2", "v/r3"]
    entry = skipped(report, "train")["blocklisted"]
    assert entry["ids"] == ["v/r1"]
    assert entry["details"]["v/r1"] in ("vx", "红包")


# ------------------------------------------------------------------------------------------
# The 5-reference rule


def test_val_context_yields_one_example_with_five_most_liked_references(tmp_path):
    likes = {"7": 5, "9": 9, "10": 9, "3": 1, "4": 0, "5": 3, "6": 2}
    replies = [reply(rid, f"回复{rid}", n) for rid, n in likes.items()]
    write_json(tmp_path, "val", {"v": video("t", [comment("c", "问题", 0, replies)])})
    out, report = prepare(tmp_path)
    (d,) = out["val"]
    assert d.dialogue_id == "v/c"
    assert d.context == ("问题",)
    # Most liked first; the 9-likes tie is broken by id, numerically (9 < 10).
    assert d.responses == ("回复9", "回复10", "回复7", "回复5", "回复6")
    assert report.to_dict()["splits"]["val"]["skipped"] == {}


def test_string_ids_tie_break_as_strings():
    keys = sorted(["b", "a10", "a9", "10", "9"], key=dialogues.id_sort_key)
    assert keys == ["9", "10", "a10", "a9", "b"]


def test_contexts_with_four_replies_are_dropped_from_val_and_test_only(tmp_path):
    four = {"v4": eval_video("f", n_replies=4), "v5": eval_video("g", n_replies=5)}
    write_json(tmp_path, "train", {"t4": eval_video("x", n_replies=4)})
    write_json(tmp_path, "val", four)
    write_json(tmp_path, "test", {"w4": eval_video("h", n_replies=4), "w5": eval_video("i", 5)})
    out, report = prepare(tmp_path)
    assert len(out["train"]) == 4  # train keeps every reply
    assert [d.dialogue_id for d in out["val"]] == ["v5/gc"]
    assert [d.dialogue_id for d in out["test"]] == ["w5/ic"]
    assert report.ids("val", "too_few_references") == ["v4/fc"]
    assert report.ids("test", "too_few_references") == ["w4/hc"]
    assert report.ids("val", "no_dialogues") == ["v4"]
    assert skipped(report, "val")["too_few_references"]["details"] == {"v4/fc": "4 replies"}


def test_deep_val_context_and_surviving_replies_only(tmp_path):
    replies = [reply("q", "同问")]
    replies += [reply(f"a{i}", f"答案{i}", i, "q") for i in range(5)]
    replies += [reply("e", "[捂脸]", 99, "q")]  # empty after cleaning: not a reference
    write_json(tmp_path, "test", {"v": video("t", [comment("c", "这是什么", 0, replies)])})
    out, report = prepare(tmp_path)
    (d,) = out["test"]
    assert d.dialogue_id == "v/q"
    assert d.context == ("这是什么", "同问")
    assert d.responses == ("答案4", "答案3", "答案2", "答案1", "答案0")
    assert report.ids("test", "too_few_references") == ["v/c"]  # c has one direct reply


def test_num_references_is_configurable(tmp_path):
    write_json(tmp_path, "val", {"v": eval_video("p", n_replies=3)})
    out, _ = prepare(tmp_path, num_references=3)
    assert [len(d.responses) for d in out["val"]] == [3]
    out, _ = prepare(tmp_path, num_references=0)  # 0: val built like train
    assert [d.dialogue_id for d in out["val"]] == [f"v/pr{i}" for i in range(3)]


# ------------------------------------------------------------------------------------------
# Pre-split jsonl layout


def test_jsonl_layout_is_cleaned_and_split(tmp_path):
    write_jsonl(
        tmp_path,
        "train",
        [
            dialogue_line("d1", "v1", ["@小王 你看[捂脸]"], ["哈哈哈哈哈"], title="标题😂"),
            dialogue_line("d2", "v1", ["一", "二"], ["甲", "乙"]),
        ],
    )
    write_jsonl(
        tmp_path,
        "test",
        [
            dialogue_line("t1", "v2", ["问"], [f"答{i}" for i in range(6)]),
            dialogue_line("t2", "v2", ["问"], ["答", "[赞]", "答2", "答3", "答4"]),
        ],
    )
    out, report = prepare(tmp_path)
    train = by_id(out["train"])
    assert sorted(train) == ["d1", "d2#0", "d2#1"]
    assert train["d1"].context == ("你看",)
    assert train["d1"].responses == ("哈哈哈",)
    assert train["d1"].title == "标题"
    assert train["d1"].emoticons == ("[捂脸]",)
    assert train["d2#1"].context == ("一", "二") and train["d2#1"].responses == ("乙",)
    (t1,) = out["test"]
    assert t1.dialogue_id == "t1" and t1.responses == tuple(f"答{i}" for i in range(5))
    assert report.ids("test", "empty_after_cleaning") == ["t2#response1"]
    assert report.ids("test", "too_few_references") == ["t2"]
    assert report.layout == {"train": "jsonl", "test": "jsonl"}


def test_jsonl_bad_lines_are_skipped_and_good_lines_kept(tmp_path):
    good = [dialogue_line(f"g{i}", "v", ["上文"], [f"回复{i}"]) for i in range(3)]
    bad_bytes = json.dumps(dialogue_line("bad_utf8", "v", ["上文"], ["x"]), ensure_ascii=False)
    bad_bytes = bad_bytes.encode().replace(b'"x"', b'"\xff\xfe"')
    lines = [
        good[0],
        bad_bytes,  # invalid UTF-8 bytes inside a string
        '{"dialogue_id": "surrogate", "video_id": "v", "context": ["a"], "responses": ["\\udc80"]}',
        "{not json",
        {"dialogue_id": "no_ctx", "video_id": "v", "responses": ["r"]},
        {"dialogue_id": "bad_type", "video_id": "v", "context": "一句话", "responses": ["r"]},
        {"dialogue_id": "unsafe", "video_id": "../etc", "context": ["a"], "responses": ["r"]},
        good[1],
        dialogue_line("g0", "v", ["重复"], ["重复"]),  # duplicate dialogue_id
        "",
        good[2],
    ]
    write_jsonl(tmp_path, "train", lines)
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["g0", "g1", "g2"]
    assert out["train"][0].responses == ("回复0",)  # the first g0 wins
    assert report.ids("train", "invalid_utf8") == ["bad_utf8", "surrogate"]
    assert report.ids("train", "malformed_record") == [
        "train.jsonl:4",
        "train.jsonl:5",
        "train.jsonl:6",
    ]
    assert report.ids("train", "unsafe_video_id") == ["unsafe"]
    assert report.ids("train", "duplicate_dialogue_id") == ["g0"]


# ------------------------------------------------------------------------------------------
# Bad input in the split json layout: each case is reported with its id, good data is kept.


def good_video(prefix="g"):
    return video("好视频", [comment(f"{prefix}c", "好评论", 1, [reply(f"{prefix}r", "好回复", 1)])])


def test_malformed_records(tmp_path):
    write_json(
        tmp_path,
        "train",
        {
            "g1": good_video(),
            "not_dict": ["a", "list"],
            "bad_comments": {"title": "t", "comments": "评论加载失败"},
            "mixed": video(
                "t",
                [
                    {"id": "nt", "likes": 1, "replies": []},  # no text
                    {"id": "bl", "text": "x", "likes": "many", "replies": []},  # likes type
                    {"id": ["x"], "text": "x", "likes": 1},  # id type
                    {"id": "br", "text": "x", "likes": 1, "replies": "none"},  # replies type
                    comment(
                        "ok",
                        "好的顶层",
                        1,
                        [reply("r1", "好的回复"), "not a reply", {"id": "r2", "text": 5}],
                    ),
                ],
            ),
            "bad_title": {"title": 42, "comments": [comment("c", "顶层", 0, [reply("r", "回复")])]},
            "g2": good_video(),
        },
    )
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["g1/gr", "mixed/r1", "bad_title/r", "g2/gr"]
    assert report.ids("train", "malformed_record") == [
        "not_dict",
        "bad_comments",
        "mixed/nt",
        "mixed/bl",
        "mixed/#2",
        "mixed/br",
        "mixed/ok/#1",
        "mixed/r2",
    ]
    assert report.ids("train", "invalid_title") == ["bad_title"]
    assert by_id(out["train"])["bad_title/r"].title == ""


def test_non_utf8_text(tmp_path):
    body = {
        "g1": good_video(),
        "v": video(
            "t",
            [
                comment(
                    "c",
                    "顶层",
                    0,
                    [reply("bytes", "PLACEHOLDER"), reply("esc", "ESCAPED"), reply("fine", "好")],
                ),
                comment("badtop", "PLACEHOLDER", 0, [reply("child", "子回复")]),
            ],
        ),
    }
    text = json.dumps(body, ensure_ascii=False)
    text = text.replace('"ESCAPED"', '"bad \\udc80 escape"')
    data = text.encode("utf-8").replace(b'"PLACEHOLDER"', b'"caf\xe9 \xff"')
    (tmp_path / "train.json").write_bytes(data)
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["g1/gr", "v/fine"]
    assert report.ids("train", "invalid_utf8") == ["v/bytes", "v/esc", "v/badtop"]
    assert report.ids("train", "ancestor_dropped") == ["v/child"]
    # The report is valid UTF-8 JSON even though it names bad text.
    json.loads(json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8"))


def test_duplicate_ids(tmp_path):
    # Duplicate keys inside one file need raw JSON text (json.dumps cannot write them).
    dup_video = json.dumps(good_video("d"), ensure_ascii=False)
    other = json.dumps(good_video("o"), ensure_ascii=False)
    comments = video(
        "t",
        [
            comment("c1", "顶层一", 0, [reply("r1", "回复一"), reply("r1", "重复回复")]),
            comment("c1", "重复顶层", 0, [reply("r9", "重复顶层的回复")]),
            comment("c2", "顶层二", 0, [reply("c1", "和顶层同id"), reply("r2", "回复二")]),
        ],
    )
    text = (
        f'{{"dup": {dup_video}, "cm": {json.dumps(comments, ensure_ascii=False)}, '
        f'"dup": {other}, "both": {json.dumps(good_video("b"), ensure_ascii=False)}}}'
    )
    (tmp_path / "train.json").write_text(text, "utf-8")
    write_json(tmp_path, "test", {"both": eval_video("x", 5)})
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["dup/dr", "cm/r1", "cm/r2"]
    assert by_id(out["train"])["cm/r1"].responses == ("回复一",)
    assert [d.dialogue_id for d in out["test"]] == ["both/xc"]  # held-out copy wins
    assert report.ids("train", "duplicate_video_id") == ["dup", "both"]
    assert report.ids("train", "duplicate_comment_id") == ["cm/r1", "cm/c1"]
    assert report.ids("train", "ancestor_dropped") == ["cm/r9"]


def test_reply_cycles_and_unknown_reply_to(tmp_path):
    replies = [
        reply("a", "甲", 0, "b"),
        reply("b", "乙", 0, "a"),
        reply("hang", "挂在环上", 0, "a"),
        reply("self", "回复自己", 0, "self"),
        reply("lost", "回复不存在的评论", 0, "nope"),
        reply("ok", "正常"),
        reply("ok2", "正常二", 0, "ok"),
    ]
    write_json(
        tmp_path,
        "train",
        {"v": video("t", [comment("c", "顶层", 0, replies)]), "g": good_video()},
    )
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["v/ok", "v/ok2", "g/gr"]
    assert report.ids("train", "reply_cycle") == ["v/a", "v/b", "v/self"]
    assert report.ids("train", "ancestor_dropped") == ["v/hang"]
    assert report.ids("train", "unknown_reply_to") == ["v/lost"]


def test_reply_to_another_thread_is_unknown(tmp_path):
    comments = [
        comment("c1", "一", 0, [reply("r1", "回复一")]),
        comment("c2", "二", 0, [reply("r2", "跨线程", 0, "r1"), reply("r3", "正常")]),
    ]
    write_json(tmp_path, "train", {"v": video("t", comments)})
    out, report = prepare(tmp_path)
    assert [d.dialogue_id for d in out["train"]] == ["v/r1", "v/r3"]
    assert report.ids("train", "unknown_reply_to") == ["v/r2"]


def test_unsafe_video_ids(tmp_path):
    unsafe = ["../escape", "a/b", "a\\b", "", "..", "x..y", "tab\tid"]
    body = {vid: good_video() for vid in unsafe}
    body["fine_id-1.2"] = good_video()
    write_json(tmp_path, "train", body)
    out, report = prepare(tmp_path)
    assert [d.video_id for d in out["train"]] == ["fine_id-1.2"]
    assert report.ids("train", "unsafe_video_id") == unsafe


def test_truncated_split_file_keeps_videos_before_the_cut(tmp_path):
    path = write_json(tmp_path, "train", {f"v{i}": good_video() for i in range(4)})
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b'"v3"') + 20])
    write_json(tmp_path, "test", {"t": eval_video("t")})
    out, report = prepare(tmp_path)
    assert [d.video_id for d in out["train"]] == ["v0", "v1", "v2"]
    assert report.ids("train", "truncated_file") == ["train.json"]
    assert "3 videos read" in skipped(report, "train")["truncated_file"]["details"]["train.json"]
    assert len(out["test"]) == 1


def test_unreadable_split_file_leaves_other_splits(tmp_path):
    (tmp_path / "val.json").write_text('["not", "an", "object"]', "utf-8")
    write_json(tmp_path, "train", {"g": good_video()})
    out, report = prepare(tmp_path)
    assert out["val"] == [] and len(out["train"]) == 1
    assert report.ids("val", "unreadable_file") == ["val.json"]


def test_stats(tmp_path):
    replies = [reply("r1", "一二三"), reply("r2", "四五", 0, "r1")]
    write_json(tmp_path, "train", {"v": video("t", [comment("c", "六", 0, replies)])})
    _, report = prepare(tmp_path)
    stats = report.to_dict()["splits"]["train"]["stats"]
    # Dialogues: (六 -> 一二三), (六, 一二三 -> 四五): 5 turns; utterances 1+3, 1+3+2 chars.
    assert stats["videos"] == 1 and stats["dialogues"] == 2 and stats["turns"] == 5
    assert stats["avg_turns_per_dialogue"] == 2.5
    assert stats["avg_utterance_chars"] == pytest.approx(10 / 5)


# ------------------------------------------------------------------------------------------
# The manual_dir check


def layout_error(path, need_videos=False):
    with pytest.raises(raw.LayoutError) as e:
        raw.check_layout(path, need_videos=need_videos)
    return str(e.value)


def test_layout_missing_dir(tmp_path):
    msg = layout_error(tmp_path / "nope")
    assert "does not exist" in msg and str(tmp_path / "nope") in msg


def test_layout_empty_dir(tmp_path):
    msg = layout_error(tmp_path)
    assert "no split file found" in msg and "the directory is empty" in msg


@pytest.mark.parametrize(
    "name, canonical",
    [("Train.json", "train.json"), ("train.JSON", "train.json"), ("valid.json", "val.json")],
)
def test_layout_misnamed_split_files(tmp_path, name, canonical):
    (tmp_path / name).write_text("{}", "utf-8")
    msg = layout_error(tmp_path)
    assert f"found {name!r}: rename it to {canonical!r}" in msg
    assert "no split file found" not in msg


def test_layout_misnamed_file_next_to_good_ones_is_an_error(tmp_path):
    write_json(tmp_path, "train", {})
    (tmp_path / "Test.json").write_text("{}", "utf-8")
    assert "rename it to 'test.json'" in layout_error(tmp_path)


def test_layout_nested_release_suggests_the_right_path(tmp_path):
    write_json(tmp_path / "tiktalk", "train", {})
    msg = layout_error(tmp_path)
    assert f"--manual_dir={tmp_path / 'tiktalk'}" in msg
    assert "found instead: tiktalk/" in msg


def test_layout_videos(tmp_path):
    write_json(tmp_path, "train", {})
    assert raw.check_layout(tmp_path, need_videos=False).videos_dir is None
    assert "videos/ is missing" in layout_error(tmp_path, need_videos=True)
    (tmp_path / "Videos").mkdir()
    assert "found 'Videos': rename it to 'videos'" in layout_error(tmp_path, need_videos=True)
    (tmp_path / "Videos").rmdir()
    (tmp_path / "123.mp4").write_bytes(b"x")
    assert "move them into" in layout_error(tmp_path, need_videos=True)
    (tmp_path / "123.mp4").unlink()
    (tmp_path / "videos" / "videos").mkdir(parents=True)
    (tmp_path / "videos" / "videos" / "1.mp4").write_bytes(b"x")
    assert "move the files up" in layout_error(tmp_path, need_videos=True)
    (tmp_path / "videos" / "1.mp4").write_bytes(b"x")
    layout = raw.check_layout(tmp_path, need_videos=True)
    assert layout.videos_dir == tmp_path / "videos"
    assert raw.index_videos(layout.videos_dir) == {"1": tmp_path / "videos" / "1.mp4"}


def test_layout_ambiguous_and_compressed(tmp_path):
    write_json(tmp_path, "train", {})
    write_jsonl(tmp_path, "train", [])
    assert "both train.json and train.jsonl" in layout_error(tmp_path)
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "test.json.gz").write_bytes(b"x")
    assert "decompress" in layout_error(tmp_path)


def test_layout_found(tmp_path):
    write_json(tmp_path, "train", {})
    write_jsonl(tmp_path, "test", [])
    (tmp_path / "knowledge.tsv").write_text("a\tb\tc\n", "utf-8")
    layout = raw.check_layout(tmp_path, need_videos=False)
    assert layout.formats == {"train": "json", "test": "jsonl"}
    assert layout.knowledge == tmp_path / "knowledge.tsv" and layout.blocklist is None
