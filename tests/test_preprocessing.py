"""Image preprocessing against the HF (PIL backend) image processors of each encoder."""

import json

import numpy as np
import pytest
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from tiktalk_jax.image_preprocessing import CLIP_MEAN, IMAGENET_MEAN, IMAGENET_STD, ImageProcessor


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth structure plus noise, so resampling differences would show.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], -1)
    return np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _hf(processor, image):
    out = processor(images=image, return_tensors="np")["pixel_values"]
    return out[0].transpose(1, 2, 0)  # CHW -> HWC


RESNET_HF = dict(
    size={"shortest_edge": 224}, crop_pct=0.875, resample=3, image_mean=list(IMAGENET_MEAN),
    image_std=list(IMAGENET_STD),
)  # fmt: skip


@pytest.mark.parametrize("shape", [(180, 320), (300, 241), (224, 224), (120, 90)])
def test_resnet_matches_convnext_processor(tmp_path, shape):
    hf = ConvNextImageProcessorPil(**RESNET_HF)
    hf.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(str(tmp_path), "resnet")
    assert ours == ImageProcessor.for_encoder("resnet")  # the defaults are the shipped config
    image = _image(*shape)
    got = ours(image)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, _hf(hf, image), atol=1e-6, rtol=0)


def test_convnext_large_size_and_legacy_int_size(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"feature_extractor_type": "ConvNextFeatureExtractor", "size": 384,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    )  # fmt: skip
    ours = ImageProcessor.from_pretrained(str(tmp_path), "resnet")
    assert ours.shortest_edge == 384 and ours.mean == (0.5, 0.5, 0.5)
    hf = ConvNextImageProcessorPil(size={"shortest_edge": 384}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)  # fmt: skip
    image = _image(200, 260)
    np.testing.assert_allclose(ours(image), _hf(hf, image), atol=1e-6)


@pytest.mark.parametrize("shape", [(180, 320), (400, 300)])
def test_blip2_matches_blip_processor(tmp_path, shape):
    hf = BlipImageProcessorPil(size={"height": 224, "width": 224})
    hf.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(str(tmp_path), "blip2")
    assert ours.size == (224, 224) and ours.mean == CLIP_MEAN
    assert ours == ImageProcessor.for_encoder("blip2")
    image = _image(*shape, seed=1)
    got = ours.batch([image, image[::-1]])
    assert got.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(got[0], _hf(hf, image), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[1], _hf(hf, np.ascontiguousarray(image[::-1])), atol=1e-6)


def test_defaults_without_config_and_errors(tmp_path):
    assert ImageProcessor.from_pretrained(str(tmp_path), "resnet101").shortest_edge == 224
    assert ImageProcessor.from_pretrained(str(tmp_path), "blip2").output_size == (224, 224)
    grey = ImageProcessor.for_encoder("blip2")(np.full((50, 60), 128, np.uint8))
    assert grey.shape == (224, 224, 3)
    np.testing.assert_allclose(grey[0, 0], (128 / 255 - np.array(CLIP_MEAN)) / 0.2686, atol=0.03)
    with pytest.raises(ValueError, match="encoder"):
        ImageProcessor.for_encoder("whisper")
    with pytest.raises(ValueError, match="exactly one"):
        ImageProcessor(shortest_edge=224, size=(224, 224))
