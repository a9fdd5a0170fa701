"""Feature extraction over the bundled sample: every good video written, corrupt ones reported,
resume without recomputation, 1 vs 8 devices, hosts, the SideTable join, all four encoders.

Tiny random-init encoder configs keep it fast; the sample release is built once per module.
"""

import dataclasses
import functools
import json
import os
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tiktalk_jax import audio_features, encoders, extract, features
from tiktalk_jax import input_pipeline as ip
from tiktalk_jax.image_preprocessing import ImageProcessor

TINY = {
    "resnet101": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "vggish": dict(conv_widths=[4, 4, 8, 8, 8, 8], fc_widths=[16, 16], embedding_size=8),
    "whisper": dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32),
    "vit_g": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
}
BATCH = 12  # rounded up to 16 on 8 devices: 2 frames per device


@functools.cache
def tiny(name):
    """One encoder per name for the whole module: random init compiles a program per shape."""
    return encoders.build_encoder(name, model_config=TINY[name])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tfds_builder import tiktalk
    from tiktalk_jax import sample

    root = tmp_path_factory.mktemp("extract")
    summary = sample.write_sample(str(root / "release"))
    tiktalk.build(root / "release", root / "data", "dialogues")
    tiktalk.build(root / "release", root / "data", "media", num_workers=1)
    media = extract.media_dir(str(root / "data"))
    return dict(root=root, summary=summary, media=media, data_dir=str(root / "data"))


def media_sources(data, splits=("train", "val", "test")):
    return {s: extract.open_media(data["media"], s) for s in splits}


def read_all(out_dir, split):
    table = features.FeatureTable(out_dir, split)
    return {r["video_id"]: r for r in (table[i] for i in range(len(table)))}


@pytest.fixture(scope="module")
def resnet_run(data):
    """The reference run: tiny ResNet, all splits, 8 devices, shards of 8 videos."""
    out = str(data["root"] / "resnet")
    encoder = tiny("resnet101")
    report = extract.extract_dataset(
        encoder, media_sources(data), out, batch_size=BATCH, shard_size=8, progress=False,
        media=dict(dir=data["media"]),
    )  # fmt: skip
    return dict(out=out, report=report, encoder=encoder)


def test_resnet_features_for_every_good_video_on_8_devices(data, resnet_run):
    out, report, encoder = resnet_run["out"], resnet_run["report"], resnet_run["encoder"]
    summary = data["summary"]
    meta = features.read_metadata(out)
    assert meta["random_init"] is True and meta["weights"] == "random-init seed=0"
    assert "RANDOM-INIT" in meta["warning"]
    assert meta["fields"]["features"]["shape"] == [None, 16]
    assert meta["preprocessing"]["shortest_edge"] == 224
    pre = meta["preprocessing"]
    processor = ImageProcessor(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])})
    for split in ("train", "val", "test"):
        run = report["last_run"][split]
        assert run["devices"] == 8 and run["batch_size"] == 16
        assert run["compilations"] == 1  # one static shape for every video
        media = extract.open_media(data["media"], split)
        media_ids = {ip.as_text(media[i]["video_id"]) for i in range(len(media))}
        good = {
            v for v, a in summary["videos"].items()
            if a["split"] == split and a["bad"] in (None, "no_audio")
        }  # fmt: skip
        records = read_all(out, split)
        assert good <= set(records) == media_ids
        assert report["splits"][split]["written"] == len(media_ids)
        assert report["splits"][split]["not_done"] == 0 and not report["splits"][split]["failed"]
    # Packing frames of many videos into batches gives each video exactly its own frames.
    media = extract.open_media(data["media"], "val")
    records = read_all(out, "val")
    for i in (0, 7):
        record = media[i]
        frames = [encoders.decode_frame(f) for f in record["frames"]]
        want = encoder.model(jnp.asarray(processor.batch(frames))).pooler_output
        got = records[ip.as_text(record["video_id"])]
        assert got["features"].shape == (len(frames), 16) and got["features"].dtype == np.float32
        np.testing.assert_allclose(got["features"], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["times"], record["frame_times"])


class Faulty:
    """A media source with injected faults: per index, a record transform or an exception."""

    def __init__(self, source, edits=None, raise_at=None, exception=OSError):
        self.source, self.edits, self.raise_at = source, edits or {}, raise_at
        self.exception = exception

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if self.raise_at is not None and i >= self.raise_at:
            raise self.exception(f"injected failure at record {i}")
        record = self.source[i]
        return self.edits[i](dict(record)) if i in self.edits else record


def test_corrupt_videos_are_reported_and_skipped(data, tmp_path):
    val = extract.open_media(data["media"], "val")
    ids = [ip.as_text(val[i]["video_id"]) for i in range(len(val))]

    def bad_jpeg(r):
        r["frames"] = [r["frames"][0], b"\xff\xd8\xff\xe0 not a jpeg", *r["frames"][2:]]
        return r

    def no_frames(r):
        r["frames"], r["frame_times"] = [], np.zeros((0,), np.float32)
        return r

    class Unreadable(Faulty):
        def __getitem__(self, i):
            if i == 7:
                raise OSError("checksum mismatch")
            return super().__getitem__(i)

    source = Unreadable(val, edits={3: bad_jpeg, 5: no_frames})
    report = extract.extract_dataset(
        tiny("resnet101"), {"val": source}, str(tmp_path), batch_size=BATCH, progress=False
    )
    split = report["splits"]["val"]
    assert split["failed"] == {
        "frame_undecodable": [ids[3]],
        "no_frames": [ids[5]],
        "record_unreadable": ["<record 7>"],
    }
    assert "frame 1" in next(f["message"] for f in split["failures"] if f["video_id"] == ids[3])
    assert set(read_all(str(tmp_path), "val")) == set(ids) - {ids[3], ids[5], ids[7]}
    assert split["written"] == 7 and split["not_done"] == 0
    on_disk = features.read_json(tmp_path / features.REPORT_NAME)
    assert on_disk["splits"]["val"]["failed"] == split["failed"]


def test_resume_after_interruption_recomputes_nothing_finished(data, resnet_run, tmp_path):
    train = extract.open_media(data["media"], "train")
    kwargs = dict(batch_size=BATCH, shard_size=4, progress=False, num_threads=2)
    # Ctrl-C while reading record 22: the run stops; finished shards stay.
    with pytest.raises(KeyboardInterrupt):
        extract.extract_dataset(
            tiny("resnet101"), {"train": Faulty(train, raise_at=22, exception=KeyboardInterrupt)},
            str(tmp_path), **kwargs,
        )  # fmt: skip
    done = features.done_ids(str(tmp_path), "train")
    assert 0 < len(done) < 22 and len(done) % 4 == 0

    prepared = []
    prepare = tiny("resnet101").prepare
    encoder = dataclasses.replace(
        tiny("resnet101"),
        prepare=lambda r: prepared.append(ip.as_text(r["video_id"])) or prepare(r),
    )
    report = extract.extract_dataset(encoder, {"train": train}, str(tmp_path), **kwargs)
    stats = report["last_run"]["train"]
    assert stats["already_done"] == len(done) and stats["written"] == len(train) - len(done)
    assert not set(prepared) & done and len(prepared) == len(train) - len(done)
    assert not [n for n in os.listdir(tmp_path / "train") if n.endswith(".tmp")]

    resumed, reference = read_all(str(tmp_path), "train"), read_all(resnet_run["out"], "train")
    assert resumed.keys() == reference.keys()
    for vid, record in reference.items():
        np.testing.assert_allclose(resumed[vid]["features"], record["features"], atol=1e-6)


def test_one_device_gives_the_same_features_as_eight(data, resnet_run, tmp_path):
    report = extract.extract_dataset(
        tiny("resnet101"), {"val": extract.open_media(data["media"], "val")}, str(tmp_path),
        devices=jax.devices()[:1], batch_size=16, progress=False,
    )  # fmt: skip
    stats = report["last_run"]["val"]
    assert stats["devices"] == 1 and stats["batch_size"] == 16
    one, eight = read_all(str(tmp_path), "val"), read_all(resnet_run["out"], "val")
    assert one.keys() == eight.keys()
    for vid in one:
        np.testing.assert_array_equal(one[vid]["features"], eight[vid]["features"])


def test_hosts_take_disjoint_shares_covering_the_split(data, tmp_path):
    val = extract.open_media(data["media"], "val")
    encoder = tiny("resnet101")
    for host in (0, 1):
        report = extract.extract_dataset(
            encoder, {"val": val}, str(tmp_path), batch_size=8, process_index=host,
            process_count=2, progress=False,
        )  # fmt: skip
        assert report["last_run"]["val"]["written"] == 5
    assert report["splits"]["val"]["written"] == 10 and report["splits"]["val"]["not_done"] == 0
    indexes = features.shard_indexes(str(tmp_path), "val")
    by_host = [set(i["videos"]) for i in indexes]
    assert [i["shard"] for i in indexes] == ["h000-00000.array_record", "h001-00000.array_record"]
    assert not by_host[0] & by_host[1]
    assert by_host[0] | by_host[1] == {ip.as_text(val[i]["video_id"]) for i in range(len(val))}


if "test_extract_frames" not in ip.registered_formatters():

    @ip.register_formatter("test_extract_frames")
    def _frames_formatter(config, tokenizer, *, train):
        del config, tokenizer, train
        return lambda r: dict(
            frames=np.asarray(r["frames"]["features"], np.float32),
            same_video=np.bool_(ip.as_text(r["frames"]["video_id"]) == ip.as_text(r["video_id"])),
        )


def test_features_join_the_dialogues_as_a_side_table(data, resnet_run):
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(name="test_extract_frames"))
    config.input = ip.default_config()
    config.input.update(
        data_dir=data["data_dir"], batch_size=4, eval_batch_size=4, eval_splits=("val",),
        on_missing="skip", vocab_size=300,
    )  # fmt: skip
    tables = {s: features.FeatureTable(resnet_run["out"], s) for s in ("train", "val")}
    sides = {s: [t.side_table("frames")] for s, t in tables.items()}
    datasets = ip.make_datasets(config, side_tables=sides, process_index=0, process_count=1)
    # Only dialogues of videos the media build dropped (truncated, empty mp4) have no features.
    bad = data["summary"]["bad"]
    for split, video in (("train", bad["truncated_mp4"]), ("val", bad["zero_byte_mp4"])):
        skipped = datasets.skipped[split]
        assert skipped and all(d.startswith(video + "/") for d in skipped)
    batch = next(iter(datasets.train))
    assert batch["frames"].shape == (4, 4, 16) and batch["same_video"].all()
    evals = next(iter(datasets.evals["val"]))
    assert evals["same_video"].all()


def test_audio_encoders_share_the_096s_grid_and_handle_silence(data, tmp_path):
    val = extract.open_media(data["media"], "val")

    def silent(r):
        r["audio"], r["has_audio"] = b"", False
        return r

    source = {"val": Faulty(val, edits={2: silent})}
    reports, records, built = {}, {}, {}
    for name in ("vggish", "whisper"):
        built[name] = tiny(name)
        out = str(tmp_path / name)
        reports[name] = extract.extract_dataset(
            built[name], source, out, batch_size=8, progress=False
        )
        records[name] = read_all(out, "val")
    silent_id = ip.as_text(val[2]["video_id"])
    for name, dim in (("vggish", 8), ("whisper", 16)):
        assert reports[name]["splits"]["val"]["notes"] == {"no_audio": [silent_id]}
        assert records[name][silent_id]["features"].shape == (0, dim)
    record = val[0]
    vid = ip.as_text(record["video_id"])
    samples = encoders.decode_audio(record)
    n = encoders.audio_windows(samples.size)
    assert n == 4  # 4 s of sample audio
    v, w = records["vggish"][vid], records["whisper"][vid]
    np.testing.assert_array_equal(v["times"], w["times"])
    np.testing.assert_allclose(v["times"], 0.96 * np.arange(n), rtol=1e-6)
    examples = audio_features.vggish_examples(samples)
    want = built["vggish"].model(jnp.asarray(examples))
    np.testing.assert_allclose(v["features"], want, rtol=1e-4, atol=1e-6)
    # Whisper: encoder states of the valid frames, averaged over 48-state (0.96 s) windows.
    mel, frames = audio_features.whisper_log_mel(samples)
    states = np.asarray(built["whisper"].model(jnp.asarray(mel)))[0, : (frames[0] + 1) // 2]
    want = states[: 48 * n].reshape(n, 48, -1).mean(1)
    np.testing.assert_allclose(w["features"], want, rtol=1e-4, atol=1e-5)


def test_vit_video_mean_and_seeded_image_frame_in_bfloat16(data, tmp_path):
    val = extract.open_media(data["media"], "val")
    encoder = tiny("vit_g")
    out = str(tmp_path)
    report = extract.extract_dataset(
        encoder, {"val": val}, out, storage_dtype="bfloat16", batch_size=8, progress=False
    )
    assert report["last_run"]["val"]["compilations"] == 1
    meta = features.read_metadata(out)
    assert meta["fields"]["features"] == dict(
        shape=[257, 16], dtype="bfloat16", doc="mean over frames (BLIP-2_Video)"
    )
    records = read_all(out, "val")
    processor = ImageProcessor.for_encoder("blip2")
    for i in (0, 1, 2):
        record = val[i]
        vid = ip.as_text(record["video_id"])
        got = records[vid]
        frames = [encoders.decode_frame(f) for f in record["frames"]]
        tokens = np.asarray(encoder.model(jnp.asarray(processor.batch(frames))).last_hidden_state)
        k = int(np.random.default_rng([0, zlib.crc32(vid.encode())]).integers(len(frames)))
        assert int(got["image_frame"]) == k and int(got["num_frames"]) == len(frames)
        assert got["features"].dtype == got["image_features"].dtype == jnp.bfloat16
        np.testing.assert_allclose(got["features"].astype(np.float32), tokens.mean(0), atol=3e-2)
        np.testing.assert_allclose(got["image_features"].astype(np.float32), tokens[k], atol=3e-2)
    frame_choices = {int(r["image_frame"]) for r in records.values()}
    assert len(frame_choices) > 1  # a per-video choice, not one fixed frame


def test_command_line_resumes_and_refuses_other_settings(data, tmp_path, capsys):
    args = [
        "extract", "--encoder=resnet101", f"--data_dir={data['data_dir']}",
        f"--out_dir={tmp_path}", "--split=val", "--batch_size=8", "--progress=false",
        "--model_config=" + json.dumps(TINY["resnet101"]),
    ]  # fmt: skip
    report = extract.main(args)
    assert report["splits"]["val"]["written"] == 10 and report["last_run"]["val"]["written"] == 10
    meta = features.read_metadata(str(tmp_path))
    assert meta["media_dir"] == data["media"] and meta["media_options"]["fps"] == 1.0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["val"]["written"] == 10
    again = extract.main(args)
    assert again["last_run"]["val"]["already_done"] == 10
    assert again["last_run"]["val"]["written"] == 0
    with pytest.raises(ValueError, match="other"):
        extract.main(args + ["--seed=1"])
    # Another split joins the same dataset; the report keeps both.
    both = extract.main([a.replace("--split=val", "--split=test") for a in args])
    assert both["splits"]["val"]["written"] == both["splits"]["test"]["written"] == 10
    assert features.splits(str(tmp_path)) == ["test", "val"]


def test_pretrained_weights_are_used_and_recorded_by_hash(data, tmp_path):
    import torch
    import transformers

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "features")
    config = transformers.ResNetConfig(**TINY["resnet101"])
    torch.manual_seed(0)
    transformers.ResNetModel(config).eval().save_pretrained(ckpt)
    hf = transformers.ResNetModel.from_pretrained(ckpt).eval()
    encoder = encoders.build_encoder("resnet50", ckpt)
    assert encoder.metadata["random_init"] is False and "warning" not in encoder.metadata
    assert encoder.metadata["weights"] == ckpt and len(encoder.metadata["sha256"]) == 64
    val = extract.open_media(data["media"], "val")
    extract.extract_dataset(encoder, {"val": val}, out, batch_size=8, progress=False)
    record = val[0]
    frames = [encoders.decode_frame(f) for f in record["frames"]]
    pixels = ImageProcessor.for_encoder("resnet").batch(frames)
    with torch.no_grad():
        want = hf(torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.flatten(1)
    got = read_all(out, "val")[ip.as_text(record["video_id"])]["features"]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="random-init"):
        encoders.build_encoder("resnet50", ckpt, model_config={"depths": [1, 1]})
    # Other weights under the same path: a resumed run must not mix them into these features.
    torch.manual_seed(1)
    transformers.ResNetModel(config).eval().save_pretrained(ckpt)
    other = encoders.build_encoder("resnet50", ckpt)
    assert other.metadata["sha256"] != encoder.metadata["sha256"]
    with pytest.raises(ValueError, match="sha256"):
        extract.extract_dataset(other, {"val": val}, out, batch_size=8, progress=False)
