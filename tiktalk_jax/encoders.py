"""Frozen encoders for feature extraction: preprocessing, forward pass, per-video records.

`build_encoder(name, pretrained)` wraps one of the models in `tiktalk_jax.models` with what
`tiktalk_jax.extract` needs to turn a `tiktalk/media` record into a features record:

    record --prepare (host)--> Prepared.items[n, *item_shape] --forward (device, batched over
    videos)--> float32[n, ...] --assemble (host)--> {"features": ..., "times": ..., ...}

Encoders (`pretrained`: a local HF directory, a torchvggish weights FILE for vggish; without it
the encoder is a seeded random init, for tests and smoke runs only, and says so in the log and
in its metadata) and their records (N = frames, or 0.96 s windows, of the video; "float" is
the storage dtype):
  resnet18..resnet152   item: one frame (ResNet ImageProcessor).
                        features float[N, C] (pooled; C = 2048 for 50/101/152), times float32[N].
  vit_g (EVA ViT-g/14)  item: one frame (BLIP-2 ImageProcessor).
                        features float[257, 1408]: the frames' tokens averaged (BLIP-2_Video);
                        image_features float[257, 1408]: one frame's tokens (BLIP-2_Img);
                        image_frame int32 (which frame), times float32[N], num_frames int32.
                        With `frame_tokens=K` (BLIP-2's temporal variant) also
                        frame_features float[min(K, N), 257, 1408]: the tokens of K frames spread
                        evenly over the video (time order), frame_indices int32[min(K, N)].
  vggish                item: one 0.96 s log-mel example [96, 64].
                        features float[N, 128], times float32[N] (window starts, 0.96 * i).
  whisper[-size]        item: one 30 s log-mel chunk [80, 3000].
                        features float[N, d_model], times float32[N] (as vggish).

Frames: all frames of the media record. BLIP-2_Img's frame is a seeded random choice per video,
`default_rng([seed, crc32(video_id)])`, so it does not depend on hosts or batch sizes. Whisper is
pooled onto VGGish's grid: its 20 ms encoder states (30 s chunks, concatenated over the valid
part of each chunk) are averaged over the same non-overlapping 0.96 s windows VGGish embeds, so
both audio feature types have one row per window and are interchangeable in a model. A video
without audio gets N = 0 rows and a `no_audio` note (`audio_shorter_than_window` when there is
audio but less than 0.96 s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from tiktalk_jax import audio_features
from tiktalk_jax.image_preprocessing import ImageProcessor

Record = Mapping[str, Any]

VGGISH_WINDOW_S = 0.96
# Whisper encoder states per 0.96 s window: 20 ms each.
_WHISPER_STATES_PER_WINDOW = 48
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
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
      modality: "image" or "audio".
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


# ---------------------------------------------------------------------------------------------
# Decoding media record fields.
# ---------------------------------------------------------------------------------------------


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
# The encoder families.
# ---------------------------------------------------------------------------------------------


def _load(model_cls, default_config: Callable[[], Any], pretrained, seed, dtype, overrides):
    """`model_cls` from `pretrained`, or seeded random init of the overridden default config."""
    if pretrained:
        return model_cls.from_pretrained(pretrained, dtype=dtype)
    cfg = dataclasses.replace(default_config(), **overrides)
    return model_cls.from_config(cfg, seed=seed, dtype=dtype)


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


def _image_encoder(name, model, pretrained, kind: str, *, forward, assemble, feature_fields,
                   default_batch_size, fields, **metadata) -> Encoder:  # fmt: skip
    """An encoder of every frame, preprocessed by the `kind` ("resnet", "blip2") processor.

    `metadata`: entries recorded besides the preprocessing and the `fields` of a record.
    """
    if pretrained:
        processor = ImageProcessor.from_pretrained(pretrained, kind)
    else:
        processor = ImageProcessor.for_encoder(kind)
    return Encoder(
        name=name,
        modality="image",
        model=model,
        item_shape=(*processor.output_size, 3),
        prepare=_frames_prepare(processor),
        forward=forward,
        assemble=assemble,
        feature_fields=feature_fields,
        default_batch_size=default_batch_size,
        metadata=dict(preprocessing=dataclasses.asdict(processor), **metadata, fields=fields),
    )


def _resnet(name, pretrained, seed, dtype, overrides) -> Encoder:
    from tiktalk_jax.models.resnet import ResNet, ResNetConfig

    model = _load(ResNet, lambda: ResNetConfig.named(name), pretrained, seed, dtype, overrides)

    def assemble(video_id, prep, out):
        del video_id
        return {"features": out, "times": prep.context["times"]}

    return _image_encoder(
        name, model, pretrained, "resnet",
        forward=lambda m, x: m(x).pooler_output, assemble=assemble,
        feature_fields=("features",), default_batch_size=64,
        fields={
            "features": dict(shape=[None, model.feature_dim], doc="pooled ResNet output per frame"),
            "times": dict(shape=[None], dtype="float32", doc="frame time in seconds"),
        },
    )  # fmt: skip


def spread_frames(n: int, k: int) -> np.ndarray:
    """`min(n, k)` frame indices spread evenly over `n` frames, in time order (all if n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, k)).astype(np.int64)


def _vit(name, pretrained, seed, dtype, overrides, frame_tokens: int = 0) -> Encoder:
    from tiktalk_jax.models.vit import VisionConfig, VisionTransformer

    model = _load(VisionTransformer, VisionConfig, pretrained, seed, dtype, overrides)

    def assemble(video_id, prep, out):
        n = out.shape[0]
        # Seeded by the video, not by the order or host it was processed on.
        rng = np.random.default_rng([seed, zlib.crc32(video_id.encode("utf-8"))])
        k = int(rng.integers(n))
        record = {
            "features": out.mean(axis=0),
            "image_features": out[k],
            "image_frame": np.int32(k),
            "times": prep.context["times"],
            "num_frames": np.int32(n),
        }
        if frame_tokens:
            picked = spread_frames(n, frame_tokens)
            record["frame_features"] = out[picked]
            record["frame_indices"] = picked.astype(np.int32)
        return record

    tokens, dim = model.config.num_patches + 1, model.feature_dim
    fields = {
        "features": dict(shape=[tokens, dim], doc="mean over frames (BLIP-2_Video)"),
        "image_features": dict(shape=[tokens, dim], doc="one frame (BLIP-2_Img)"),
        "image_frame": dict(shape=[], dtype="int32", doc="index of that frame"),
        "times": dict(shape=[None], dtype="float32", doc="frame times in seconds"),
        "num_frames": dict(shape=[], dtype="int32", doc="frames averaged"),
    }
    stored, extra = ("features", "image_features"), {}
    if frame_tokens:
        stored += ("frame_features",)
        # Recorded only when used, so datasets extracted before the option existed still resume.
        extra["frame_tokens"] = frame_tokens
        fields["frame_features"] = dict(
            shape=[None, tokens, dim],
            doc=f"tokens of up to {frame_tokens} frames spread over the video (BLIP-2 temporal)",
        )
        fields["frame_indices"] = dict(shape=[None], dtype="int32", doc="which frames")
    return _image_encoder(
        name, model, pretrained, "blip2",
        forward=lambda m, x: m(x).last_hidden_state, assemble=assemble,
        feature_fields=stored, default_batch_size=32,
        image_frame=f"default_rng([{seed}, crc32(video_id)]).integers(num_frames)",
        fields=fields, **extra,
    )  # fmt: skip


def _audio_notes(record: Record, samples: np.ndarray, n: int) -> list[str]:
    if not record.get("has_audio", samples.size > 0) or samples.size == 0:
        return ["no_audio"]
    return ["audio_shorter_than_window"] if n == 0 else []


def _window_times(n: int) -> np.ndarray:
    """float32[n]: the starts of the first `n` 0.96 s windows, in seconds."""
    return VGGISH_WINDOW_S * np.arange(n, dtype=np.float32)


def _audio_encoder(name, model, item_shape, prepare, assemble, *, default_batch_size, doc,
                   **preprocessing) -> Encoder:  # fmt: skip
    """An audio encoder whose records are `features` per 0.96 s window and their `times`."""
    return Encoder(
        name=name,
        modality="audio",
        model=model,
        item_shape=item_shape,
        prepare=prepare,
        forward=lambda m, x: m(x),
        assemble=assemble,
        feature_fields=("features",),
        default_batch_size=default_batch_size,
        metadata=dict(
            preprocessing=preprocessing,
            fields={
                "features": dict(shape=[None, model.feature_dim], doc=doc),
                "times": dict(shape=[None], dtype="float32", doc="window start in seconds"),
            },
        ),
    )


def _vggish(name, pretrained, seed, dtype, overrides) -> Encoder:
    from tiktalk_jax.models.vggish import VGGish, VGGishConfig

    model = _load(VGGish, VGGishConfig, pretrained, seed, dtype, overrides)

    def prepare(record):
        samples = decode_audio(record)
        examples = audio_features.vggish_examples(samples)
        return Prepared(examples, {}, _audio_notes(record, samples, examples.shape[0]))

    def assemble(video_id, prep, out):
        del video_id, prep
        return {"features": out, "times": _window_times(len(out))}

    cfg = model.config
    return _audio_encoder(
        name, model, (cfg.num_frames, cfg.num_bands), prepare, assemble,
        default_batch_size=64, doc="one per 0.96 s example",
        front_end="audio_features.vggish_examples: 16 kHz, 25/10 ms, 64 HTK mel bands "
        "125-7500 Hz, log(mel + 0.01), non-overlapping 0.96 s examples (tail dropped)",
        pca=False,
    )  # fmt: skip


def _whisper(name, pretrained, seed, dtype, overrides) -> Encoder:
    from tiktalk_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig

    size = name.removeprefix("whisper").removeprefix("-") or "tiny"
    model = _load(
        WhisperEncoder, lambda: WhisperEncoderConfig.named(size), pretrained, seed, dtype, overrides
    )
    cfg = model.config
    if cfg.num_frames != audio_features.WHISPER_FRAMES:
        raise ValueError(f"Whisper encoders take {audio_features.WHISPER_FRAMES} mel frames")

    def prepare(record):
        samples = decode_audio(record)
        chunks, frames = audio_features.whisper_log_mel(samples, num_mel_bins=cfg.num_mel_bins)
        n = audio_windows(samples.size)
        notes = _audio_notes(record, samples, n)
        # The stride-2 conv halves the frames: valid states per chunk.
        return Prepared(chunks, {"valid": (frames + 1) // 2, "windows": n}, notes)

    def assemble(video_id, prep, out):
        del video_id
        n, w = prep.context["windows"], _WHISPER_STATES_PER_WINDOW
        states = [out[c, :v] for c, v in enumerate(prep.context["valid"])]
        states = np.concatenate(states) if states else np.zeros((0, out.shape[-1]), out.dtype)
        pooled = states[: n * w].reshape(n, w, states.shape[-1]).mean(axis=1)
        return {"features": pooled, "times": _window_times(n)}

    return _audio_encoder(
        name, model, (cfg.num_mel_bins, cfg.num_frames), prepare, assemble,
        default_batch_size=8, doc="one per 0.96 s window",
        front_end="audio_features.whisper_log_mel: 30 s chunks, 80/128 Slaney mel bins",
        pooling="encoder states (20 ms) averaged over VGGish's 0.96 s windows",
    )  # fmt: skip


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


# ---------------------------------------------------------------------------------------------
# Building an encoder: weights and metadata.
# ---------------------------------------------------------------------------------------------


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
    frame_tokens: int = 0,
) -> Encoder:
    """The named encoder, from `pretrained` or (loudly) a seeded random init.

    Args:
      name: resnet18..resnet152, vit_g, vggish, whisper or whisper-<size>.
      pretrained: a local HF directory (vggish: a torchvggish weights file); None = random init.
      seed: the random-init seed (and the BLIP-2_Img frame choice).
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      model_config: overrides of the random-init model config (tiny models for tests).
      frame_tokens: vit_g only: also store the tokens of this many frames per video
        (`frame_features`, for BLIP-2's temporal variant); 0 = not stored.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (model_config or {}).items()}
    if pretrained and overrides:
        raise ValueError("model_config overrides only apply to a random-init encoder")
    family = _family(name)
    if frame_tokens < 0 or (frame_tokens and family is not _vit):
        raise ValueError(f"frame_tokens={frame_tokens}: a count >= 0, and only for vit_g")
    extra = {"frame_tokens": int(frame_tokens)} if frame_tokens else {}
    encoder = family(name, pretrained, seed, DTYPES[dtype], overrides, **extra)
    info = weights_info(pretrained, seed)
    if info["random_init"]:
        logging.warning("%s\n%s\n%s", "!" * 80, f"{name}: {RANDOM_INIT_WARNING}", "!" * 80)
        info["warning"] = RANDOM_INIT_WARNING
    encoder.metadata = dict(
        encoder=name, modality=encoder.modality, seed=seed, compute_dtype=dtype, **info,
        model_config=dataclasses.asdict(encoder.model.config), **encoder.metadata,
    )  # fmt: skip
    return encoder
