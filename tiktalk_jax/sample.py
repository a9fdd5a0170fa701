"""A deterministic synthetic TikTalk release in the raw layout (see docs/architecture.md).

`python -m tiktalk_jax.sample OUT_DIR [--seed N]` writes, in about three seconds on one core:

  OUT_DIR/train.json, val.json, test.json   {video_id: {"title", "category", "comments": [...]}}
  OUT_DIR/videos/<video_id>.mp4             4 s, 10 fps, 112x112, mpeg4 + aac (16 kHz mono)
  OUT_DIR/knowledge.tsv                     C3KG style `head<TAB>relation<TAB>tail`
  OUT_DIR/sample_kinds.json                 {dialogue_id: "vision"|"audio"|"knowledge"|"text"}
  OUT_DIR/sample_captions.json              {video_id: [4 captions of colour and shape]}

Each video shows ONE large saturated shape (红色/绿色/蓝色/黄色 x 圆/方块/三角) moving and turning
on a plain grey background, with one loud clean sound: 高音 (1500 Hz tone), 低音 (200 Hz tone),
哔哔声 (880 Hz beeps, 0.15 s on / 0.15 s off) or 沙沙的噪音 (white noise). Titles and
categories never name these attributes, so only the media can tell them.

Replies come in four kinds, and each kind needs one source of information:
  vision     the context asks what is seen ("这是什么颜色的"); the reply names the colour and/or
             shape ("这个红色的圆转得好快").
  audio      the context asks what is heard; the reply names the sound ("一直是哔哔声").
  knowledge  the context mentions an event that is a head of knowledge.tsv ("我室友周末去钓鱼"
             ~ "PersonX 周末去钓鱼"); the reply starts with its xAttr tail ("自律本人了").
             Every train dialogue of this kind has a head of its own (time x activity, tails
             shared at random), so the tail can only come from the retrieved knowledge; val
             and test use only natural heads (and tails) of their own, new words made of
             characters the train tails use.
  text       the reply follows from the text alone (a question and its fitting answer, an
             agreement with the previous turn, "同问" follow-ups).
The mapping from attribute to key word is deterministic; wording varies over a few templates.

Split shape: every train reply is one dialogue (context = its ancestor chain); a train video has
a thread per kind, replies to replies and one three-deep chain. A val/test video has five
contexts whose last turn has 5 or 6 direct replies sharing one key word (the 5-reference rule):
one level-1 question per kind, plus one two-turn context ("question", "同问") of a rotating kind.
sample_kinds.json is keyed like dialogue ids: `<video_id>/<reply id>` for train and
`<video_id>/<id of the last context turn>` for val/test.

The cleaning rules get content: @mentions ("@小王 "), laughter runs (哈哈哈哈哈哈, 233333),
Douyin emoticons ([捂脸] [赞] [泣不成声]) and Unicode emoji are sprinkled over comments and a few
titles; some replies are empty after cleaning (only emoticons or mentions); some genuine replies
have likes 0; some level-1 comments have no replies.

Deliberately bad items (each in a video of its own, on top of the 40/10/10 good videos, so the
minimum counts hold whatever the builder does with them):
  train  truncated mp4        the first third of a valid file (no moov atom: undecodable).
  train  malformed record     "comments" is a string instead of a list (its mp4 is valid).
  train  reply cycle          two extra replies whose reply_to point at each other.
  train  duplicate comment id an extra reply reusing the id of another reply of that video.
  train  no audio track       GOOD data: a valid mp4 without audio; keep it with has_audio False.
  val    zero-byte mp4        an empty file.
  test   missing mp4          a record whose videos/<video_id>.mp4 does not exist.
  test   unsafe video id      a key containing "../" (no mp4 is written for it).
sample_kinds.json leaves out the malformed and unsafe records and the cycle/duplicate replies.
`write_sample` returns a summary with every video's attributes and the bad ids.
"""

from __future__ import annotations

import argparse
import fractions
import json
import os
from collections.abc import Sequence

import av
import numpy as np

KINDS = ("vision", "audio", "knowledge", "text")
CAPTIONS_FILE = "sample_captions.json"

FPS = 10
NUM_FRAMES = 40  # 4 s
FRAME_SIZE = 112
SAMPLE_RATE = 16000

# name -> (key word used in replies, RGB). Fully saturated so even random CNN features split them.
COLOURS = {
    "red": ("红色", (255, 0, 0)),
    "green": ("绿色", (0, 255, 0)),
    "blue": ("蓝色", (0, 0, 255)),
    "yellow": ("黄色", (255, 255, 0)),
}
SHAPES = {"circle": "圆", "square": "方块", "triangle": "三角"}
SOUNDS = {"high": "高音", "low": "低音", "beeps": "哔哔声", "noise": "沙沙的噪音"}
TONE_HZ = {"high": 1500.0, "low": 200.0, "beeps": 880.0}

# Captions of the picture (sample_captions.json: BLIP-2's caption stage, blip2_captions.py).
CAPTION_TEMPLATES = ("一个{c}的{s}", "{c}的{s}在动", "画面里是{c}的{s}", "视频里有个{c}{s}")

# Words that name an attribute; titles must contain none of them (tests check it).
ATTRIBUTE_WORDS = (
    "红",
    "绿",
    "蓝",
    "黄",
    "圆",
    "方块",
    "三角",
    "高音",
    "低音",
    "哔",
    "噪音",
    "沙沙",
)

TITLES = (
    "今天的日常",
    "随手拍一段",
    "周末快乐",
    "猜猜这是什么",
    "无聊做的小动画",
    "新手第一次发视频",
    "大家觉得怎么样",
    "晚上好呀",
    "记录一下",
    "越看越上头",
    "下班路上拍的",
    "这个你们见过吗",
)
CATEGORIES = ("生活", "萌宠", "音乐", "游戏", "美食", "搞笑", "旅行", "科技")

# Level-1 questions that ask about the picture, by what they ask for, and reply templates.
VISION_QUESTIONS = {
    "colour": ("这是什么颜色的", "这个颜色叫啥", "中间那个是什么颜色"),
    "shape": ("这是什么形状", "这个是什么图形啊", "中间那个是啥形状"),
    "both": ("视频里转的是啥", "我看到的是什么东西", "有人看清这是啥了吗"),
}
VISION_ANSWERS = {
    "colour": (
        "是{c}的",
        "{c}啊",
        "明显是{c}",
        "{c}，很鲜艳",
        "这不就是{c}嘛",
        "我看是{c}",
        "{c}的好看",
    ),
    "shape": (
        "是个{s}",
        "{s}啊",
        "一个{s}在动",
        "明显是{s}",
        "这不就是{s}嘛",
        "我看是{s}",
        "就是{s}",
    ),
    "both": (
        "一个{c}的{s}",
        "这个{c}的{s}转得好快",
        "{c}{s}啊",
        "是{c}的{s}",
        "我看到一个{c}{s}",
        "{c}的{s}在动",
        "明显是{c}{s}",
    ),
}
AUDIO_QUESTIONS = ("这是什么声音", "背景音是啥", "这声音好上头，是什么", "有人听出来这是什么声吗")
AUDIO_ANSWERS = (
    "是{w}",
    "一直是{w}",
    "{w}好魔性",
    "听到了{w}",
    "这{w}太洗脑了",
    "全是{w}",
    "{w}，耳朵受不了",
)

# Train knowledge. A model that sees an event with the same tail many times learns event -> tail
# by heart and never reads the knowledge (measured: docs/ablation.md). So every train dialogue of
# the knowledge kind talks about a head of its own, made of a time and an activity
# ("周末去钓鱼" ~ "PersonX 周末去钓鱼"), and the heads share these (xAttr, xWant, xEffect) tails
# at random: the tail can only come from the retrieved knowledge. Val and test talk only about
# natural heads of their own (below) whose tails are new words made of characters the train tails
# use (`_check_knowledge`), so the output embeddings they need are trained.
KNOWLEDGE_TRAIN_TAILS = (
    ("自律", "保持身材", "身体变好"),
    ("贪玩", "通关", "第二天犯困"),
    ("大方", "帮助别人", "自己没钱花"),
    ("能吃", "再来一碗", "撑着了"),
    ("孝顺", "多陪陪家人", "妈妈很开心"),
    ("节俭", "存钱", "攒下一笔钱"),
    ("热心", "帮陌生人挡雨", "自己淋湿了"),
    ("勇敢", "登上山顶", "累得不行"),
    ("浪漫", "让她开心", "女朋友很感动"),
    ("懒", "继续躺着", "颈椎疼"),
    ("爱干净", "住得舒服", "房间很整洁"),
    ("幽默", "逗大家开心", "大家都笑了"),
    ("勤奋", "开演奏会", "琴技进步"),
    ("有耐心", "喝到奶茶", "腿酸"),
    ("拖延", "及格就行", "很焦虑"),
    ("爱猫", "再养一只", "家里都是猫毛"),
    ("善良", "给狗找个家", "狗都认识他"),
    ("耍滑", "不被发现", "被老师批评"),
    ("博学", "再读几本", "知识变多"),
    ("体贴", "让大家吃好", "大家很感谢"),
    ("固执", "吵赢", "朋友变少"),
    ("胆小", "离虫子远点", "吓到别人"),
    ("马虎", "找人开门", "在门口等"),
    ("自恋", "发朋友圈", "手机里全是照片"),
    ("讲究", "买到好东西", "花了很多钱"),
    ("天真", "相信别人", "被骗了"),
    ("勤快", "厨房干净", "碗洗好了"),
    ("豪爽", "请大家吃饭", "钱包变瘪"),
    ("高冷", "一个人待着", "大家很尴尬"),
    ("靠谱", "把事办好", "大家信任他"),
    ("邋遢", "再躺一天", "头发很油"),
    ("感性", "再看一遍", "眼睛哭肿了"),
    ("文艺", "看日出", "吹了一夜风"),
    ("细心", "送生日礼物", "朋友很惊喜"),
    ("活泼", "多唱几首", "嗓子哑了"),
    ("规律", "早睡早起", "精神很好"),
    ("老实", "排到自己", "又等了很久"),
    ("坚强", "让家人过好", "很辛苦"),
    ("小气", "让别人难堪", "没人理他"),
    ("聪明", "保持第一", "拿了奖学金"),
    ("友好", "帮人找到路", "自己迟到了"),
    ("倒霉", "修好手机", "很心疼"),
    ("有理想", "考医学院", "一直在努力"),
    ("乐观", "开心过每一天", "感染了别人"),
)
_TIMES = ("每天", "周末", "半夜", "一大早", "下班后", "放学后", "每周三", "过年时")
_ACTIVITIES = (
    "去钓鱼", "打游戏", "练书法", "做蛋糕", "学吉他", "追剧", "逛超市", "去爬山", "写代码",
    "背古诗", "打篮球", "去游泳", "遛狗", "种菜", "拼乐高", "看小说", "跳广场舞", "练拳击",
    "画油画", "去唱歌", "修自行车", "做手工", "骑车兜风", "喂鸽子", "练瑜伽", "研究菜谱",
    "学日语", "去露营", "拍星空", "织毛衣",
)  # fmt: skip
# Heads per train video: one level-1 comment each, every video's five knowledge dialogues differ.
KNOWLEDGE_PER_TRAIN_VIDEO = 5


def _train_heads() -> tuple[tuple[str, str, str, str, str], ...]:
    """(event, head, xAttr, xWant, xEffect) for every time x activity, in a fixed shuffled
    order, the tails cycling through KNOWLEDGE_TRAIN_TAILS (so each tail has several heads)."""
    rng = np.random.default_rng(20231112)  # fixed: the heads do not depend on the sample seed
    events = [t + a for t in _TIMES for a in _ACTIVITIES]
    events = [events[i] for i in rng.permutation(len(events))]
    tails = KNOWLEDGE_TRAIN_TAILS
    order = rng.permutation(len(events))
    return tuple((e, f"PersonX {e}", *tails[int(k) % len(tails)]) for e, k in zip(events, order))


# 44 train videos make dialogues (40 good + 4 bad ones whose records parse), 5 heads each.
KNOWLEDGE_TRAIN = _train_heads()[: 44 * KNOWLEDGE_PER_TRAIN_VIDEO]
KNOWLEDGE_VAL_ONLY = (
    ("过马路要看三遍红绿灯", "PersonX 看三遍红绿灯", "小心", "平安到家", "走得很慢"),
    ("丢了钱包还在哼歌", "PersonX 丢钱包还哼歌", "乐天", "不想烦心事", "钱包没找回来"),
    ("一眼就看穿了魔术", "PersonX 看穿魔术", "高明", "揭穿魔术", "魔术师很尴尬"),
    ("周末从早玩到晚", "PersonX 周末一直玩", "爱玩", "多玩几天", "作业没写"),
    ("每天早起背单词", "PersonX 早起背单词", "好学", "考过四级", "词汇量变大"),
    ("帮同学搬了一整天家", "PersonX 帮同学搬家", "真心", "帮同学", "累得腰疼"),
    ("发现邻居换了发型", "PersonX 发现邻居换发型", "心细", "夸邻居", "邻居很开心"),
    ("把中的奖金分给了大家", "PersonX 分奖金", "大气", "让大家高兴", "大家都感谢他"),
)
KNOWLEDGE_TEST_ONLY = (
    ("敢跟老虎合影", "PersonX 跟老虎合影", "大胆", "发到网上", "被老虎吓到"),
    ("一个人把新房装修好了", "PersonX 自己装修新房", "能干", "住进新家", "省了很多钱"),
    ("半夜偷吃了三包辣条", "PersonX 偷吃辣条", "贪吃", "再买几包", "肚子疼"),
    ("边打工边读完了大学", "PersonX 打工读大学", "自强", "找份好工作", "拿到了毕业证"),
    ("一件衣服穿了十年", "PersonX 衣服穿十年", "勤俭", "省钱", "衣服很旧"),
    ("每个周末都回老家陪爷爷", "PersonX 回老家陪爷爷", "孝心", "爷爷长寿", "爷爷很高兴"),
    ("买东西前先比较十家店", "PersonX 比较十家店", "理性", "买到划算的", "省了一笔钱"),
    ("给全班买了冰淇淋", "PersonX 请全班吃冰淇淋", "豪气", "大家开心", "零花钱没了"),
)
# Heads no dialogue mentions: retrieval has to rank them below the right one.
KNOWLEDGE_DISTRACTORS = (
    ("", "PersonX 去看电影", "悠闲", "买爆米花", "看哭了"),
    ("", "PersonX 学开车", "认真", "拿到驾照", "练得很累"),
    ("", "PersonX 搬家", "忙碌", "找个好房子", "累坏了"),
    ("", "PersonX 种花", "有情调", "看花开", "阳台变美"),
    ("", "PersonX 丢了钥匙", "粗心", "找回钥匙", "进不了门"),
    ("", "PersonX 过生日", "开心", "许愿", "收到礼物"),
)
_O_REACT = ("佩服", "羡慕", "心疼", "好笑", "感动", "惊讶")
KNOWLEDGE_SUBJECTS = ("我室友", "我朋友", "我哥", "我同事", "隔壁小哥", "我表弟")
# Knowledge replies lead with the tail: wherever the model reads it from, it writes it first, so
# the word to copy sits at a fixed place in both the knowledge and the reply.
KNOWLEDGE_ANSWERS = (
    "{t}本人了",
    "{t}啊",
    "{t}，没毛病",
    "{t}得很",
    "{t}，太真实了",
    "{t}到家了",
    "{t}，服了",
)
KNOWLEDGE_FOLLOW_UPS = (
    "{t}，真的",
    "{t}是真的",
    "{t}，千真万确",
    "{t}，不骗你",
    "{t}，一直都是",
    "{t}，他就这样",
)

# (question variants, key phrase of the fitting answer).
TEXT_ITEMS = (
    (("今天好冷啊", "冻死我了"), "多穿点衣服"),
    (("好困啊", "困死了"), "快去睡觉"),
    (("外面下雨了", "又下雨了"), "记得带伞"),
    (("早上好", "大家早"), "早安"),
    (("我饿了", "好饿啊"), "快去吃饭"),
    (("明天考试", "要考试了好慌"), "考试加油"),
    (("今天我生日", "今天是我生日"), "生日快乐"),
    (("周末去哪玩", "周末干嘛去"), "去公园"),
    (("晚上吃什么", "今晚吃啥"), "吃火锅"),
    (("你们喜欢夏天吗", "有人喜欢夏天吗"), "喜欢夏天"),
    (("我失恋了", "分手了好难过"), "抱抱你"),
    (("晚安", "睡了睡了"), "晚安好梦"),
)
TEXT_ANSWERS = ("{k}", "{k}吧", "{k}呀", "那就{k}", "{k}就对了", "嗯嗯，{k}", "必须{k}")
TEXT_AGREE = (
    "同意，{k}",
    "对对对，{k}",
    "{k}+1",
    "说得对，{k}",
    "我也觉得{k}",
    "赞同，{k}",
    "没错，{k}",
)
TEXT_CHAIN_END = ("握个手", "英雄所见略同", "击掌")

# The second turn of two-turn contexts, by the kind of the first turn.
SAME_QUESTION = {
    "vision": ("同问", "我也没看清", "同问同问"),
    "audio": ("我也想知道", "同问", "没听出来"),
    "knowledge": ("真的假的", "真的吗"),
}

# Decorations the builder's cleaning must remove again.
_MENTIONS = ("@小王 ", "@阿杰 ", "@momo ")
_EMOTICONS = ("[捂脸]", "[赞]", "[泣不成声]", "[666]", "😂", "👍", "🐱", "❤️")
_LAUGHS = ("哈哈哈哈哈哈", "233333", "哈哈哈哈哈哈哈哈")
_EMPTY_AFTER_CLEANING = ("[赞][赞][赞]", "@小王 @阿杰 ", "😂😂😂", "[捂脸]", "👍")
_LONELY_TOP = ("第一", "来了来了", "前排", "打卡")

# mpeg4 (MPEG-4 Part 2) is FFmpeg's own encoder, present in every build and bit-exact run to run.
# libx264 is not: in PyAV's bundled build its output bytes (and decoded pixels) vary between runs
# of the same process even with one thread, which would break the byte-identical promise.
_VIDEO_CODEC = "mpeg4"
_VIDEO_BIT_RATE = 400_000  # about 20 kB a second at 112x112; the default 200k smears edges


def write_video(
    path: str,
    frames: np.ndarray,
    fps: int,
    audio: np.ndarray | None,
    sample_rate: int = 16000,
) -> None:
    """Writes an mp4 (mpeg4 video, aac mono audio) with PyAV; the same input gives the same bytes.

    Args:
      path: output file, usually `<dir>/<video_id>.mp4`.
      frames: uint8[N, H, W, 3] RGB frames; H and W must be even (yuv420p).
      fps: frames per second.
      audio: float32[S] mono samples in [-1, 1], or None for a file with no audio stream.
      sample_rate: audio sample rate in Hz.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8[N, H, W, 3], got {frames.dtype}{list(frames.shape)}"
        )
    n, h, w, _ = frames.shape
    if n == 0 or h % 2 or w % 2:
        raise ValueError(f"need at least one frame and even H, W; got {list(frames.shape)}")
    with av.open(path, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        container.flags |= av.container.Flags.bitexact.value
        vstream = container.add_stream(_VIDEO_CODEC, rate=fps)
        vstream.width, vstream.height = w, h
        vstream.pix_fmt = "yuv420p"
        vstream.bit_rate = _VIDEO_BIT_RATE
        vstream.codec_context.thread_count = 1
        vstream.codec_context.flags |= av.codec.context.Flags.bitexact.value
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate, layout="mono")
            astream.codec_context.flags |= av.codec.context.Flags.bitexact.value
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            frame.time_base = fractions.Fraction(1, fps)
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
            chunk = 1024  # the aac frame size; PyAV re-chunks anyway but this keeps pts simple
            for start in range(0, len(samples), chunk):
                block = samples[start : start + chunk][None, :]
                aframe = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(block), format="flt", layout="mono"
                )
                aframe.sample_rate = sample_rate
                aframe.pts = start
                aframe.time_base = fractions.Fraction(1, sample_rate)
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)


def render_frames(colour: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """Draws one large shape moving on a circle and turning, on a plain grey background.

    Returns:
      uint8[NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3].
    """
    size = FRAME_SIZE
    grey = int(rng.integers(150, 215))
    radius = size * rng.uniform(0.25, 0.3)  # a shape covers a fifth to a quarter of the frame
    orbit = size * rng.uniform(0.05, 0.09)  # orbit + 1.3 radius < size / 2: always in frame
    phase, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.35) * rng.choice([-1, 1])
    turn, spin = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * rng.choice([-1, 1])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    rgb = np.array(COLOURS[colour][1], np.uint8)
    frames = np.full((NUM_FRAMES, size, size, 3), grey, np.uint8)
    for i in range(NUM_FRAMES):
        cx = size / 2 + orbit * np.cos(phase + speed * i)
        cy = size / 2 + orbit * np.sin(phase + speed * i)
        if shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            n, r = (4, radius * 1.1) if shape == "square" else (3, radius * 1.3)
            angles = turn + spin * i + 2 * np.pi * np.arange(n) / n
            vx, vy = cx + r * np.cos(angles), cy + r * np.sin(angles)
            # Inside a convex polygon with counter-clockwise vertices: left of every edge.
            inside = np.ones((size, size), bool)
            for k in range(n):
                ex, ey = vx[(k + 1) % n] - vx[k], vy[(k + 1) % n] - vy[k]
                inside &= ex * (yy - vy[k]) - ey * (xx - vx[k]) >= 0
        frames[i][inside] = rgb
    return frames


def render_audio(sound: str, rng: np.random.Generator) -> np.ndarray:
    """A loud, clean sound of the video's length.

    Returns:
      float32[NUM_FRAMES / FPS * SAMPLE_RATE] in [-1, 1].
    """
    n = NUM_FRAMES * SAMPLE_RATE // FPS
    t = np.arange(n) / SAMPLE_RATE
    if sound == "noise":
        return np.clip(rng.normal(0.0, 0.25, n), -1, 1).astype(np.float32)
    wave = 0.5 * np.sin(2 * np.pi * TONE_HZ[sound] * t + rng.uniform(0, 2 * np.pi))
    if sound == "beeps":
        wave *= (t % 0.3) < 0.15
    return wave.astype(np.float32)


class _Comments:
    """Builds one video's comment list and records the kind of each dialogue it makes."""

    def __init__(self, video_id: str, rng: np.random.Generator, next_id, kinds: dict):
        self.video_id, self.rng, self.next_id, self.kinds = video_id, rng, next_id, kinds
        self.comments: list[dict] = []

    def decorate(self, text: str, p: float = 0.2) -> str:
        """Adds a mention, emoticon or laughter run with probability `p`; cleaning undoes it."""
        if self.rng.random() >= p:
            return text
        choice = self.rng.integers(3)
        if choice == 0:
            return str(self.rng.choice(_MENTIONS)) + text
        if choice == 1:
            return text + str(self.rng.choice(_EMOTICONS))
        return text + str(self.rng.choice(_LAUGHS))

    def top(self, text: str) -> dict:
        comment = {
            "id": self.next_id(),
            "text": self.decorate(text),
            "likes": int(self.rng.integers(20, 3000)),
            "replies": [],
        }
        self.comments.append(comment)
        return comment

    def reply(
        self,
        top: dict,
        text: str,
        to: dict | None = None,
        kind: str | None = None,
        likes: int | None = None,
        decorate: bool = True,
    ) -> dict:
        """Adds a reply under `top` answering `to` (None: the level-1 comment).

        `kind` set: the reply is a train dialogue of that kind.
        """
        reply = {
            "id": self.next_id(),
            "text": self.decorate(text) if decorate else text,
            "likes": int(self.rng.integers(1, 300)) if likes is None else likes,
            "reply_to": None if to is None else to["id"],
        }
        top["replies"].append(reply)
        if kind is not None:
            self.kinds[f"{self.video_id}/{reply['id']}"] = kind
        return reply

    def pick(self, options: Sequence[str], k: int) -> list[str]:
        idx = self.rng.choice(len(options), size=k, replace=False)
        return [options[i] for i in idx]


def _question(kind: str, video: dict, know: tuple, rng: np.random.Generator):
    """A kind's opening turn and the reply templates (already filled) that fit it.

    Returns:
      (question, answers, follow_up_answers): `follow_up_answers` fit the two-turn context
      (question, SAME_QUESTION[kind]) for vision/audio/knowledge, and (question, answer) for text.
    """
    if kind == "vision":
        ask = str(rng.choice(list(VISION_QUESTIONS)))
        c, s = COLOURS[video["colour"]][0], SHAPES[video["shape"]]
        answers = [a.format(c=c, s=s) for a in VISION_ANSWERS[ask]]
        return str(rng.choice(VISION_QUESTIONS[ask])), answers, answers
    if kind == "audio":
        w = SOUNDS[video["sound"]]
        answers = [a.format(w=w) for a in AUDIO_ANSWERS]
        return str(rng.choice(AUDIO_QUESTIONS)), answers, answers
    if kind == "knowledge":
        event, _, tail = know[:3]
        question = str(rng.choice(KNOWLEDGE_SUBJECTS)) + event
        answers = [a.format(t=tail) for a in KNOWLEDGE_ANSWERS]
        return question, answers, [a.format(t=tail) for a in KNOWLEDGE_FOLLOW_UPS]
    questions, key = TEXT_ITEMS[int(rng.integers(len(TEXT_ITEMS)))]
    answers = [a.format(k=key) for a in TEXT_ANSWERS]
    return str(rng.choice(questions)), answers, [a.format(k=key) for a in TEXT_AGREE]


def _train_comments(c: _Comments, video: dict, knows: Sequence[tuple]) -> None:
    """One thread per kind, 6 dialogues each: vision/audio get 5 direct answers, a "同问"-style
    turn (a text dialogue) and an answer to that; text gets a three-deep chain (answer,
    agreement, "握个手"); knowledge gets one level-1 comment per head of `knows`, each with one
    answer, and the first also the "同问" turn and its answer."""
    kinds = [k for k in KINDS if video["has_audio"] or k != "audio"]
    for kind in kinds:
        for i, know in enumerate(knows if kind == "knowledge" else knows[:1]):
            question, answers, follow = _question(kind, video, know, c.rng)
            top = c.top(question)
            if kind == "text":
                first = c.reply(top, str(c.rng.choice(answers)), kind=kind)
                agree = c.reply(top, c.pick(follow, 1)[0], to=first, kind=kind)
                c.reply(top, str(c.rng.choice(TEXT_CHAIN_END)), to=agree, kind=kind)
            else:
                for text in c.pick(answers, 1 if kind == "knowledge" else 5):
                    c.reply(top, text, kind=kind)
                if i == 0:
                    same = c.reply(top, str(c.rng.choice(SAME_QUESTION[kind])), kind="text")
                    c.reply(top, c.pick(follow, 1)[0], to=same, kind=kind)
            if c.rng.random() < 0.2:  # a genuine answer nobody liked
                c.reply(top, str(c.rng.choice(answers)), kind=kind, likes=0)
            if c.rng.random() < 0.15:  # nothing left after cleaning: no dialogue
                c.reply(top, str(c.rng.choice(_EMPTY_AFTER_CLEANING)), decorate=False)
    if c.rng.random() < 0.3:
        c.top(str(c.rng.choice(_LONELY_TOP)))


def _eval_context(c: _Comments, top: dict, to: dict | None, answers: list[str], kind: str):
    """5 or 6 direct replies sharing one key word, sometimes a likes-0 or empty one on top."""
    for text in c.pick(answers, int(c.rng.integers(5, 7))):
        c.reply(top, text, to=to)
    if c.rng.random() < 0.2:
        c.reply(top, str(c.rng.choice(answers)), to=to, likes=0)
    if c.rng.random() < 0.2:
        c.reply(top, str(c.rng.choice(_EMPTY_AFTER_CLEANING)), to=to, decorate=False)
    last = top if to is None else to
    c.kinds[f"{c.video_id}/{last['id']}"] = kind


def _eval_comments(c: _Comments, video: dict, knows: list[tuple], deep_kind: str) -> None:
    """Four one-turn contexts (one per kind) and one two-turn context of `deep_kind`."""
    for kind in KINDS:
        question, answers, _ = _question(kind, video, knows[0], c.rng)
        top = c.top(question)
        _eval_context(c, top, None, answers, kind)
    question, answers, follow = _question(deep_kind, video, knows[1], c.rng)
    top = c.top(question)
    if deep_kind == "text":
        second = c.reply(top, str(c.rng.choice(answers)))
    else:
        second = c.reply(top, str(c.rng.choice(SAME_QUESTION[deep_kind])))
    _eval_context(c, top, second, follow, deep_kind)
    if c.rng.random() < 0.3:
        c.top(str(c.rng.choice(_LONELY_TOP)))


def write_knowledge(path: str, rng: np.random.Generator) -> int:
    """Writes knowledge.tsv (header `head<TAB>relation<TAB>tail`); returns the number of rows."""
    rows = []
    entries = KNOWLEDGE_TRAIN + KNOWLEDGE_VAL_ONLY + KNOWLEDGE_TEST_ONLY + KNOWLEDGE_DISTRACTORS
    for _, head, attr, want, effect in entries:
        rows += [(head, "xAttr", attr), (head, "xWant", want), (head, "xEffect", effect)]
        rows.append((head, "oReact", str(rng.choice(_O_REACT))))
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("head\trelation\ttail\n")
        f.writelines(f"{h}\t{r}\t{t}\n" for h, r, t in rows)
    return len(rows)


# The bad items, by split; each is a video of its own (see the module docstring).
_BAD = {
    "train": (
        "no_audio",
        "truncated_mp4",
        "malformed_record",
        "reply_cycle",
        "duplicate_comment_id",
    ),
    "val": ("zero_byte_mp4",),
    "test": ("missing_mp4", "unsafe_video_id"),
}
_GOOD_VIDEOS = {"train": 40, "val": 10, "test": 10}
_EVAL_ONLY_HEADS = {"val": KNOWLEDGE_VAL_ONLY, "test": KNOWLEDGE_TEST_ONLY}


def _balanced(options: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """`n` values cycling through `options`, shuffled: every value appears about equally often."""
    return [str(v) for v in rng.permutation(np.resize(np.array(options), n))]


def _eval_knowledge(n: int, deep: list[str], split: str, rng) -> list[tuple[tuple, tuple]]:
    """(one-turn head, two-turn head) per good eval video: every knowledge context of val/test
    talks about a head only that split has, each head about equally often."""
    slots = n + deep.count("knowledge")
    only = _EVAL_ONLY_HEADS[split]
    heads = [only[int(i)] for i in rng.permutation(np.resize(np.arange(len(only)), slots))]
    out, extra = [], n
    for i in range(n):
        second = heads[i]
        if deep[i] == "knowledge":
            second, extra = heads[extra], extra + 1
        out.append((heads[i], second))
    return out


def _check_knowledge() -> None:
    """The sample's promises about knowledge: train tails are distinct and none contains another
    (a reply names one tail), and every character of a val/test tail occurs in a train tail."""
    train_tails = [t[0] for t in KNOWLEDGE_TRAIN_TAILS]
    seen = set("".join(train_tails))
    all_tails = train_tails + [e[2] for e in KNOWLEDGE_VAL_ONLY + KNOWLEDGE_TEST_ONLY]
    for i, a in enumerate(all_tails):
        for b in all_tails[i + 1 :]:
            if a in b or b in a:
                raise ValueError(f"knowledge tails {a!r} and {b!r} overlap")
    for entry in KNOWLEDGE_VAL_ONLY + KNOWLEDGE_TEST_ONLY:
        if set(entry[2]) - seen:
            raise ValueError(f"eval tail {entry[2]!r} uses characters no train tail has")


def _digits(rng: np.random.Generator, taken: set[str]) -> str:
    """A fresh 19-digit id like Douyin's (6.9e18 .. 7.3e18)."""
    while True:
        value = str(int(rng.integers(6_900_000_000_000_000_000, 7_300_000_000_000_000_000)))
        if value not in taken:
            taken.add(value)
            return value


def _plan_videos(rng: np.random.Generator) -> list[dict]:
    """Every video of the release: split, id, attributes, the bad item it carries (or None)."""
    taken: set[str] = set()
    videos = []
    for split, n in _GOOD_VIDEOS.items():
        colours = _balanced(list(COLOURS), n, rng)
        shapes = _balanced(list(SHAPES), n, rng)
        sounds = _balanced(list(SOUNDS), n, rng)
        for i in range(n):
            videos.append(
                dict(split=split, colour=colours[i], shape=shapes[i], sound=sounds[i], bad=None)
            )
        for bad in _BAD[split]:
            videos.append(
                dict(
                    split=split,
                    colour=str(rng.choice(list(COLOURS))),
                    shape=str(rng.choice(list(SHAPES))),
                    sound=str(rng.choice(list(SOUNDS))),
                    bad=bad,
                )
            )
    for video in videos:
        video["id"] = _digits(rng, taken)
        if video["bad"] == "unsafe_video_id":
            video["id"] = "../" + video["id"]
        video["has_audio"] = video["bad"] != "no_audio"
        video["title"] = str(rng.choice(TITLES))
        if rng.random() < 0.15:  # titles get cleaned too
            video["title"] += str(rng.choice(_EMOTICONS))
        video["category"] = str(rng.choice(CATEGORIES))
    return videos


def _inject_bad_comments(comments: list[dict], bad: str, next_id) -> None:
    top = comments[0]
    if bad == "reply_cycle":
        a, b = next_id(), next_id()
        top["replies"] += [
            {"id": a, "text": "你说的是哪个", "likes": 3, "reply_to": b},
            {"id": b, "text": "我说的就是你说的那个", "likes": 2, "reply_to": a},
        ]
    elif bad == "duplicate_comment_id":
        dup = comments[1]["replies"][0]["id"]
        top["replies"].append(
            {"id": dup, "text": "这条评论的id重复了", "likes": 5, "reply_to": None}
        )


def _count(records: dict, kinds: dict, videos: list[dict], split: str) -> dict:
    """Dialogues (train) or 5-reference contexts (val/test) per kind, over the good videos only
    (bad None or no_audio): what the builder must produce whatever it does with the bad ones."""
    good = [v["id"] for v in videos if v["split"] == split and v["bad"] in (None, "no_audio")]
    per_kind = dict.fromkeys(KINDS, 0)
    for vid in good:
        if split == "train":
            for top in records[vid]["comments"]:
                for r in top["replies"]:
                    kind = kinds.get(f"{vid}/{r['id']}")
                    if kind is not None and r["likes"] > 0:
                        per_kind[kind] += 1
        else:
            for key, kind in kinds.items():
                if key.startswith(vid + "/"):
                    per_kind[kind] += 1
    total = "dialogues" if split == "train" else "contexts"
    return {
        "videos": len(records),
        "good_videos": len(good),
        total: sum(per_kind.values()),
        "kinds": per_kind,
    }


def write_sample(out_dir: str, *, seed: int = 0) -> dict:
    """Writes the synthetic release into `out_dir` (created if needed).

    Args:
      out_dir: the manual dir of the raw layout.
      seed: the same seed gives byte-identical files.

    Returns:
      A summary: counts per split and kind over the good videos, every video's attributes
      (`videos[video_id]` = split, colour, shape, sound, has_audio, bad), the bad items
      (`bad[reason]` = video id) and the knowledge heads only val or test have.
    """
    _check_knowledge()
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    videos = _plan_videos(rng)
    base = int(rng.integers(7_000_000_000_000_000_000, 7_100_000_000_000_000_000))
    counter = iter(range(1_000_000))

    def next_id() -> str:
        return str(base + 7919 * next(counter))  # unique, digit-only, and not sequential-looking

    kinds: dict[str, str] = {}
    records: dict[str, dict] = {"train": {}, "val": {}, "test": {}}
    # Five heads per train video that makes dialogues (the malformed record makes none).
    per_video = KNOWLEDGE_PER_TRAIN_VIDEO
    train_heads = iter(range(0, len(KNOWLEDGE_TRAIN), per_video))
    for split in ("val", "test"):
        split_videos = [v for v in videos if v["split"] == split]
        n = _GOOD_VIDEOS[split]
        deep = [KINDS[i % len(KINDS)] for i in range(len(split_videos))]
        knows = _eval_knowledge(n, deep[:n], split, rng)
        only = _EVAL_ONLY_HEADS[split]
        for _ in split_videos[n:]:
            pair = rng.integers(len(only), size=2)
            knows.append((only[pair[0]], only[pair[1]]))
        for video, know, deep_kind in zip(split_videos, knows, deep):
            video["knowledge"] = know
            video["deep_kind"] = deep_kind
    for video in videos:
        vid, split = video["id"], video["split"]
        # Records that the builder must reject record no kinds: they make no dialogues.
        keep_kinds = video["bad"] not in ("malformed_record", "unsafe_video_id")
        c = _Comments(vid, rng, next_id, kinds if keep_kinds else {})
        if split == "train":
            start = next(train_heads) if video["bad"] != "malformed_record" else 0
            _train_comments(c, video, KNOWLEDGE_TRAIN[start : start + per_video])
        else:
            _eval_comments(c, video, list(video["knowledge"]), video["deep_kind"])
        _inject_bad_comments(c.comments, video["bad"], next_id)
        record = {"title": video["title"], "category": video["category"], "comments": c.comments}
        if video["bad"] == "malformed_record":
            record["comments"] = "评论加载失败"
        records[split][vid] = record

    for split, split_records in records.items():
        _write_json(os.path.join(out_dir, f"{split}.json"), split_records)
    _write_json(os.path.join(out_dir, "sample_kinds.json"), kinds)
    _write_json(os.path.join(out_dir, CAPTIONS_FILE), captions(videos))
    n_rows = write_knowledge(os.path.join(out_dir, "knowledge.tsv"), rng)

    for i, video in enumerate(videos):
        if video["bad"] in ("missing_mp4", "unsafe_video_id"):
            continue
        path = os.path.join(out_dir, "videos", f"{video['id']}.mp4")
        if video["bad"] == "zero_byte_mp4":
            open(path, "wb").close()
            continue
        # A generator per video: its pixels and samples do not depend on the comment text.
        media_rng = np.random.default_rng([seed, i])
        frames = render_frames(video["colour"], video["shape"], media_rng)
        audio = render_audio(video["sound"], media_rng) if video["has_audio"] else None
        write_video(path, frames, FPS, audio, SAMPLE_RATE)
        if video["bad"] == "truncated_mp4":
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 3])

    attrs = ("split", "colour", "shape", "sound", "has_audio", "bad")
    return {
        "out_dir": out_dir,
        "seed": seed,
        "splits": {s: _count(records[s], kinds, videos, s) for s in records},
        "knowledge_rows": n_rows,
        "val_only_heads": [k[1] for k in KNOWLEDGE_VAL_ONLY],
        "test_only_heads": [k[1] for k in KNOWLEDGE_TEST_ONLY],
        "bad": {v["bad"]: v["id"] for v in videos if v["bad"] is not None},
        "videos": {v["id"]: {a: v[a] for a in attrs} for v in videos},
    }


def captions(videos: Sequence[dict]) -> dict[str, list[str]]:
    """Every video's captions (what the picture shows: colour and shape; no sound), by id."""
    out = {}
    for video in videos:
        c, s = COLOURS[video["colour"]][0], SHAPES[video["shape"]]
        out[video["id"]] = [t.format(c=c, s=s) for t in CAPTION_TEMPLATES]
    return out


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where to write the release (the builder's manual dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_sample(args.out_dir, seed=args.seed)
    for split, counts in summary["splits"].items():
        print(f"{split}: {json.dumps(counts, ensure_ascii=False)}")
    print(f"knowledge.tsv rows: {summary['knowledge_rows']}")
    print(f"bad items: {json.dumps(summary['bad'])}")
    return summary


if __name__ == "__main__":
    main()
