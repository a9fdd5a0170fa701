"""BLIP-2's caption stage records (tiktalk_jax/models/blip2_captions.py)."""

import json

import pytest

from tiktalk_jax.models import blip2_captions as bc


def write(tmp_path, obj, name="captions.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj, ensure_ascii=False), "utf-8")
    return str(path)


def test_read_captions_keeps_non_empty_strings_and_counts_the_rest(tmp_path, caplog):
    path = write(
        tmp_path, {"1": "一个红色的圆", "2": ["蓝色的方块", " ", 3, "绿色"], "3": [], "4": None}
    )
    with caplog.at_level("WARNING"):
        captions = bc.read_captions(path)
    assert captions == {"1": ["一个红色的圆"], "2": ["蓝色的方块", "绿色"]}
    assert "3 captions dropped" in caplog.text  # " ", 3 and None


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", ""])
def test_read_captions_rejects_what_is_not_an_object(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content, "utf-8")
    with pytest.raises(ValueError, match="captions file .*bad.json"):
        bc.read_captions(str(path))
    with pytest.raises(ValueError, match="captions file"):
        bc.read_captions(str(tmp_path / "missing.json"))


def test_records_one_per_caption_for_training_one_per_video_for_eval():
    captions = {"a": ["一个红色的圆", "红色的圆在动"], "b": ["蓝色的方块"]}
    train = bc.caption_records(captions, ["a", "x", "b"], train=True, prompt="有什么")
    assert [r["dialogue_id"] for r in train] == ["a#0", "a#1", "b#0"]
    assert [r["responses"] for r in train] == [["一个红色的圆"], ["红色的圆在动"], ["蓝色的方块"]]
    assert all(r["title"] == "" and r["context"] == ["有什么"] for r in train)
    assert [r["video_id"] for r in train] == ["a", "a", "b"]
    evals = bc.caption_records(captions, ["b", "a", "x"], train=False)
    assert [(r["dialogue_id"], r["responses"]) for r in evals] == [
        ("b", ["蓝色的方块"]),
        ("a", ["一个红色的圆", "红色的圆在动"]),
    ]
    assert evals[0]["context"] == [bc.DEFAULT_PROMPT]


def test_split_sources_needs_captioned_train_videos():
    captions = {"a": ["一个红色的圆"], "v": ["蓝色的方块"]}
    out = bc.split_sources(captions, {"train": ["a", "b"], "val": ["v", "w"]}, "train")
    assert [r["dialogue_id"] for r in out["train"]] == ["a#0"]
    assert [r["dialogue_id"] for r in out["val"]] == ["v"]
    with pytest.raises(ValueError, match="no video of the 'train' features has a caption"):
        bc.split_sources(captions, {"train": ["b"], "val": ["v"]}, "train")


def test_mixed_source_appends_the_captions_repeated():
    dialogues = [{"dialogue_id": f"d{i}"} for i in range(3)]
    captions = [{"dialogue_id": "a#0"}, {"dialogue_id": "b#0"}]
    mixed = bc.MixedSource(dialogues, captions, 2)
    assert len(mixed) == 7
    assert [mixed[i]["dialogue_id"] for i in range(7)] == ["d0", "d1", "d2", "a#0", "b#0", "a#0",
                                                           "b#0"]  # fmt: skip
    assert mixed[-1]["dialogue_id"] == "b#0"
    with pytest.raises(IndexError):
        mixed[7]
    with pytest.raises(ValueError, match="repeats"):
        bc.MixedSource(dialogues, captions, 0)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("captions=c.json", "needs caption_mix"),
        ("caption_mix=2", "caption_mix needs captions"),
        ("stage=caption", "stage=caption needs captions"),
        ("stage=pretrain", "stage must be one of"),
    ],
)
def test_config_refuses_incomplete_caption_settings(arg, message):
    from configs import blip2 as blip2_config

    with pytest.raises(ValueError, match=message):
        blip2_config.get_config(f"size=tiny,{arg}")


def test_config_caption_stage_and_mix_settings():
    from configs import blip2 as blip2_config

    stage = blip2_config.get_config("size=tiny,stage=caption,captions=c.json,kinds_file=k.json")
    assert stage.input.captions_file == "c.json" and stage.input.caption_mix == 0
    assert stage.eval.kinds_file is None and stage.eval.num_negatives == 0  # captions, not replies
    assert stage.total_steps == 2000 and stage.optim.lr == 3e-3
    mix = blip2_config.get_config("size=tiny,captions=c.json,caption_mix=2,qformer_run=/r")
    assert mix.input.caption_mix == 2 and mix.model.qformer_run == "/r"
    assert mix.eval.num_negatives > 0
    plain = blip2_config.get_config("size=tiny")
    assert not plain.input.get("captions_file") and plain.model.qformer_run is None
