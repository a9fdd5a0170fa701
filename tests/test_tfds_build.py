"""End-to-end TFDS builds of tiktalk/dialogues and tiktalk/media to ArrayRecord.

Covers `tfds_builder.tiktalk.build`, `download_and_prepare` with a DownloadConfig, the
`python -m tfds_builder.tiktalk` command, reading with `tfds.data_source` (also with TensorFlow
hidden), the build report, bad videos, and the bundled sample release with its bad items.
"""

import json
import pathlib
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from tfds_builder import tiktalk
from tfds_builder.tiktalk import raw, report
from tfds_builder.tiktalk.fake_release import (
    comment,
    dialogue_line,
    eval_video,
    reply,
    video,
    write_dummy_release,
    write_json,
    write_jsonl,
    write_tiny_video,
)
from tfds_builder.tiktalk.tiktalk_dataset_builder import Builder, NothingUsableError

REPO = pathlib.Path(__file__).resolve().parents[1]


def records(split_source):
    return [split_source[i] for i in range(len(split_source))]


def text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def good_video(prefix):
    return video("好视频", [comment(f"{prefix}c", "好评论", 1, [reply(f"{prefix}r", "好回复", 1)])])


@pytest.fixture(scope="module")
def mixed_release(tmp_path_factory):
    """Good videos next to every kind of bad video, in train, val and test."""
    root = tmp_path_factory.mktemp("mixed")
    train = {vid: good_video(vid) for vid in ("good", "silent", "trunc", "zero", "absent", "junk")}
    train["../up"] = good_video("u")
    write_json(root, "train", train)
    write_json(root, "val", {"val1": eval_video("v", 6), "val4": eval_video("w", 4)})
    write_json(root, "test", {"test1": eval_video("t", 5)})
    videos = root / "videos"
    write_tiny_video(videos / "good.mp4", 2.0, 10)
    write_tiny_video(videos / "silent.mp4", 2.0, 10, audio=False)
    data = write_tiny_video(videos / "trunc.mp4", 2.0, 10).read_bytes()
    (videos / "trunc.mp4").write_bytes(data[: len(data) // 3])
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "junk.mp4").write_bytes(b"\x00\x01 not a video " * 64)
    write_tiny_video(videos / "val1.mp4", 1.0, 5)
    write_tiny_video(videos / "test1.mp4", 1.0, 5)
    return root


def test_dialogues_build_to_array_record_and_data_source(mixed_release, tmp_path):
    builder = tiktalk.build(mixed_release, tmp_path, "dialogues")
    data_dir = tmp_path / "tiktalk" / "dialogues" / "1.0.0"
    assert sorted(p.name for p in data_dir.glob("*array_record*")) == [
        f"tiktalk-{s}.array_record-00000-of-00001" for s in ("test", "train", "val")
    ]
    source = tfds.data_source("tiktalk/dialogues", data_dir=str(tmp_path))
    train = records(source["train"])
    assert sorted(text(r["video_id"]) for r in train) == sorted(
        ["good", "silent", "trunc", "zero", "absent", "junk"]
    )
    (val,) = records(builder.as_data_source("val"))
    assert text(val["dialogue_id"]) == "val1/vc"
    assert [text(r) for r in val["responses"]] == [f"回复v{i}" for i in (5, 4, 3, 2, 1)]
    assert builder.info.file_format.value == "array_record"

    rep = report.load_report(tmp_path, "dialogues")
    assert rep["splits"]["train"]["skipped"]["unsafe_video_id"]["ids"] == ["../up"]
    assert rep["splits"]["val"]["skipped"]["too_few_references"]["ids"] == ["val4/wc"]
    assert rep["splits"]["train"]["stats"]["dialogues"] == 6
    assert rep["totals"]["stats"]["dialogues"] == 8
    summary = report.format_report(rep)
    assert "unsafe_video_id: 1 (../up)" in summary and "[val] videos=1 dialogues=1" in summary


def test_media_build_skips_bad_videos_and_keeps_good_ones(mixed_release, tmp_path):
    builder = tiktalk.build(mixed_release, tmp_path, "media", num_workers=2)
    source = builder.as_data_source()
    train = {text(r["video_id"]): r for r in records(source["train"])}
    assert sorted(train) == ["good", "silent"]
    assert [text(r["video_id"]) for r in records(source["val"])] == ["val1"]
    assert [text(r["video_id"]) for r in records(source["test"])] == ["test1"]
    good = train["good"]
    assert len(good["frames"]) == 2 and good["frames"][0].shape == (32, 32, 3)
    assert good["audio"].dtype.name == "int16" and len(good["audio"]) > 30000
    assert bool(good["has_audio"]) and not bool(train["silent"]["has_audio"])
    assert train["silent"]["audio"].shape == (0,)

    rep = report.load_report(tmp_path, "media")
    skipped = rep["splits"]["train"]["skipped"]
    assert skipped["video_undecodable"]["ids"] == ["junk", "trunc"] or skipped["video_undecodable"][
        "ids"
    ] == ["trunc", "junk"]
    assert skipped["video_empty"]["ids"] == ["zero"]
    assert skipped["video_missing"]["ids"] == ["absent"]
    assert rep["splits"]["train"]["notes"]["no_audio_track"]["ids"] == ["silent"]
    stats = rep["splits"]["train"]["stats"]
    assert stats["media_videos"] == 2 and stats["videos_without_audio"] == 1
    assert stats["avg_frames_per_video"] == 2.0
    assert rep["videos_per_s"] > 0
    assert rep["options"]["num_workers"] == 2


def test_download_and_prepare_with_download_config(tmp_path):
    manual = tmp_path / "manual"
    expected = write_dummy_release(manual)
    builder = Builder(data_dir=str(tmp_path / "data"), config="dialogues")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    source = tfds.data_source("tiktalk/dialogues", data_dir=str(tmp_path / "data"))
    assert {s: len(source[s]) for s in source} == expected["dialogues"]
    (chain,) = [r for r in records(source["train"]) if text(r["dialogue_id"]) == "dv1/a4"]
    assert [text(t) for t in chain["context"]] == ["好可爱", "哈哈哈", "是的是的"]
    assert [text(e) for e in chain["emoticons"]] == ["[捂脸]"]
    rep = report.load_report(tmp_path / "data", "dialogues")
    assert rep["splits"]["train"]["skipped"]["blocklisted"]["ids"] == ["dv1/a5"]


def test_data_source_reads_without_tensorflow(tmp_path):
    write_dummy_release(tmp_path / "manual")
    tiktalk.build(tmp_path / "manual", tmp_path / "data", "dialogues")
    tiktalk.build(tmp_path / "manual", tmp_path / "data", "media", num_workers=1)
    script = f"""
import importlib.machinery, sys

class HideTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [HideTensorFlow if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
import tensorflow_datasets as tfds
import tfds_builder.tiktalk.tiktalk_dataset_builder
d = tfds.data_source("tiktalk/dialogues", data_dir={str(tmp_path / "data")!r})
m = tfds.data_source("tiktalk/media", data_dir={str(tmp_path / "data")!r})
print(len(d["train"]), len(m["train"]), m["train"][0]["frames"][0].shape,
      "tensorflow" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False"
    assert out.stdout.split()[:2] == ["4", "2"]


def test_cli_module_builds_array_record(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfds_builder.tiktalk",
            f"--manual_dir={REPO / 'tfds_builder/tiktalk/dummy_data'}",
            "--config=dialogues",
            f"--data_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # The summary is logged at INFO (stderr) by the CLI.
    assert "TikTalk dialogues 1.0.0 build report" in out.stdout + out.stderr
    assert (tmp_path / "tiktalk/dialogues/1.0.0/tiktalk-train.array_record-00000-of-00001").exists()
    assert report.load_report(tmp_path, "dialogues")["totals"]["stats"]["dialogues"] == 6


def test_jsonl_release_builds(tmp_path):
    write_jsonl(tmp_path / "m", "train", [dialogue_line("d1", "v1", ["你好"], ["你好呀"])])
    write_jsonl(
        tmp_path / "m", "test", [dialogue_line("t1", "v2", ["问"], [f"答{i}" for i in range(5)])]
    )
    builder = tiktalk.build(tmp_path / "m", tmp_path / "d", "dialogues")
    source = builder.as_data_source()
    assert [text(r["dialogue_id"]) for r in records(source["train"])] == ["d1"]
    assert len(records(source["test"])[0]["responses"]) == 5
    assert report.load_report(tmp_path / "d", "dialogues")["layout"] == {
        "train": "jsonl",
        "test": "jsonl",
    }


def test_empty_split_is_left_out_and_noted(tmp_path):
    write_json(tmp_path / "m", "train", {"g": good_video("g")})
    write_json(tmp_path / "m", "val", {"v": eval_video("v", 3)})
    builder = tiktalk.build(tmp_path / "m", tmp_path / "d", "dialogues")
    assert sorted(builder.info.splits) == ["train"]
    rep = report.load_report(tmp_path / "d", "dialogues")
    assert rep["splits"]["val"]["notes"]["empty_split"]["ids"] == ["val"]


def test_nothing_usable_fails_with_the_report(tmp_path):
    write_json(
        tmp_path / "m", "train", {"v": video("t", [comment("c", "[捂脸]", 0, [reply("r", "x")])])}
    )
    with pytest.raises(NothingUsableError, match="nothing usable") as e:
        tiktalk.build(tmp_path / "m", tmp_path / "d", "dialogues")
    assert "empty_after_cleaning: 1 (v/c)" in str(e.value)
    # media: dialogues exist but their only video is missing.
    write_json(tmp_path / "m", "train", {"g": good_video("g")})
    (tmp_path / "m" / "videos").mkdir()
    (tmp_path / "m" / "videos" / "other.mp4").write_bytes(b"x")
    with pytest.raises(NothingUsableError, match="video_missing: 1 \\(g\\)"):
        tiktalk.build(tmp_path / "m", tmp_path / "d", "media", num_workers=1)


def test_wrong_manual_dir_fails_before_any_work(tmp_path):
    write_dummy_release(tmp_path / "outer" / "tiktalk")
    with pytest.raises(raw.LayoutError, match="--manual_dir=.*outer/tiktalk"):
        tiktalk.build(tmp_path / "outer", tmp_path / "d", "dialogues")
    with pytest.raises(raw.LayoutError, match="does not exist"):
        tiktalk.build(tmp_path / "nowhere", tmp_path / "d", "dialogues")
    assert not (tmp_path / "d" / "tiktalk" / "dialogues" / "1.0.0").exists()


def test_overrides_rebuild_when_options_change(tmp_path):
    write_dummy_release(tmp_path / "m")
    first = tiktalk.build(tmp_path / "m", tmp_path / "d", "dialogues")
    assert first.info.splits["train"].num_examples == 4
    again = tiktalk.build(tmp_path / "m", tmp_path / "d", "dialogues", min_likes=2)
    # a3 (2 likes) survives, a2 (3) too, a4 (1 like) and b2 (1 like) are dropped.
    assert again.info.splits["train"].num_examples == 2
    assert report.load_report(tmp_path / "d", "dialogues")["options"]["min_likes"] == 2
    # Options that do not change the records (or belong to the other config) reuse the build.
    same = tiktalk.build(tmp_path / "m", tmp_path / "d", "dialogues", min_likes=2, fps=5.0)
    assert same.info.splits["train"].num_examples == 2
    assert report.load_report(tmp_path / "d", "dialogues")["options"]["fps"] == 1.0
    with pytest.raises(ValueError, match="unknown TiktalkConfig fields"):
        tiktalk.build(tmp_path / "m", tmp_path / "d", "dialogues", min_like=2)


def test_sample_release_builds_and_reports_its_bad_items(tmp_path):
    from tiktalk_jax.sample import write_sample

    summary = write_sample(str(tmp_path / "sample"))
    dialogues = tiktalk.build(tmp_path / "sample", tmp_path / "d", "dialogues")
    media_builder = tiktalk.build(tmp_path / "sample", tmp_path / "d", "media")
    ids = set()
    for split, source in dialogues.as_data_source().items():
        split_ids = {text(r["dialogue_id"]) for r in records(source)}
        minimum = summary["splits"][split].get(
            "dialogues", summary["splits"][split].get("contexts")
        )
        assert len(split_ids) >= minimum
        ids |= split_ids
    kinds = json.loads((tmp_path / "sample" / "sample_kinds.json").read_text("utf-8"))
    assert set(kinds) <= ids  # every dialogue the sample plans exists

    bad = summary["bad"]
    split_of = {vid: v["split"] for vid, v in summary["videos"].items()}
    rep = report.load_report(tmp_path / "d", "media")

    def ids_for(reason, vid):
        body = rep["splits"][split_of[vid]]
        entry = body["skipped"].get(reason) or body["notes"].get(reason) or {"ids": []}
        return entry["ids"]

    assert bad["unsafe_video_id"] in ids_for("unsafe_video_id", bad["unsafe_video_id"])
    assert bad["malformed_record"] in ids_for("malformed_record", bad["malformed_record"])
    assert bad["truncated_mp4"] in ids_for("video_undecodable", bad["truncated_mp4"])
    assert bad["zero_byte_mp4"] in ids_for("video_empty", bad["zero_byte_mp4"])
    assert bad["missing_mp4"] in ids_for("video_missing", bad["missing_mp4"])
    assert bad["no_audio"] in ids_for("no_audio_track", bad["no_audio"])
    assert any(
        i.startswith(bad["reply_cycle"] + "/") for i in ids_for("reply_cycle", bad["reply_cycle"])
    )
    dup = bad["duplicate_comment_id"]
    assert any(i.startswith(dup + "/") for i in ids_for("duplicate_comment_id", dup))

    media_ids = {
        text(r["video_id"])
        for source in media_builder.as_data_source().values()
        for r in records(source)
    }
    good = {vid for vid, v in summary["videos"].items() if v["bad"] in (None, "no_audio")}
    assert good <= media_ids
