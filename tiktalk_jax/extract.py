"""Frozen-encoder feature extraction: `tiktalk/media` -> a features dataset keyed by video_id.

    python -m tiktalk_jax.extract --encoder=resnet101 --pretrained=/ckpt/resnet-101 \
        --data_dir=~/tensorflow_datasets --out_dir=/data/features/resnet101 [--split=train,val]
        [--batch_size=64] [--dtype=bfloat16] [--storage_dtype=bfloat16] [--shard_size=256]
        [--frame_tokens=8 (vit_g: per-frame tokens for BLIP-2's temporal variant)]

Encoders: resnet18..resnet152, vit_g (EVA ViT-g/14), vggish, whisper[-size]; their
preprocessing and the arrays of their records are documented in `tiktalk_jax.encoders`.
`--pretrained` is a local HF directory (vggish: a torchvggish weights FILE); without it the
encoder is a seeded random init, for tests and smoke runs only, and the run says so in the log
and in metadata.json. Every record also has `video_id: str`. Frames: all frames of the media
record (the media build samples `fps` frames per second, at most `max_frames`; both are copied
into metadata.json).

How it runs:
- Videos are split over hosts by record index (host i takes i, i + hosts, ...). Each host runs
  its share on a mesh of its LOCAL devices, data-parallel over a "data" axis. Extraction needs
  no communication between devices, so a host-local mesh avoids lock-stepping hosts whose shares
  take different times, and lets every host finish, fail and resume independently.
- Host threads read records, decode JPEG frames (or audio) and preprocess them; items of
  consecutive videos are packed into batches of a fixed `batch_size` (the last one padded with
  zeros), so the jitted encoder compiles once for the whole run. The next batch is dispatched
  before the previous one is fetched, overlapping host and device work.
- Resumable: records go into shards of `shard_size` videos (see `tiktalk_jax.features`); a
  re-run skips the videos of every finished shard and loses at most the unfinished one.
- A video whose record cannot be read, whose frames do not decode, or that has no frames is
  recorded as failed (reason + message in the shard index and report.json) and skipped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from tiktalk_jax import audio_features, encoders, features
from tiktalk_jax.encoders import Encoder, Record

# ---------------------------------------------------------------------------------------------
# Reading the media dataset.
# ---------------------------------------------------------------------------------------------


class MediaRecords(Sequence):
    """Random access to `tiktalk/media` records with frames left as JPEG bytes.

    The TFDS data source decodes every frame when a record is read, so one bad JPEG would make the
    whole record unreadable; parsing the stored tf.train.Example here instead lets the extractor
    decode frame by frame and report exactly what failed. Records: video_id (bytes),
    frames (list of JPEG bytes), frame_times float32[N], audio (raw int16 bytes), has_audio,
    duration.
    """

    def __init__(self, raw: Sequence[bytes]):
        self.raw = raw  # the ArrayRecord data source of one split

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from tensorflow_datasets.proto import tf_example_pb2

        feature = tf_example_pb2.Example.FromString(self.raw[index]).features.feature

        def values(key, kind):
            return getattr(feature[key], kind).value if key in feature else []

        audio = values("audio", "bytes_list")
        has_audio = values("has_audio", "int64_list")
        duration = values("duration", "float_list")
        return {
            "video_id": feature["video_id"].bytes_list.value[0],
            "frames": list(values("frames", "bytes_list")),
            "frame_times": np.asarray(values("frame_times", "float_list"), np.float32),
            "audio": audio[0] if audio else b"",
            "has_audio": bool(has_audio[0]) if has_audio else bool(audio and audio[0]),
            "duration": float(duration[0]) if duration else 0.0,
        }


def media_dir(data_dir: str | None, dataset: str = "tiktalk/media") -> str:
    from tiktalk_jax import input_pipeline

    return input_pipeline.dataset_dir(data_dir, dataset)


def open_media(version_dir: str, split: str) -> MediaRecords:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(version_dir)
    return MediaRecords(builder.as_data_source(split=split).data_source)


def media_splits(version_dir: str) -> list[str]:
    import tensorflow_datasets as tfds

    return list(tfds.builder_from_directory(version_dir).info.splits.keys())


def _media_options(version_dir: str) -> dict[str, Any]:
    """The options of the media build (fps, max_frames, ...) from its build report, if any."""
    from tfds_builder.tiktalk.report import REPORT_NAME

    path = os.path.join(version_dir, REPORT_NAME)
    return features.read_json(path).get("options", {}) if os.path.isfile(path) else {}


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# The extraction loop.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Video:
    index: int
    video_id: str
    prepared: encoders.Prepared | None = None
    error: tuple[str, str] | None = None
    skipped: bool = False
    outputs: np.ndarray | None = None
    remaining: int = 0


class Runner:
    """The encoder jitted over a host-local data-parallel mesh, with a fixed batch shape."""

    def __init__(self, encoder: Encoder, devices: Sequence[jax.Device], batch_size: int | None):
        n = len(devices)
        batch_size = batch_size or encoder.default_batch_size
        self.batch_size = -(-batch_size // n) * n  # every device gets the same number of items
        self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        P = jax.sharding.PartitionSpec
        self.data_sharding = jax.sharding.NamedSharding(self.mesh, P("data"))
        graphdef, state = nnx.split(encoder.model)
        # Parameters are passed as arguments (not closed over) so they are not baked into HLO.
        self.state = jax.device_put(state, jax.sharding.NamedSharding(self.mesh, P()))
        forward = encoder.forward

        def step(state, items):
            return forward(nnx.merge(graphdef, state), items)

        self.step = jax.jit(step, out_shardings=self.data_sharding)
        self.item_shape = encoder.item_shape

    def __call__(self, items: np.ndarray) -> jax.Array:
        """float32[batch_size, *item_shape] -> outputs (asynchronously dispatched)."""
        return self.step(self.state, jax.device_put(items, self.data_sharding))

    @functools.cached_property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one item's output (e.g. (2048,) or (257, 1408))."""
        items = jax.ShapeDtypeStruct((self.batch_size, *self.item_shape), jnp.float32)
        return tuple(jax.eval_shape(self.step, self.state, items).shape[1:])

    @property
    def compilations(self) -> int:
        return self.step._cache_size()


def _prepare_video(source, index: int, encoder: Encoder, done: set[str]) -> _Video:
    try:
        record = source[index]
        video_id = _text(record["video_id"])
    except Exception as e:
        # Its video id is unknown, so no done-list can name it: the next run tries it again.
        return _Video(index, f"<record {index}>", error=("record_unreadable", repr(e)))
    if video_id in done:
        return _Video(index, video_id, skipped=True)
    try:
        prepared = encoder.prepare(record)
    except encoders.CorruptMedia as e:
        return _Video(index, video_id, error=(e.reason, e.message))
    except Exception as e:  # preprocessing must never stop the run: report and move on
        return _Video(index, video_id, error=("preprocessing_failed", repr(e)))
    if prepared.items.shape[1:] != encoder.item_shape:
        return _Video(index, video_id, error=("bad_item_shape", str(prepared.items.shape)))
    return _Video(index, video_id, prepared=prepared, remaining=len(prepared.items))


def _prepared_stream(source, indices, encoder, done, num_threads: int, lookahead: int):
    """`_prepare_video` over `indices` on a thread pool, in order, at most `lookahead` ahead."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
    pending: collections.deque = collections.deque()
    try:
        for index in indices:
            pending.append(pool.submit(_prepare_video, source, index, encoder, done))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _to_storage(encoder: Encoder, record: dict[str, Any], storage_dtype) -> dict[str, Any]:
    for k in encoder.feature_fields:
        record[k] = np.asarray(record[k], np.float32).astype(storage_dtype)
    return record


def extract_split(
    encoder: Encoder,
    source: Sequence[Record],
    out_dir: str,
    split: str,
    *,
    devices: Sequence[jax.Device] | None = None,
    batch_size: int | None = None,
    runner: Runner | None = None,
    storage_dtype: str = "float32",
    shard_size: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Extracts this host's share of `source` (records of the `tiktalk/media` schema) into
    `out_dir/split/`, skipping videos already done. Returns this run's counts.

    `devices` default to the host's local devices; `process_*` to jax's. A `runner` (the jitted
    encoder on its mesh, compiled by an earlier split) replaces `devices` and `batch_size`.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if runner is None:
        runner = Runner(encoder, devices or jax.local_devices(), batch_size)
    store = np.dtype(encoders.DTYPES[storage_dtype])
    bs = runner.batch_size
    done = features.done_ids(out_dir, split)
    writer = features.ShardWriter(out_dir, split, pi, shard_size)
    indices = range(pi, len(source), pc)
    counts = collections.Counter()
    threads = num_threads or min(8, os.cpu_count() or 1)

    inflight: collections.deque[_Video] = collections.deque()  # stream order = write order
    queue: list[tuple[_Video, int]] = []  # items waiting for a batch
    pending = None  # (device outputs, slots) of the last dispatched batch

    from tqdm import tqdm

    bar = tqdm(total=len(indices), desc=f"{encoder.name} {split}", unit="video",
               disable=not progress, file=sys.stderr)  # fmt: skip

    def collect():
        nonlocal pending
        if pending is None:
            return
        out, slots = pending
        pending = None
        out = np.asarray(out).astype(np.float32)
        for k, (video, j) in enumerate(slots):
            if video.outputs is None:
                video.outputs = np.empty((len(video.prepared.items), *out.shape[1:]), np.float32)
            video.outputs[j] = out[k]
            video.remaining -= 1

    def dispatch(slots):
        nonlocal pending
        items = np.zeros((bs, *encoder.item_shape), np.float32)
        for k, (video, j) in enumerate(slots):
            items[k] = video.prepared.items[j]
        out = runner(items)  # runs while the previous batch is fetched below
        collect()
        pending = (out, slots)
        counts["batches"] += 1
        counts["items"] += len(slots)

    def drain():
        while inflight and (inflight[0].error or inflight[0].remaining == 0):
            video = inflight.popleft()
            if video.error:
                reason, message = video.error
                logging.warning("%s %s: skipped (%s) %s", split, video.video_id, reason, message)
                writer.fail(video.video_id, reason, message)
                counts["failed"] += 1
            else:
                prep = video.prepared
                outputs = video.outputs
                if outputs is None:  # no items (e.g. no audio): the encoder never ran
                    outputs = np.zeros((0, *runner.output_shape), np.float32)
                record = encoder.assemble(video.video_id, prep, outputs)
                record = _to_storage(encoder, {"video_id": video.video_id, **record}, store)
                writer.add(record, prep.notes)
                counts["written"] += 1
            video.prepared = video.outputs = None
            bar.update(1)

    start = time.monotonic()
    stream = _prepared_stream(source, indices, encoder, done, threads, lookahead=2 * threads)
    # closing(): on an error the reader threads stop now, not when the generator is collected.
    with contextlib.closing(stream), bar:
        for video in stream:
            if video.skipped:
                counts["already_done"] += 1
                bar.update(1)
                continue
            inflight.append(video)
            if video.prepared is not None:
                queue.extend((video, j) for j in range(len(video.prepared.items)))
            while len(queue) >= bs:
                dispatch(queue[:bs])
                queue = queue[bs:]
            drain()
        if queue:
            dispatch(queue)
        collect()
        drain()
        writer.close()
    seconds = time.monotonic() - start
    stats = dict(
        host=pi, hosts=pc, devices=runner.mesh.size, batch_size=bs, media_records=len(source),
        host_videos=len(indices), written=counts["written"], failed=counts["failed"],
        already_done=counts["already_done"], items=counts["items"], batches=counts["batches"],
        compilations=runner.compilations, seconds=round(seconds, 3),
        videos_per_s=round((counts["written"] + counts["failed"]) / max(seconds, 1e-9), 3),
        items_per_s=round(counts["items"] / max(seconds, 1e-9), 3),
    )  # fmt: skip
    logging.info("%s %s: %s", encoder.name, split, json.dumps(stats))
    return stats


# ---------------------------------------------------------------------------------------------
# A whole features dataset: metadata, all splits, report.
# ---------------------------------------------------------------------------------------------

# Metadata fields that must match for a re-run to add to an existing features dataset.
_FINGERPRINT = ("encoder", "weights", "sha256", "seed", "compute_dtype", "storage_dtype",
                "model_config", "preprocessing", "media_dir", "frame_tokens")  # fmt: skip


def _check_or_write_metadata(out_dir: str, metadata: dict[str, Any]) -> None:
    path = os.path.join(out_dir, features.METADATA_NAME)
    if os.path.isfile(path):
        old = features.read_json(path)
        new = json.loads(json.dumps(metadata))
        diff = [k for k in _FINGERPRINT if old.get(k) != new.get(k)]
        if diff:
            raise ValueError(
                f"{out_dir} holds features made with other {diff}; resume only with the same "
                "encoder, weights and options (or choose a new --out_dir)"
            )
        return
    os.makedirs(out_dir, exist_ok=True)
    features.write_json(path, metadata)


def write_report(out_dir: str, sizes: Mapping[str, int], runs: Mapping[str, Any]) -> dict:
    """Aggregates the shard indexes of the splits in `sizes` (split -> media records) into
    `report.json`, keeping what an earlier report says of other splits; returns the report."""
    metadata = features.read_metadata(out_dir)
    path = os.path.join(out_dir, features.REPORT_NAME)
    old = features.read_json(path) if os.path.isfile(path) else {"splits": {}, "last_run": {}}
    report = dict(
        encoder=metadata["encoder"], random_init=metadata["random_init"],
        splits={k: v for k, v in old["splits"].items() if k not in sizes},
        last_run={**{k: v for k, v in old["last_run"].items() if k not in runs}, **runs},
    )  # fmt: skip
    for split, size in sizes.items():
        written: set[str] = set()
        last_failure: dict[str, dict[str, str]] = {}  # a record unreadable twice counts once
        notes = collections.defaultdict(list)
        for index in features.shard_indexes(out_dir, split):
            written.update(index["videos"])
            last_failure.update((f["video_id"], f) for f in index["failed"])
            for n in index["notes"]:
                notes[n["note"]].append(n["video_id"])
        failures = [f for v, f in last_failure.items() if v not in written]
        failed = collections.defaultdict(list)
        for f in failures:
            failed[f["reason"]].append(f["video_id"])
        report["splits"][split] = dict(
            media_videos=size, written=len(written), failed=dict(failed), failures=failures,
            notes=dict(notes), not_done=size - len(written) - len(failures),
        )  # fmt: skip
    features.write_json(path, report)
    return report


def extract_dataset(
    encoder: Encoder,
    sources: Mapping[str, Sequence[Record]],
    out_dir: str,
    *,
    storage_dtype: str = "float32",
    media: Mapping[str, Any] | None = None,
    **kwargs,
) -> dict[str, Any]:
    """Runs `extract_split` on every split of `sources` into one features dataset.

    Writes metadata.json first (or checks it matches, when resuming) and report.json last.
    `media`: where the records came from (dir, build options), copied into the metadata.
    `kwargs` go to `extract_split`. Returns the report.
    """
    if storage_dtype not in encoders.DTYPES:
        raise ValueError(
            f"storage_dtype must be one of {sorted(encoders.DTYPES)}, got {storage_dtype!r}"
        )
    media = dict(media or {})
    rate = media.get("options", {}).get("sample_rate", audio_features.SAMPLE_RATE)
    if encoder.modality == "audio" and rate != audio_features.SAMPLE_RATE:
        raise ValueError(
            f"the media dataset stores {rate} Hz audio; the audio front ends read the stored "
            f"samples as {audio_features.SAMPLE_RATE} Hz: rebuild it with sample_rate=16000"
        )
    metadata = dict(encoder.metadata)
    fields = {}
    for k, v in metadata["fields"].items():
        dtype = storage_dtype if k in encoder.feature_fields else v.get("dtype")
        fields[k] = {**v, "dtype": dtype}
    metadata.update(
        fields=fields, storage_dtype=storage_dtype, media_dir=media.get("dir"),
        media_options=media.get("options", {}),
        frames="every frame of the media record" if encoder.modality == "image" else None,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions={"jax": jax.__version__, "flax": _version("flax")},
        format="tiktalk_jax.features/1",
    )  # fmt: skip
    _check_or_write_metadata(out_dir, metadata)
    # One runner for all splits: the encoder is placed on the devices and compiled once.
    runner = Runner(
        encoder, kwargs.pop("devices", None) or jax.local_devices(), kwargs.pop("batch_size", None)
    )
    runs = {}
    for split, source in sources.items():
        runs[split] = extract_split(
            encoder, source, out_dir, split, runner=runner, storage_dtype=storage_dtype, **kwargs
        )
    report = write_report(out_dir, {s: len(src) for s, src in sources.items()}, runs)
    for split, r in report["splits"].items():
        logging.info(
            "%s %s: %d written, failed %s, notes %s, not done %d", encoder.name, split,
            r["written"], {k: len(v) for k, v in r["failed"].items()},
            {k: len(v) for k, v in r["notes"].items()}, r["not_done"],
        )  # fmt: skip
    if metadata["random_init"]:
        logging.warning("%s: %s", out_dir, encoders.RANDOM_INIT_WARNING)
    return report


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _define_flags(fv: flags.FlagValues) -> None:
    # A private FlagValues: importing this module (tests, notebooks) must not claim common flag
    # names such as --batch_size in the global absl FLAGS of another entry point.
    f = dict(flag_values=fv)
    dtypes = sorted(encoders.DTYPES)
    flags.DEFINE_string("encoder", "resnet101", "resnet18..152, vit_g, vggish, whisper[-size]", **f)
    flags.DEFINE_string(
        "pretrained", None, "Local HF dir (vggish: weights file); unset = random init (LOUD).", **f
    )
    flags.DEFINE_string("data_dir", None, "TFDS data dir holding tiktalk/media.", **f)
    flags.DEFINE_string("media_dataset", "tiktalk/media", "Name of the media dataset.", **f)
    flags.DEFINE_string("out_dir", None, "Features dir (default DATA_DIR/features/ENCODER).", **f)
    flags.DEFINE_list("split", None, "Splits to extract (default: all media splits).", **f)
    flags.DEFINE_integer("batch_size", 0, "Items (frames, audio examples) per host step.", **f)
    flags.DEFINE_enum("dtype", "float32", dtypes, "Compute dtype.", **f)
    flags.DEFINE_enum("storage_dtype", None, dtypes, "Stored dtype (default dtype).", **f)
    flags.DEFINE_integer("shard_size", 256, "Videos per shard (the unit of resumption).", **f)
    flags.DEFINE_integer("num_threads", 0, "Host decoding threads; 0 = min(8, cores).", **f)
    flags.DEFINE_integer("seed", 0, "Random-init seed; seed of the BLIP-2_Img frame.", **f)
    flags.DEFINE_string("model_config", None, "JSON overrides of a random-init config.", **f)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", **f)
    flags.DEFINE_integer(
        "frame_tokens", 0, "vit_g: also store the tokens of this many frames per video "
        "(frame_features, BLIP-2 temporal variant); 0 = off.", **f,
    )  # fmt: skip


def main(argv: Sequence[str]) -> dict[str, Any] | None:
    """`argv[0]` is the program name; returns the report (None for --help)."""
    fv = flags.FlagValues()
    _define_flags(fv)
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(f"{__doc__.split(chr(10))[0]}\n\nflags:\n{fv.get_help()}")
        return None
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        raise app.UsageError(str(e)) from None
    if len(rest) > 1:
        raise app.UsageError(f"unexpected arguments {rest[1:]}")
    logging.set_verbosity(logging.INFO)
    version_dir = media_dir(fv.data_dir, fv.media_dataset)
    splits = fv.split or media_splits(version_dir)
    data_root = os.path.dirname(os.path.dirname(os.path.dirname(version_dir)))
    out_dir = fv.out_dir or os.path.join(data_root, "features", fv.encoder)
    encoder = encoders.build_encoder(
        fv.encoder, fv.pretrained, seed=fv.seed, dtype=fv.dtype,
        model_config=json.loads(fv.model_config) if fv.model_config else None,
        frame_tokens=fv.frame_tokens,
    )  # fmt: skip
    report = extract_dataset(
        encoder, {s: open_media(version_dir, s) for s in splits}, out_dir,
        storage_dtype=fv.storage_dtype or fv.dtype,
        media=dict(dir=version_dir, options=_media_options(version_dir)),
        batch_size=fv.batch_size or None, shard_size=fv.shard_size,
        num_threads=fv.num_threads or None, progress=fv.progress,
    )  # fmt: skip
    summary = {
        s: dict(written=r["written"], not_done=r["not_done"],
                failed={k: len(v) for k, v in r["failed"].items()})
        for s, r in report["splits"].items()
    }  # fmt: skip
    print(json.dumps(summary))
    print(f"features: {out_dir}")
    return report


if __name__ == "__main__":
    try:
        main(sys.argv)
    except app.UsageError as e:
        sys.exit(f"usage error: {e} (see --help)")
