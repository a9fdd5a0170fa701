"""TikTalk TFDS builder: configs `dialogues` (text, one record per dialogue) and `media` (frames
and audio, one record per video, joined to dialogues by `video_id`).

    python -m tfds_builder.tiktalk --manual_dir=RELEASE --config=dialogues   (= `tfds build`)

or `tfds_builder.tiktalk.build(manual_dir, data_dir, config)`. Record schemas are the contract in
docs/architecture.md; the raw layout, cleaning decisions and the build report are in README.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from . import dialogues as dialogues_lib
from . import media, raw
from .report import REPORT_NAME, Report, format_report

_HOMEPAGE = "https://ruc-aimind.github.io/projects/TikTalk/"


class NothingUsableError(RuntimeError):
    """Every record of the release was skipped; the message holds the report summary."""


@dataclasses.dataclass(eq=False)
class TiktalkConfig(tfds.core.BuilderConfig):
    """Options of both configs; `name` ("dialogues" or "media") selects what is built.

    Text options apply to both configs (media keeps the videos that have a dialogue).
    """

    min_likes: int = 0  # comments with fewer likes are dropped (with their subtree)
    min_video_likes: int = 0  # videos whose optional "likes" is lower are dropped
    max_repeat: int = 3  # "哈哈哈哈哈" -> "哈哈哈": runs of a unit collapse to this many repeats
    num_references: int = 5  # val/test references per context (paper: 5)
    fps: float = 1.0  # media: frames sampled per second
    max_frames: int = 50  # media: at most this many frames per video
    frame_size: int = 224  # media: shorter side resized down to this (never up)
    jpeg_quality: int = 90
    sample_rate: int = 16000  # media: mono int16 audio rate
    decode_timeout_s: float = 300.0  # media: per-video decode limit
    num_workers: int = 0  # media: decoding processes; 0 = all cores, 1 = in-process
    start_method: str = media.DEFAULT_START_METHOD  # 'forkserver' or 'spawn', never 'fork'

    def options(self) -> dict[str, Any]:
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base
        }

    def content_options(self) -> dict[str, Any]:
        """The options that change the records of this config (not how fast they are made)."""
        text = ("min_likes", "min_video_likes", "max_repeat", "num_references")
        media_fields = ("fps", "max_frames", "frame_size", "jpeg_quality", "sample_rate")
        names = text + (media_fields if self.name == "media" else ())
        return {k: v for k, v in self.options().items() if k in names}

    def text_options(self, blocklist) -> dialogues_lib.TextOptions:
        return dialogues_lib.TextOptions(
            min_likes=self.min_likes,
            min_video_likes=self.min_video_likes,
            max_repeat=self.max_repeat,
            num_references=self.num_references,
            blocklist=blocklist,
        )

    def media_options(self) -> media.MediaOptions:
        return media.MediaOptions(
            fps=self.fps,
            max_frames=self.max_frames,
            frame_size=self.frame_size,
            jpeg_quality=self.jpeg_quality,
            sample_rate=self.sample_rate,
            decode_timeout_s=self.decode_timeout_s,
            num_workers=self.num_workers,
            start_method=self.start_method,
        )


class Builder(tfds.core.GeneratorBasedBuilder):
    """TikTalk (Lin et al., ACM MM 2023): video-based multi-modal chitchat from Douyin."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: dialogues and media configs."}
    BUILDER_CONFIGS = [
        TiktalkConfig(
            name="dialogues",
            description="Text dialogues: cleaned context turns, responses (train: 1, val/test: "
            "5 references), title, category, emoticons; one record per dialogue.",
        ),
        TiktalkConfig(
            name="media",
            description="Per video: JPEG frames at 1 fps (max 50, shorter side <= 224), frame "
            "times, 16 kHz mono int16 audio, duration; join to dialogues by video_id.",
        ),
    ]
    DEFAULT_CONFIG_NAME = "dialogues"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the TikTalk release in manual_dir (see tfds_builder/tiktalk/README.md):
      <manual_dir>/train.json, val.json, test.json  (any subset; or <split>.jsonl pre-split)
      <manual_dir>/videos/<video_id>.mp4            (media config only)
      <manual_dir>/knowledge.tsv, blocklist.txt     (optional)
    The official data (https://github.com/RUC-AIMind/TikTalk) provides train.json/test.json and
    a script that fetches each video as <video_id>.mp4. `python -m tiktalk_jax.sample DIR`
    writes a small synthetic release in this layout.
    """

    def __init__(self, *, config_overrides: dict[str, Any] | None = None, **kwargs):
        """Like any builder, plus `config_overrides`: TiktalkConfig fields to change.

        Overrides keep the config's name (and so its data directory); `build()` rebuilds a
        dataset whose report shows other options.
        """
        config = kwargs.get("config")
        registered = {c.name: c for c in self.BUILDER_CONFIGS}
        if isinstance(config, TiktalkConfig) and registered.get(config.name) not in (None, config):
            # A modified copy of a registered config (e.g. `builder.builder_config` of an
            # overridden builder, passed back to reload it): TFDS refuses a custom config with a
            # registered name, so turn it back into name + overrides.
            base = registered[config.name].options()
            diff = {k: v for k, v in config.options().items() if base[k] != v}
            config_overrides = {**diff, **(config_overrides or {})}
            kwargs["config"] = config.name
        explicit_format = kwargs.get("file_format")
        super().__init__(**kwargs)
        if explicit_format is None and not self.is_prepared():
            # ArrayRecord by default (also for a plain `tfds build`): `tfds.data_source` and grain
            # read it without TensorFlow; TFRecord stays available through file_format=.
            self.info.set_file_format("array_record", override=True)
        if config_overrides:
            allowed = set(self.builder_config.options())
            unknown = sorted(set(config_overrides) - allowed)
            if unknown:
                raise ValueError(
                    f"unknown TiktalkConfig fields {unknown}; known: {sorted(allowed)}"
                )
            self._builder_config = dataclasses.replace(self.builder_config, **config_overrides)
            self._original_state["config_overrides"] = dict(config_overrides)
        self._report: Report | None = None
        self._open_splits: set[str] = set()
        self._media_seconds = 0.0
        self._media_attempted = 0

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config.name == "media":
            features = tfds.features.FeaturesDict(
                {
                    "video_id": tfds.features.Text(),
                    "frames": tfds.features.Sequence(
                        tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
                    ),
                    "frame_times": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                    # Raw bytes: 16 kHz int16 as an int64 list would take 4x the space.
                    "audio": tfds.features.Tensor(
                        shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES
                    ),
                    "has_audio": tfds.features.Scalar(dtype=np.bool_),
                    "duration": tfds.features.Scalar(dtype=np.float32),
                }
            )
        else:
            features = tfds.features.FeaturesDict(
                {
                    "dialogue_id": tfds.features.Text(),
                    "video_id": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "category": tfds.features.Text(),
                    "context": tfds.features.Sequence(tfds.features.Text()),
                    "responses": tfds.features.Sequence(tfds.features.Text()),
                    "emoticons": tfds.features.Sequence(tfds.features.Text()),
                }
            )
        return self.dataset_info_from_configs(features=features, homepage=_HOMEPAGE)

    # ----------------------------------------------------------------------------------------

    def _manual_dir(self, dl_manager) -> epath.Path:
        try:
            return dl_manager.manual_dir
        except AssertionError:
            # TFDS only says "does not exist or is empty"; check_layout says what is wrong.
            given = getattr(dl_manager, "_manual_dir", None)
            if not given:
                raise raw.LayoutError(
                    "no manual_dir given: pass --manual_dir=<release dir> (tfds build) or "
                    "DownloadConfig(manual_dir=...)"
                ) from None
            raw.check_layout(str(given), need_videos=self.builder_config.name == "media")
            raise

    def _split_generators(self, dl_manager):
        config = self.builder_config
        is_media = config.name == "media"
        manual_dir = self._manual_dir(dl_manager)
        layout = raw.check_layout(str(manual_dir), need_videos=is_media)
        report = Report(config.name, str(self.version), layout.manual_dir)
        report.options = config.options()
        self._report = report
        opts = config.text_options(raw.read_blocklist(layout.blocklist))
        by_split = dialogues_lib.prepare(layout, opts, report)
        if is_media:
            items = self._media_candidates(layout, by_split, config.media_options())
        else:
            items = by_split
        for split, values in items.items():
            if not values:
                report.note(split, "empty_split", split)
        items = {s: v for s, v in items.items() if v}
        if not items:
            summary = format_report(report.to_dict())
            raise NothingUsableError(
                f"nothing usable in {layout.manual_dir}: every record was skipped.\n{summary}"
            )
        self._open_splits = set(items)
        return {split: self._generate_examples(split, values) for split, values in items.items()}

    def _media_candidates(self, layout, by_split, opts: media.MediaOptions):
        """Split -> [(video_id, path)] of videos with a dialogue whose file opens and decodes."""
        report = self._report
        index = raw.index_videos(layout.videos_dir)
        candidates: dict[str, list[tuple[str, str]]] = {}
        owner: dict[str, str] = {}
        for split, dialogues in by_split.items():
            candidates[split] = []
            for video_id in dict.fromkeys(d.video_id for d in dialogues):
                path = index.get(video_id)
                if path is None:
                    report.skip(split, "video_missing", video_id, f"videos/{video_id}.mp4")
                elif path.stat().st_size == 0:
                    report.skip(split, "video_empty", video_id)
                else:
                    candidates[split].append((video_id, str(path)))
                    owner[video_id] = split
        # A cheap probe (open + first frame) of every file before generation: TFDS cannot
        # write an empty split, so a split whose videos all fail must be known up front.
        start = time.monotonic()
        bad: set[str] = set()
        all_videos = [c for cs in candidates.values() for c in cs]
        for video_id, status, value, message in media.process_videos(
            media.probe_task, all_videos, opts
        ):
            if status != "ok":
                report.skip(owner[video_id], value, video_id, message)
                bad.add(video_id)
        self._media_seconds += time.monotonic() - start
        return {s: [c for c in cs if c[0] not in bad] for s, cs in candidates.items()}

    def _generate_examples(self, split: str, items):
        if self.builder_config.name == "media":
            yield from self._generate_media(split, items)
        else:
            for d in items:
                yield d.dialogue_id, d.to_example()
        self._finish_split(split)

    def _generate_media(self, split: str, videos: list[tuple[str, str]]):
        report = self._report
        opts = self.builder_config.media_options()
        stats = {"media_videos": 0, "frames": 0, "videos_without_audio": 0, "duration_s": 0.0}
        start = time.monotonic()
        for video_id, status, value, message in media.process_videos(
            media.decode_task, videos, opts
        ):
            if status != "ok":
                report.skip(split, value, video_id, message)
                continue
            if not value["has_audio"]:
                report.note(split, "no_audio_track", video_id)
                stats["videos_without_audio"] += 1
            stats["media_videos"] += 1
            stats["frames"] += len(value["frames"])
            stats["duration_s"] += float(value["duration"])
            stats["audio_hours"] = stats.get("audio_hours", 0.0) + len(value["audio"]) / (
                opts.sample_rate * 3600.0
            )
            yield video_id, {"video_id": video_id, **value}
        self._media_seconds += time.monotonic() - start
        self._media_attempted += len(videos)
        n = stats["media_videos"]
        stats["avg_frames_per_video"] = round(stats["frames"] / n, 4) if n else 0.0
        stats["avg_duration_s"] = round(stats["duration_s"] / n, 4) if n else 0.0
        stats["duration_s"] = round(stats["duration_s"], 4)
        stats["audio_hours"] = round(stats.get("audio_hours", 0.0), 6)
        report.set_stats(split, stats)
        report.extra["media_seconds"] = round(self._media_seconds, 3)
        report.extra["videos_per_s"] = round(
            self._media_attempted / max(self._media_seconds, 1e-9), 3
        )

    def _finish_split(self, split: str) -> None:
        """Writes the report (cumulative) into the dataset dir once a split is generated.

        During download_and_prepare `self.data_dir` is TFDS's temporary directory, renamed to
        `<data_dir>/tiktalk/<config>/<version>` only when every split succeeded, so the report
        lands next to the dataset atomically.
        """
        self._open_splits.discard(split)
        if self._report is None:
            return
        path = epath.Path(self.data_dir) / REPORT_NAME
        self._report.write(path)
        if not self._open_splits:
            summary = format_report(self._report.to_dict())
            # Logged, not printed: `tfds build` and `python -m tfds_builder.tiktalk` log at INFO;
            # library callers (the demo) print `report.format_report` themselves.
            logging.info("TikTalk build report (%s):\n%s", path.name, summary)


def build(
    manual_dir,
    data_dir,
    config: str = "dialogues",
    **config_overrides: Any,
) -> Builder:
    """Builds `tiktalk/<config>` in `data_dir` as ArrayRecord (reusing a build with equal options).

    See `tfds_builder.tiktalk.build` for the arguments.
    """

    def make() -> Builder:
        return Builder(config=config, data_dir=str(data_dir), config_overrides=config_overrides)

    builder = make()
    if builder.is_prepared():
        report_file = epath.Path(builder.data_dir) / REPORT_NAME
        previous = json.loads(report_file.read_text()) if report_file.exists() else {}
        previous = previous.get("options", {})
        wanted = _jsonable(builder.builder_config.content_options())
        changed = any(previous.get(k) != v for k, v in wanted.items())
        fmt = builder.info.file_format
        if changed or fmt is None or fmt.value != "array_record":
            # Same name and version, other content: TFDS would silently reuse the old files.
            logging.info("rebuilding tiktalk/%s (other options or file format)", config)
            builder.data_path.rmtree()
            builder = make()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir),
            # Statistics would be computed with tf.data; the build report has ours.
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
    )
    return builder


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options))
