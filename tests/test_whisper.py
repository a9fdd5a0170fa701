"""Whisper: log-mel front end against `WhisperFeatureExtractor`, encoder against HF PyTorch."""

import jax
import numpy as np
import pytest
import torch
import transformers

from tiktalk_jax import audio_features as af
from tiktalk_jax.models import layers, whisper


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    x = envelope * (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.1 * t))) + 0.02 * rng.normal(
        size=t.shape
    )
    return x.astype(np.float32)


@pytest.mark.parametrize("mels", [80, 128])
def test_log_mel_matches_feature_extractor(mels):
    audio = _speechlike(7.3)
    ours, frames = af.whisper_log_mel(audio, num_mel_bins=mels)
    assert ours.shape == (1, mels, 3000) and frames.tolist() == [-(-len(audio) // 160)]
    fe = transformers.WhisperFeatureExtractor(feature_size=mels)
    want = fe(audio, sampling_rate=16000, return_tensors="np")["input_features"]  # torch path
    # torch computes in float32 (we in float64): a few low-energy bins differ by ~3e-5.
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
    padded = np.pad(audio, (0, 480000 - len(audio)))[None]
    want_np = fe._np_extract_fbank_features(padded, "cpu")  # the path used without torch
    np.testing.assert_allclose(ours, want_np, atol=2e-5, rtol=0)


def test_log_mel_chunks_long_audio():
    audio = (_speechlike(41.0, seed=2) * 32767).astype(np.int16)
    ours, frames = af.whisper_log_mel(audio)
    assert ours.shape == (2, 80, 3000) and frames.tolist() == [3000, 1100]
    fe = transformers.WhisperFeatureExtractor()
    floats = audio / 32768.0
    second = fe(floats[480000:], sampling_rate=16000, return_tensors="np")["input_features"]
    np.testing.assert_allclose(ours[1], second[0], atol=2e-5)
    empty, none = af.whisper_log_mel(np.zeros(0, np.int16))
    assert empty.shape == (0, 80, 3000) and none.shape == (0,)


def _tiny_whisper(tmp_path, model_cls, **overrides):
    config = transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=80, d_model=16, encoder_layers=2, encoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = model_cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct LayerNorm/bias values, so a wrong mapping cannot pass
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize(
    "model_cls", [transformers.WhisperModel, transformers.WhisperForConditionalGeneration]
)
def test_encoder_matches_hf(tmp_path, model_cls):
    hf = _tiny_whisper(tmp_path, model_cls)
    enc = whisper.WhisperEncoder.from_pretrained(str(tmp_path))
    assert enc.config.d_model == 16 and enc.config.num_frames == 3000
    features, _ = af.whisper_log_mel(_speechlike(4.0, seed=3))
    features = np.concatenate([features, af.whisper_log_mel(_speechlike(1.0, seed=4))[0]])
    with torch.no_grad():
        ref = hf.get_encoder()(torch.from_numpy(features)).last_hidden_state.numpy()
    got = jax.jit(lambda m, x: m(x))(enc, features)
    assert got.shape == (2, 1500, 16)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_random_init_sizes_and_axes():
    cfg = whisper.WhisperEncoderConfig.named("small")
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_ffn_dim) == (768, 12, 3072)
    assert whisper.WhisperEncoderConfig.named("whisper-large-v3").num_mel_bins == 128
    tiny = whisper.WhisperEncoderConfig(16, 1, 2, 32, num_mel_bins=8, max_source_positions=10)
    enc = whisper.WhisperEncoder.from_config(tiny, seed=0)
    layers.check_param_axes(enc)
    out = jax.jit(lambda m, x: m(x))(enc, np.zeros((3, 8, 20), np.float32))
    assert out.shape == (3, 10, 16) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="input_features"):
        enc(np.zeros((1, 8, 3000), np.float32))
