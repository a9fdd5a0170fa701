"""Tiny raw releases for tests: comment-tree helpers, split files and short videos.

Used by the builder tests and to write `dummy_data/`; other tests (e.g. the input pipeline's)
can use it to make a release of a few records without the full sample generator.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def reply(rid: str, text: str, likes: int = 0, reply_to: str | None = None) -> dict[str, Any]:
    return {"id": rid, "text": text, "likes": likes, "reply_to": reply_to}


def comment(cid: str, text: str, likes: int = 0, replies: Sequence[dict] = ()) -> dict[str, Any]:
    return {"id": cid, "text": text, "likes": likes, "replies": list(replies)}


def video(title: str, comments: Sequence[dict], category: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"title": title, "comments": list(comments)}
    if category is not None:
        out["category"] = category
    return out


def eval_video(prefix: str, n_replies: int = 6, title: str = "测试视频") -> dict[str, Any]:
    """A val/test video whose level-1 comment has `n_replies` direct replies (likes = index)."""
    replies = [reply(f"{prefix}r{i}", f"回复{prefix}{i}", likes=i) for i in range(n_replies)]
    return video(title, [comment(f"{prefix}c", f"评论{prefix}", 1, replies)])


def write_json(root: str | pathlib.Path, split: str, videos: Mapping[str, Any]) -> pathlib.Path:
    """Writes `<root>/<split>.json` (a JSON object keyed by video id)."""
    path = pathlib.Path(root) / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(videos), ensure_ascii=False), "utf-8")
    return path


def write_jsonl(
    root: str | pathlib.Path, split: str, lines: Sequence[Mapping[str, Any] | bytes | str]
) -> pathlib.Path:
    """Writes `<root>/<split>.jsonl`; dict lines are JSON-encoded, bytes/str written as-is."""
    path = pathlib.Path(root) / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for line in lines:
        if isinstance(line, Mapping):
            line = json.dumps(dict(line), ensure_ascii=False)
        out.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def dialogue_line(
    did: str, video_id: str, context: Sequence[str], responses: Sequence[str], title: str = "标题"
) -> dict[str, Any]:
    return {
        "dialogue_id": did,
        "video_id": video_id,
        "title": title,
        "context": list(context),
        "responses": list(responses),
    }


def write_tiny_video(
    path: str | pathlib.Path,
    seconds: float = 2.0,
    fps: int = 10,
    height: int = 32,
    width: int = 32,
    audio: bool = True,
    seed: int = 0,
) -> pathlib.Path:
    """A short mp4: a coloured square moving over a flat background, and a 440 Hz tone."""
    from tiktalk_jax.sample import write_video

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * fps))
    frames = np.zeros([n, height, width, 3], np.uint8)
    frames[:] = rng.integers(0, 255, 3, dtype=np.uint8)
    side = max(2, min(height, width) // 4)
    for i in range(n):
        x = (i * 2) % max(1, width - side)
        frames[i, :side, x : x + side] = 255
    wave = None
    if audio:
        t = np.arange(round(seconds * 16000)) / 16000
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    write_video(str(path), frames, fps, wave)
    return path


def write_dummy_release(root: str | pathlib.Path) -> dict[str, dict[str, int]]:
    """The release in `dummy_data/` (regenerate with `python -m tfds_builder.tiktalk.fake_release
    DIR`): every split, a deep chain, mentions/laughter/emoticons, a blocklisted reply, a video
    without audio track.

    Returns:
      The expected number of examples, config -> split -> count.
    """
    root = pathlib.Path(root)
    train = {
        "dv1": video(
            "小猫咪😂",
            [
                comment(
                    "a1",
                    "好可爱[捂脸]",
                    12,
                    [
                        reply("a2", "@小明 哈哈哈哈哈哈", 3),
                        reply("a3", "是的是的", 2, "a2"),
                        reply("a4", "握手", 1, "a3"),
                        reply("a5", "广告 加微信", 9),  # blocklisted
                    ],
                ),
                comment("a6", "没人回复我", 1),
            ],
            category="萌宠",
        ),
        "dv2": video("安静的视频", [comment("b1", "没有声音吗", 5, [reply("b2", "2333333", 1)])]),
    }
    val = {"dv3": eval_video("v", n_replies=6)}
    test = {"dv4": eval_video("t", n_replies=5)}
    write_json(root, "train", train)
    write_json(root, "val", val)
    write_json(root, "test", test)
    (root / "blocklist.txt").write_text("加微信\n", "utf-8")
    for i, vid in enumerate(("dv1", "dv2", "dv3", "dv4")):
        write_tiny_video(root / "videos" / f"{vid}.mp4", 1.0, 5, audio=vid != "dv2", seed=i)
    return {
        "dialogues": {"train": 4, "val": 1, "test": 1},
        "media": {"train": 2, "val": 1, "test": 1},
    }


if __name__ == "__main__":
    import sys

    print(write_dummy_release(sys.argv[1]))
