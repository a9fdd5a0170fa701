"""Image preprocessing of each frozen image encoder, as its HF image processor does it.

Two recipes cover the encoders here; the constants come from the checkpoint's
`preprocessor_config.json` when present, else from the defaults of the named encoder:

- ResNet (`ConvNextImageProcessor`, what `microsoft/resnet-*` ship): resize the shorter side to
  `int(shortest_edge / crop_pct)` (224 / 0.875 = 256), keep the aspect ratio, center-crop
  `shortest_edge` (224); for shortest_edge >= 384 a plain square resize instead. ImageNet
  mean/std.
- BLIP-2 (`BlipImageProcessor`): resize straight to 224 x 224 (aspect ratio not kept), CLIP
  mean/std.

Both: bicubic resampling by PIL on the uint8 image (exactly what the HF "slow"/PIL backend does,
antialiasing included), then x/255 and (x - mean) / std in float32. Output is NHWC float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the code HF configs store as `resample`


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """One encoder's preprocessing. Exactly one of `shortest_edge` / `size` sets the resize.

    Attributes:
      shortest_edge: ConvNeXt-style resize of the shorter side (with `crop_pct`, see module doc).
      crop_pct: fraction of the resized image kept by the crop (only when shortest_edge < 384).
      size: (height, width) of a direct resize (BLIP).
    """

    shortest_edge: int | None = 224
    crop_pct: float = 224 / 256
    size: tuple[int, int] | None = None
    resample: int = BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if (self.shortest_edge is None) == (self.size is None):
            raise ValueError("set exactly one of shortest_edge (ConvNeXt style) and size (BLIP)")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image (None when resizing is off)."""
        if not self.do_resize:
            return None
        return (self.shortest_edge,) * 2 if self.shortest_edge else tuple(self.size)

    @classmethod
    def for_encoder(cls, encoder: str) -> ImageProcessor:
        """Defaults of the HF processors that ship with the checkpoints: "resnet" or "blip2"."""
        if encoder.startswith("resnet"):
            return cls()
        if encoder in ("blip2", "eva_vit_g", "vit"):
            return cls(shortest_edge=None, size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD)
        raise ValueError(f"no image preprocessing for encoder {encoder!r}")

    @classmethod
    def from_hf(cls, config: dict[str, Any], encoder: str) -> ImageProcessor:
        """From a parsed `preprocessor_config.json`; missing fields keep `encoder`'s defaults."""
        base = cls.for_encoder(encoder)
        kind = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
        convnext = "ConvNext" in kind or (not kind and base.shortest_edge is not None)
        fields: dict[str, Any] = {}
        size = config.get("size")
        if isinstance(size, int):  # legacy: an int means the shorter side for ConvNeXt, else square
            size = {"shortest_edge": size} if convnext else {"height": size, "width": size}
        if isinstance(size, dict):
            if "shortest_edge" in size:
                fields.update(shortest_edge=int(size["shortest_edge"]), size=None)
            elif "height" in size and "width" in size:
                fields.update(shortest_edge=None, size=(int(size["height"]), int(size["width"])))
            else:
                raise ValueError(f"unsupported image processor size {size}")
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if config.get(theirs) is not None:
                fields[ours] = tuple(float(v) for v in config[theirs])
        for key in ("crop_pct", "resample", "do_resize", "do_rescale", "rescale_factor",
                    "do_normalize"):  # fmt: skip
            if config.get(key) is not None:
                fields[key] = config[key]
        if config.get("do_center_crop") and not convnext:
            raise ValueError(f"{kind}: a separate center crop is not supported")
        return dataclasses.replace(base, **fields)

    @classmethod
    def from_pretrained(cls, path: str, encoder: str) -> ImageProcessor:
        """Reads `path/preprocessor_config.json` if it exists, else the encoder's defaults."""
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(file):
            return cls.for_encoder(encoder)
        with open(file, encoding="utf-8") as f:
            return cls.from_hf(json.load(f), encoder)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if self.size is not None:
            return _pil_resize(image, self.size, self.resample)
        edge = self.shortest_edge
        if edge >= 384:  # ConvNeXt: large sizes are a square resize without cropping
            return _pil_resize(image, (edge, edge), self.resample)
        short_target = int(edge / self.crop_pct)
        short, long = min(h, w), max(h, w)
        long_target = int(short_target * long / short)
        target = (short_target, long_target) if h <= w else (long_target, short_target)
        return _center_crop(_pil_resize(image, target, self.resample), (edge, edge))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """`uint8[H, W, 3]` (or grey `[H, W]`) RGB frame -> `float32[h, w, 3]` encoder input."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got {image.shape}")
        if self.do_resize:
            image = self._resize(image)
        if self.do_rescale:  # in float64, then float32, like HF's `rescale`
            out = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            out = image.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.mean, np.float32)
            std = np.asarray(self.std, np.float32)
            out = (out - mean) / std
        return out

    def batch(self, images) -> np.ndarray:
        """A sequence of frames -> `float32[B, h, w, 3]`."""
        return np.stack([self(image) for image in images])


def _pil_resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"resizing expects uint8 frames, got {image.dtype}")
    height, width = size
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HF `center_crop`: offsets rounded down; zero padding (centred) if the image is smaller."""
    h, w = image.shape[:2]
    ch, cw = size
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        padded = np.zeros((ph, pw, image.shape[2]), image.dtype)
        top, left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
        padded[top : top + h, left : left + w] = image
        image, h, w = padded, ph, pw
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]
