"""A deterministic synthetic TikTalk release in the raw layout (see docs/architecture.md).

`python -m tiktalk_jax.sample OUT_DIR [--seed N]` writes the sample release.
"""

from __future__ import annotations

import fractions

import av
import numpy as np

# libx264 with one thread and bitexact flags gives byte-identical files run to run; mpeg4 is the
# fallback for FFmpeg builds without x264.
_VIDEO_CODECS = ("libx264", "mpeg4")


def _pick_video_codec() -> str:
    for name in _VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - any failure means "not available in this build"
            continue
    raise RuntimeError(f"none of the video encoders {_VIDEO_CODECS} is available in PyAV")


def write_video(
    path: str,
    frames: np.ndarray,
    fps: int,
    audio: np.ndarray | None,
    sample_rate: int = 16000,
) -> None:
    """Writes an mp4 (h264 or mpeg4 video, aac mono audio) with PyAV.

    Args:
      path: output file, usually `<dir>/<video_id>.mp4`.
      frames: uint8[N, H, W, 3] RGB frames; H and W must be even (yuv420p).
      fps: frames per second.
      audio: float32[S] mono samples in [-1, 1], or None for a file with no audio stream.
      sample_rate: audio sample rate in Hz.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8[N, H, W, 3], got {frames.dtype}{list(frames.shape)}"
        )
    n, h, w, _ = frames.shape
    if n == 0 or h % 2 or w % 2:
        raise ValueError(f"need at least one frame and even H, W; got {list(frames.shape)}")
    codec = _pick_video_codec()
    with av.open(path, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        container.flags |= av.container.Flags.bitexact.value
        vstream = container.add_stream(codec, rate=fps)
        vstream.width, vstream.height = w, h
        vstream.pix_fmt = "yuv420p"
        vstream.codec_context.thread_count = 1
        vstream.codec_context.flags |= av.codec.context.Flags.bitexact.value
        if codec == "libx264":
            # A fixed quality; small shapes on flat backgrounds compress to a few kB.
            vstream.codec_context.options = {"crf": "18", "preset": "veryfast"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate, layout="mono")
            astream.codec_context.flags |= av.codec.context.Flags.bitexact.value
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            frame.time_base = fractions.Fraction(1, fps)
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
            chunk = 1024  # the aac frame size; PyAV re-chunks anyway but this keeps pts simple
            for start in range(0, len(samples), chunk):
                block = samples[start : start + chunk][None, :]
                aframe = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(block), format="flt", layout="mono"
                )
                aframe.sample_rate = sample_rate
                aframe.pts = start
                aframe.time_base = fractions.Fraction(1, sample_rate)
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
