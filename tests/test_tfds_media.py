"""Media decoding of the TikTalk builder: frame sampling, resizing, audio, and the process pool."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from tfds_builder.tiktalk import media
from tfds_builder.tiktalk.fake_release import write_tiny_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "2s": write_tiny_video(root / "2s.mp4", seconds=2.0, fps=10),
        "3s": write_tiny_video(root / "3s.mp4", seconds=3.0, fps=10),
        "wide": write_tiny_video(root / "wide.mp4", seconds=1.0, fps=5, height=64, width=96),
        "silent": write_tiny_video(root / "silent.mp4", seconds=2.0, fps=10, audio=False),
    }


def decode(path, **kw):
    return media.decode_video(path, media.MediaOptions(**kw))


def jpeg_size(data):
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        return img.size  # (width, height)


def test_frames_sampled_at_fps(videos):
    out = decode(videos["2s"])  # defaults: 1 fps
    assert len(out["frames"]) == 2
    np.testing.assert_allclose(out["frame_times"], [0.0, 1.0], atol=1e-6)
    assert out["frame_times"].dtype == np.float32
    out = decode(videos["2s"], fps=2.0)
    np.testing.assert_allclose(out["frame_times"], [0.0, 0.5, 1.0, 1.5], atol=1e-6)
    # Above the video's own rate, a decoded frame is never used twice.
    out = decode(videos["2s"], fps=25.0)
    assert len(out["frames"]) == 20
    assert len(set(out["frame_times"].tolist())) == 20


def test_max_frames_spreads_over_the_whole_video(videos):
    out = decode(videos["3s"], fps=10.0, max_frames=12)
    assert len(out["frames"]) == 12
    times = out["frame_times"]
    assert np.all(np.diff(times) > 0)
    assert times[-1] > 2.4  # covers the end of the video, not just its first 1.2 s
    assert len(decode(videos["3s"], fps=10.0)["frames"]) == 30  # under the default cap of 50


def test_resize_shorter_side_down_never_up(videos):
    out = decode(videos["wide"], frame_size=32)
    assert {jpeg_size(f) for f in out["frames"]} == {(48, 32)}
    out = decode(videos["wide"])  # 224 > 64: kept as is
    assert {jpeg_size(f) for f in out["frames"]} == {(96, 64)}
    assert media.resized_shape(720, 1280, 224) == (224, 398)
    assert media.resized_shape(1280, 720, 224) == (398, 224)
    assert media.resized_shape(100, 50, 224) == (100, 50)


def test_audio_is_16khz_mono_int16(videos):
    out = decode(videos["2s"])
    audio = out["audio"]
    assert audio.dtype == np.int16 and audio.ndim == 1
    assert out["has_audio"] is True
    assert abs(len(audio) - 32000) < 1600  # 2 s at 16 kHz, give or take AAC padding
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float32)))
    peak_hz = np.argmax(spectrum) * 16000 / len(audio)
    assert abs(peak_hz - 440) < 10
    assert out["duration"] == pytest.approx(2.0, abs=0.1)


def test_audio_is_resampled(tmp_path):
    from tiktalk_jax.sample import write_video

    t = np.arange(44100) / 44100
    wave = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    frames = np.zeros([10, 32, 32, 3], np.uint8)
    write_video(str(tmp_path / "a.mp4"), frames, 10, wave, sample_rate=44100)
    audio = decode(tmp_path / "a.mp4")["audio"]
    assert abs(len(audio) - 16000) < 1200
    peak_hz = np.argmax(np.abs(np.fft.rfft(audio.astype(np.float32)))) * 16000 / len(audio)
    assert abs(peak_hz - 1000) < 15


def test_video_without_audio_track_is_kept(videos):
    out = decode(videos["silent"])
    assert out["has_audio"] is False
    assert out["audio"].shape == (0,) and out["audio"].dtype == np.int16
    assert len(out["frames"]) == 2
    assert out["duration"] == pytest.approx(2.0, abs=0.1)


def test_bad_files_become_skips_not_exceptions(tmp_path, videos):
    opts = media.MediaOptions()
    data = videos["2s"].read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("truncated", "garbage", "empty", "missing"):
        vid, status, reason, message = media.decode_task(
            (name, str(tmp_path / f"{name}.mp4"), opts)
        )
        assert (vid, status, reason) == (name, "skip", "video_undecodable")
        assert message
    vid, status, record, _ = media.decode_task(("ok", str(videos["2s"]), opts))
    assert status == "ok" and len(record["frames"]) == 2
    assert media.probe_task(("ok", str(videos["2s"]), opts))[1] == "ok"
    assert media.probe_task(("g", str(tmp_path / "garbage.mp4"), opts))[2] == "video_undecodable"


def test_audio_only_file_has_no_frames(tmp_path):
    import av

    with av.open(str(tmp_path / "a.m4a"), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            np.zeros([1, 1024], np.float32), format="flt", layout="mono"
        )
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    _, status, reason, _ = media.decode_task(("a", str(tmp_path / "a.m4a"), media.MediaOptions()))
    assert (status, reason) == ("skip", "video_no_frames")


def test_per_task_alarm_timeout():
    status, reason, message = media._guarded(lambda: time.sleep(5), timeout_s=0.2)
    assert (status, reason) == ("skip", "video_timeout")
    assert "0.2" in message


# ------------------------------------------------------------------------------------------
# The pool. `eval` is a picklable builtin, so expressions make tasks with any behaviour.


def test_pool_returns_every_result_with_bounded_window():
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield f"{i} * 2"

    results = {}
    in_flight = []
    for item, value in media.run_pool(eval, items(), num_workers=2, window=3):
        results[item] = value
        in_flight.append(len(pulled) - len(results))  # pulled from the source, not yet back
    assert results == {f"{i} * 2": 2 * i for i in range(20)}
    assert max(in_flight) <= 3


def test_pool_isolates_crashes_and_errors():
    items = ["1 + 1", "__import__('os')._exit(3)", "1 / 0", "2 + 2", "3 + 3"]
    results = dict(media.run_pool(eval, items, num_workers=2, window=4))
    assert results["1 + 1"] == 2 and results["2 + 2"] == 4 and results["3 + 3"] == 6
    assert isinstance(results["__import__('os')._exit(3)"], media.WorkerCrashed)
    assert isinstance(results["1 / 0"], ZeroDivisionError)


def test_pool_hard_timeout_kills_a_stuck_worker():
    items = ["__import__('time').sleep(60)", "5", "6"]
    start = time.monotonic()
    results = dict(media.run_pool(eval, items, num_workers=2, hard_timeout_s=1.5))
    assert time.monotonic() - start < 30
    assert isinstance(results["__import__('time').sleep(60)"], TimeoutError)
    assert results["5"] == 5 and results["6"] == 6


def test_pool_refuses_fork():
    with pytest.raises(ValueError, match="fork"):
        next(media.run_pool(eval, ["1"], num_workers=1, start_method="fork"))


def test_process_videos_in_a_pool(videos, tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    pairs = [(k, str(v)) for k, v in videos.items()] + [("bad", str(tmp_path / "bad.mp4"))]
    opts = media.MediaOptions(num_workers=2)
    out = {
        vid: (status, value)
        for vid, status, value, _ in media.process_videos(media.decode_task, pairs, opts)
    }
    assert set(out) == {"2s", "3s", "wide", "silent", "bad"}
    assert out["bad"] == ("skip", "video_undecodable")
    assert out["silent"][0] == "ok" and out["silent"][1]["has_audio"] is False
    assert len(out["3s"][1]["frames"]) == 3


def test_pool_whose_workers_always_die_raises_a_clear_error():
    with pytest.raises(media.WorkerStartError, match="__main__"):
        list(media.run_pool(eval, ["__import__('os')._exit(1)"] * 3, num_workers=2))
