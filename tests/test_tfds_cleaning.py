"""Text cleaning rules of the TikTalk builder, one by one (tfds_builder/tiktalk/cleaning.py)."""

import pytest

from tfds_builder.tiktalk import cleaning


@pytest.mark.parametrize(
    "text, expected",
    [
        ("@小明 你好", "你好"),
        ("你好 @小明 ", "你好"),
        ("谢谢@张三 ！", "谢谢！"),
        ("＠全角 也算", "也算"),
        ("回复 @小红: 好的", "好的"),
        ("@a @b 两个人", "两个人"),
        ("邮箱 a@b.com 不动", "邮箱 a@b.com 不动"),  # e-mail addresses are not mentions
    ],
)
def test_mentions_are_stripped(text, expected):
    assert cleaning.clean_text(text).text == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("哈哈哈哈哈哈哈哈哈哈", "哈哈哈"),
        ("哈哈哈哈", "哈哈哈"),
        ("哈哈哈", "哈哈哈"),  # already canonical
        ("哈哈", "哈哈"),  # shorter runs are left alone
        ("2333333", "2333"),
        ("啊啊啊啊啊", "啊啊啊"),
        ("呵呵呵呵呵呵呵", "呵呵呵"),
        ("666666", "666"),
        ("hahahahaha", "hahaha"),  # a two-character unit
        ("加油加油加油加油加油", "加油加油加油"),
        ("好好学习天天向上", "好好学习天天向上"),
        ("1000000元", "1000000元"),  # amounts keep their zeros
        ("笑死我了哈哈哈哈哈哈！！！！！", "笑死我了哈哈哈！！！"),
    ],
)
def test_repeats_collapse_to_canonical_length(text, expected):
    assert cleaning.clean_text(text).text == expected


def test_repeat_canonical_length_is_configurable():
    assert cleaning.clean_text("哈哈哈哈哈哈", max_repeat=2).text == "哈哈"
    assert cleaning.collapse_repeats("嘿嘿嘿嘿嘿", 1) == "嘿"


def test_bracket_emoticons_and_emoji_move_to_emoticons_in_order():
    out = cleaning.clean_text("好的[捂脸]真不错😂👍🏻[赞]")
    assert out.text == "好的真不错"
    assert out.emoticons == ("[捂脸]", "😂", "👍🏻", "[赞]")


def test_emoji_sequences_stay_one_emoticon():
    out = cleaning.clean_text("一家人👨\u200d👩\u200d👧 中国🇨🇳 第1️⃣ ❤️")
    assert out.text == "一家人 中国 第"
    assert out.emoticons == ("👨\u200d👩\u200d👧", "🇨🇳", "1️⃣", "❤️")


def test_emoticons_removed_before_collapsing_repeats():
    out = cleaning.clean_text("哈哈[捂脸]哈哈哈")
    assert out == cleaning.Cleaned("哈哈哈", ("[捂脸]",))


def test_long_brackets_are_text_not_emoticons():
    assert cleaning.clean_text("[这个不是表情包括号]").text == "[这个不是表情包括号]"


def test_whitespace_and_invisible_characters():
    assert cleaning.clean_text("  你\u200b好\t\n 世界\x00 ").text == "你好 世界"


@pytest.mark.parametrize("text", ["", "   ", "[捂脸][赞]", "😂😂", "@小明", "回复 @小明:"])
def test_empty_after_cleaning(text):
    assert cleaning.clean_text(text).text == ""


def test_invalid_unicode_detection():
    assert cleaning.has_invalid_unicode("abc\udc80")
    assert cleaning.has_invalid_unicode(b"\xff\xfe".decode("utf-8", "surrogateescape"))
    assert not cleaning.has_invalid_unicode("正常文本😂")


def test_blocklist_matches_case_insensitive_substrings():
    blocklist = cleaning.Blocklist.from_text("加微信\n\n  SPAM  \n")
    assert blocklist.terms == ("spam", "加微信")
    assert blocklist.match("快来加微信吧") == "加微信"
    assert blocklist.match("this is Spam") == "spam"
    assert blocklist.match("正常评论") is None
    assert not cleaning.Blocklist()
