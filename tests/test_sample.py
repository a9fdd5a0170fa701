"""Tests for the synthetic sample release (tiktalk_jax/sample.py)."""

import av
import numpy as np

from tiktalk_jax import sample


def _decode(path):
    with av.open(path) as container:
        n_audio = len(container.streams.audio)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    audio = None
    if n_audio:
        with av.open(path) as container:
            audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)[0]
    return frames, audio


def test_write_video_round_trips(tmp_path):
    frames = np.zeros((12, 64, 96, 3), np.uint8)
    frames[:, 16:48, 24:72, 1] = 255  # a green box
    t = np.arange(16000) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    path = str(tmp_path / "a.mp4")
    sample.write_video(path, frames, fps=12, audio=audio)
    got, got_audio = _decode(path)
    assert got.shape == (12, 64, 96, 3)
    assert got[0, 32, 48, 1] > 200 and got[0, 32, 48, 0] < 50
    assert got[0, 2, 2].max() < 30
    assert got_audio is not None and abs(len(got_audio) - 16000) < 2048
    spectrum = np.abs(np.fft.rfft(got_audio[2048:14000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(got_audio[2048:14000])
    assert abs(peak_hz - 1000) < 20


def test_write_video_without_audio_and_deterministic(tmp_path):
    frames = np.full((5, 32, 32, 3), 128, np.uint8)
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    sample.write_video(a, frames, fps=5, audio=None)
    sample.write_video(b, frames, fps=5, audio=None)
    got, got_audio = _decode(a)
    assert got.shape == (5, 32, 32, 3) and got_audio is None
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
