"""Frozen-encoder feature extraction: `tiktalk/media` -> a features dataset keyed by video_id.

    python -m tiktalk_jax.extract --encoder=resnet101 --pretrained=/ckpt/resnet-101 \
        --data_dir=~/tensorflow_datasets --out_dir=/data/features/resnet101 [--split=train,val]
        [--batch_size=64] [--dtype=bfloat16] [--storage_dtype=bfloat16] [--shard_size=256]

Encoders (`--pretrained`: a local HF directory, a torchvggish weights FILE for vggish; without
it the encoder is a seeded random init, for tests and smoke runs only, and the run says so in
the log and in metadata.json) and their records (N = frames, or 0.96 s windows, of the video;
"float" is `--storage_dtype`):
  resnet18..resnet152   item: one frame (ResNet ImageProcessor).
                        features float[N, C] (pooled; C = 2048 for 50/101/152), times float32[N].
  vit_g (EVA ViT-g/14)  item: one frame (BLIP-2 ImageProcessor).
                        features float[257, 1408]: the frames' tokens averaged (BLIP-2_Video);
                        image_features float[257, 1408]: one frame's tokens (BLIP-2_Img);
                        image_frame int32 (which frame), times float32[N], num_frames int32.
  vggish                item: one 0.96 s log-mel example [96, 64].
                        features float[N, 128], times float32[N] (window starts, 0.96 * i).
  whisper[-size]        item: one 30 s log-mel chunk [80, 3000].
                        features float[N, d_model], times float32[N] (as vggish).

Every record also has `video_id: str`. Frames: all frames of the media record (the media build
samples `fps` frames per second, at most `max_frames`; both are copied into metadata.json).
BLIP-2_Img's frame is a seeded random choice per video,
`default_rng([seed, crc32(video_id)])`, so it does not depend on hosts or batch sizes. Whisper is
pooled onto VGGish's grid: its 20 ms encoder states (30 s chunks, concatenated over the valid
part of each chunk) are averaged over the same non-overlapping 0.96 s windows VGGish embeds, so
both audio feature types have one row per window and are interchangeable in a model. A video
without audio gets N = 0 rows and a `no_audio` note (`audio_shorter_than_window` when there is
audio but less than 0.96 s).

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
import hashlib
import io
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from tiktalk_jax import audio_features, features
from tiktalk_jax.image_preprocessing import ImageProcessor

Record = Mapping[str, Any]

VGGISH_WINDOW_S = 0.96
# Whisper encoder states per 0.96 s window: 20 ms each.
_WHISPER_STATES_PER_WINDOW = 48
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".json")
RANDOM_INIT_WARNING = (
    "RANDOM-INIT ENCODER: no --pretrained weights were given, so these features come from a "
    "seeded random initialisation and carry no pretrained knowledge. Use them only for tests "
    "and smoke runs."
)


class CorruptMedia(Exception):
    """A video that cannot be used; `reason` is a short report key."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


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


def decode_frame(frame: Any) -> np.ndarray:
    """JPEG bytes (or an already decoded array) -> uint8[H, W, 3] RGB."""
    if isinstance(frame, np.ndarray):
        return frame
    from PIL import Image

    with Image.open(io.BytesIO(frame)) as image:
        return np.asarray(image.convert("RGB"))


def decode_audio(record: Record) -> np.ndarray:
    """int16[N] samples at 16 kHz (empty when the video has no audio)."""
    audio = record.get("audio", b"")
    if isinstance(audio, np.ndarray):
        return audio.astype(np.int16, copy=False).reshape(-1)
    if len(audio) % 2:
        raise CorruptMedia("audio_undecodable", f"{len(audio)} bytes is not int16 samples")
    return np.frombuffer(audio, "<i2").astype(np.int16)


def audio_windows(num_samples: int) -> int:
    """Whole 0.96 s VGGish examples in `num_samples` 16 kHz samples (as `vggish_examples`)."""
    if num_samples < audio_features.VGGISH_WINDOW:
        return 0
    frames = 1 + (num_samples - audio_features.VGGISH_WINDOW) // audio_features.VGGISH_HOP
    return frames // audio_features.VGGISH_EXAMPLE_FRAMES


# ---------------------------------------------------------------------------------------------
# Encoders: host preprocessing, the jitted forward pass, per-video assembly.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    """One video, preprocessed on the host: `items[n, *item_shape]` go through the encoder."""

    items: np.ndarray
    context: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Encoder:
    """A frozen encoder with everything extraction needs.

    Attributes:
      name: "resnet101", "vit_g", "vggish", "whisper", ...
      model: the NNX module (weights frozen; never trained here).
      item_shape: the shape of one encoder input (a frame, an audio example or chunk).
      prepare: record -> `Prepared` (host; raises `CorruptMedia`).
      forward: (model, float[B, *item_shape]) -> float[B, ...], traced under jit.
      assemble: (video_id, Prepared, float32[n, ...] outputs) -> the record's arrays.
      feature_fields: the fields stored in the storage dtype.
      default_batch_size: items per host step when not given.
      metadata: what is recorded about the encoder (config, weights, preprocessing).
    """

    name: str
    modality: str
    model: nnx.Module
    item_shape: tuple[int, ...]
    prepare: Callable[[Record], Prepared]
    forward: Callable[[nnx.Module, jax.Array], jax.Array]
    assemble: Callable[[str, Prepared, np.ndarray], dict[str, np.ndarray]]
    feature_fields: tuple[str, ...]
    default_batch_size: int
    metadata: dict[str, Any]


def _frames_prepare(processor: ImageProcessor) -> Callable[[Record], Prepared]:
    def prepare(record: Record) -> Prepared:
        frames = list(record["frames"])
        if not frames:
            raise CorruptMedia("no_frames", "the media record has no frames")
        pixels = []
        for j, frame in enumerate(frames):
            try:
                image = decode_frame(frame)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
                raise CorruptMedia("frame_undecodable", f"frame {j}: {e!r}") from None
            pixels.append(processor(image))
        times = np.asarray(record.get("frame_times", np.arange(len(frames))), np.float32)
        if times.shape != (len(frames),):
            raise CorruptMedia("bad_frame_times", f"{times.shape} for {len(frames)} frames")
        return Prepared(np.stack(pixels), {"times": times})

    return prepare


def _resnet(name, pretrained, seed, dtype, overrides) -> Encoder:
    from tiktalk_jax.models.resnet import ResNet, ResNetConfig

    if pretrained:
        model = ResNet.from_pretrained(pretrained, dtype=dtype)
        processor = ImageProcessor.from_pretrained(pretrained, "resnet")
    else:
        cfg = dataclasses.replace(ResNetConfig.named(name), **overrides)
        model = ResNet.from_config(cfg, seed=seed, dtype=dtype)
        processor = ImageProcessor.for_encoder("resnet")

    def assemble(video_id, prep, out):
        del video_id
        return {"features": out, "times": prep.context["times"]}

    dim = model.feature_dim
    return Encoder(
        name=name,
        modality="image",
        model=model,
        item_shape=(*processor.output_size, 3),
        prepare=_frames_prepare(processor),
        forward=lambda m, x: m(x).pooler_output,
        assemble=assemble,
        feature_fields=("features",),
        default_batch_size=64,
        metadata=dict(
            model_config=dataclasses.asdict(model.config),
            preprocessing=dataclasses.asdict(processor),
            fields={
                "features": dict(shape=[None, dim], doc="pooled ResNet output per frame"),
                "times": dict(shape=[None], dtype="float32", doc="frame time in seconds"),
            },
        ),
    )


def _vit(name, pretrained, seed, dtype, overrides) -> Encoder:
    from tiktalk_jax.models.vit import VisionConfig, VisionTransformer

    if pretrained:
        model = VisionTransformer.from_pretrained(pretrained, dtype=dtype)
        processor = ImageProcessor.from_pretrained(pretrained, "blip2")
    else:
        cfg = dataclasses.replace(VisionConfig(), **overrides)
        model = VisionTransformer.from_config(cfg, seed=seed, dtype=dtype)
        processor = ImageProcessor.for_encoder("blip2")

    def assemble(video_id, prep, out):
        n = out.shape[0]
        # Seeded by the video, not by the order or host it was processed on.
        rng = np.random.default_rng([seed, zlib.crc32(video_id.encode("utf-8"))])
        k = int(rng.integers(n))
        return {
            "features": out.mean(axis=0),
            "image_features": out[k],
            "image_frame": np.int32(k),
            "times": prep.context["times"],
            "num_frames": np.int32(n),
        }

    tokens, dim = model.config.num_patches + 1, model.feature_dim
    return Encoder(
        name=name,
        modality="image",
        model=model,
        item_shape=(*processor.output_size, 3),
        prepare=_frames_prepare(processor),
        forward=lambda m, x: m(x).last_hidden_state,
        assemble=assemble,
        feature_fields=("features", "image_features"),
        default_batch_size=32,
        metadata=dict(
            model_config=dataclasses.asdict(model.config),
            preprocessing=dataclasses.asdict(processor),
            image_frame=f"default_rng([{seed}, crc32(video_id)]).integers(num_frames)",
            fields={
                "features": dict(shape=[tokens, dim], doc="mean over frames (BLIP-2_Video)"),
                "image_features": dict(shape=[tokens, dim], doc="one frame (BLIP-2_Img)"),
                "image_frame": dict(shape=[], dtype="int32", doc="index of that frame"),
                "times": dict(shape=[None], dtype="float32", doc="frame times in seconds"),
                "num_frames": dict(shape=[], dtype="int32", doc="frames averaged"),
            },
        ),
    )


def _audio_prepare_notes(record: Record, samples: np.ndarray, n: int) -> list[str]:
    if not record.get("has_audio", samples.size > 0) or samples.size == 0:
        return ["no_audio"]
    return ["audio_shorter_than_window"] if n == 0 else []


def _vggish(name, pretrained, seed, dtype, overrides) -> Encoder:
    from tiktalk_jax.models.vggish import VGGish, VGGishConfig

    if pretrained:
        model = VGGish.from_pretrained(pretrained, dtype=dtype)
    else:
        model = VGGish.from_config(dataclasses.replace(VGGishConfig(), **overrides), seed=seed,
                                   dtype=dtype)  # fmt: skip

    def prepare(record):
        samples = decode_audio(record)
        examples = audio_features.vggish_examples(samples)
        notes = _audio_prepare_notes(record, samples, examples.shape[0])
        return Prepared(examples, {}, notes)

    def assemble(video_id, prep, out):
        del video_id
        return {"features": out, "times": VGGISH_WINDOW_S * np.arange(len(out), dtype=np.float32)}

    cfg = model.config
    return Encoder(
        name=name,
        modality="audio",
        model=model,
        item_shape=(cfg.num_frames, cfg.num_bands),
        prepare=prepare,
        forward=lambda m, x: m(x),
        assemble=assemble,
        feature_fields=("features",),
        default_batch_size=64,
        metadata=dict(
            model_config=dataclasses.asdict(cfg),
            preprocessing=dict(
                front_end="audio_features.vggish_examples: 16 kHz, 25/10 ms, 64 HTK mel bands "
                "125-7500 Hz, log(mel + 0.01), non-overlapping 0.96 s examples (tail dropped)",
                pca=False,
            ),
            fields={
                "features": dict(shape=[None, model.feature_dim], doc="one per 0.96 s example"),
                "times": dict(shape=[None], dtype="float32", doc="window start in seconds"),
            },
        ),
    )


def _whisper(name, pretrained, seed, dtype, overrides) -> Encoder:
    from tiktalk_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig

    if pretrained:
        model = WhisperEncoder.from_pretrained(pretrained, dtype=dtype)
    else:
        size = name.removeprefix("whisper").removeprefix("-") or "tiny"
        cfg = dataclasses.replace(WhisperEncoderConfig.named(size), **overrides)
        model = WhisperEncoder.from_config(cfg, seed=seed, dtype=dtype)
    cfg = model.config
    if cfg.num_frames != audio_features.WHISPER_FRAMES:
        raise ValueError(f"Whisper encoders take {audio_features.WHISPER_FRAMES} mel frames")

    def prepare(record):
        samples = decode_audio(record)
        chunks, frames = audio_features.whisper_log_mel(samples, num_mel_bins=cfg.num_mel_bins)
        n = audio_windows(samples.size)
        notes = _audio_prepare_notes(record, samples, n)
        # The stride-2 conv halves the frames: valid states per chunk.
        return Prepared(chunks, {"valid": (frames + 1) // 2, "windows": n}, notes)

    def assemble(video_id, prep, out):
        del video_id
        n, w = prep.context["windows"], _WHISPER_STATES_PER_WINDOW
        states = [out[c, :v] for c, v in enumerate(prep.context["valid"])]
        states = np.concatenate(states) if states else np.zeros((0, out.shape[-1]), out.dtype)
        pooled = states[: n * w].reshape(n, w, states.shape[-1]).mean(axis=1)
        return {"features": pooled, "times": VGGISH_WINDOW_S * np.arange(n, dtype=np.float32)}

    return Encoder(
        name=name,
        modality="audio",
        model=model,
        item_shape=(cfg.num_mel_bins, cfg.num_frames),
        prepare=prepare,
        forward=lambda m, x: m(x),
        assemble=assemble,
        feature_fields=("features",),
        default_batch_size=8,
        metadata=dict(
            model_config=dataclasses.asdict(cfg),
            preprocessing=dict(
                front_end="audio_features.whisper_log_mel: 30 s chunks, 80/128 Slaney mel bins",
                pooling="encoder states (20 ms) averaged over VGGish's 0.96 s windows",
            ),
            fields={
                "features": dict(shape=[None, model.feature_dim], doc="one per 0.96 s window"),
                "times": dict(shape=[None], dtype="float32", doc="window start in seconds"),
            },
        ),
    )


def _family(name: str):
    if name.startswith("resnet"):
        return _resnet
    if name in ("vit_g", "eva_vit_g"):
        return _vit
    if name == "vggish":
        return _vggish
    if name == "whisper" or name.startswith("whisper-"):
        return _whisper
    raise ValueError(
        f"unknown encoder {name!r}: resnet18..resnet152, vit_g, vggish, whisper[-size]"
    )


def _sha256(paths: Sequence[str]) -> str:
    """One digest over the named files (name and content, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def weights_info(pretrained: str | None, seed: int) -> dict[str, Any]:
    """What metadata.json says about the weights: path + sha256, or the random-init seed."""
    if not pretrained:
        return {"random_init": True, "weights": f"random-init seed={seed}"}
    path = os.path.abspath(pretrained)
    if os.path.isdir(path):
        files = [
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(path, n))
        ]
    else:
        files = [path]
    return {"random_init": False, "weights": path, "sha256": _sha256(files)}


def build_encoder(
    name: str,
    pretrained: str | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
    model_config: Mapping[str, Any] | None = None,
) -> Encoder:
    """The named encoder, from `pretrained` or (loudly) a seeded random init.

    Args:
      name: resnet18..resnet152, vit_g, vggish, whisper or whisper-<size>.
      pretrained: a local HF directory (vggish: a torchvggish weights file); None = random init.
      seed: the random-init seed (and the BLIP-2_Img frame choice).
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      model_config: overrides of the random-init model config (tiny models for tests).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (model_config or {}).items()}
    if pretrained and overrides:
        raise ValueError("model_config overrides only apply to a random-init encoder")
    encoder = _family(name)(name, pretrained, seed, _DTYPES[dtype], overrides)
    info = weights_info(pretrained, seed)
    if info["random_init"]:
        logging.warning("%s\n%s\n%s", "!" * 80, f"{name}: {RANDOM_INIT_WARNING}", "!" * 80)
        info["warning"] = RANDOM_INIT_WARNING
    encoder.metadata = dict(
        encoder=name, modality=encoder.modality, seed=seed, compute_dtype=dtype,
        **info, **encoder.metadata,
    )  # fmt: skip
    return encoder


# ---------------------------------------------------------------------------------------------
# The extraction loop.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Video:
    index: int
    video_id: str
    prepared: Prepared | None = None
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
    except CorruptMedia as e:
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
    store = np.dtype(_DTYPES[storage_dtype])
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
                "model_config", "preprocessing", "media_dir")  # fmt: skip


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
    if storage_dtype not in _DTYPES:
        raise ValueError(f"storage_dtype must be one of {sorted(_DTYPES)}, got {storage_dtype!r}")
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
        logging.warning("%s: %s", out_dir, RANDOM_INIT_WARNING)
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
    flags.DEFINE_string("encoder", "resnet101", "resnet18..152, vit_g, vggish, whisper[-size]", **f)
    flags.DEFINE_string(
        "pretrained", None, "Local HF dir (vggish: weights file); unset = random init (LOUD).", **f
    )
    flags.DEFINE_string("data_dir", None, "TFDS data dir holding tiktalk/media.", **f)
    flags.DEFINE_string("media_dataset", "tiktalk/media", "Name of the media dataset.", **f)
    flags.DEFINE_string("out_dir", None, "Features dir (default DATA_DIR/features/ENCODER).", **f)
    flags.DEFINE_list("split", None, "Splits to extract (default: all media splits).", **f)
    flags.DEFINE_integer("batch_size", 0, "Items (frames, audio examples) per host step.", **f)
    flags.DEFINE_enum("dtype", "float32", sorted(_DTYPES), "Compute dtype.", **f)
    flags.DEFINE_enum("storage_dtype", None, sorted(_DTYPES), "Stored dtype (default dtype).", **f)
    flags.DEFINE_integer("shard_size", 256, "Videos per shard (the unit of resumption).", **f)
    flags.DEFINE_integer("num_threads", 0, "Host decoding threads; 0 = min(8, cores).", **f)
    flags.DEFINE_integer("seed", 0, "Random-init seed; seed of the BLIP-2_Img frame.", **f)
    flags.DEFINE_string("model_config", None, "JSON overrides of a random-init config.", **f)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", **f)


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
    encoder = build_encoder(
        fv.encoder, fv.pretrained, seed=fv.seed, dtype=fv.dtype,
        model_config=json.loads(fv.model_config) if fv.model_config else None,
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
