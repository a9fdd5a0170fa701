"""Video decoding for the `media` config: PyAV in a process pool with bounded memory.

One record per video: JPEG frames sampled at `fps` (at most `max_frames`, shorter side resized
down to `frame_size`), their times, 16 kHz mono int16 audio and the duration. Decoding is the
slow part of the build (38K videos), so it runs over all cores in worker processes; at most
`2 * workers` videos are in flight, so memory stays bounded whatever the dataset size.

This module imports no TFDS/TensorFlow: workers start with 'forkserver' or 'spawn' (forking a
process that holds TF and thread pools is unsafe) and re-import it, which must stay cheap.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import io
import math
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

DEFAULT_START_METHOD = (
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
)


@dataclasses.dataclass(frozen=True)
class MediaOptions:
    """The media half of the builder config."""

    fps: float = 1.0
    max_frames: int = 50
    frame_size: int = 224
    jpeg_quality: int = 90
    sample_rate: int = 16000
    decode_timeout_s: float = 300.0
    num_workers: int = 0  # 0: every core this process may use
    start_method: str = DEFAULT_START_METHOD


class DecodeError(Exception):
    """A video cannot give a record; `reason` is a report skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class WorkerCrashed(Exception):
    """The worker process died (e.g. a segfault inside FFmpeg) while handling the task."""


class WorkerStartError(RuntimeError):
    """Worker processes die before finishing anything: the pool itself cannot work."""


class _Timeout(Exception):
    pass


_END = object()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resized_shape(height: int, width: int, frame_size: int) -> tuple[int, int]:
    """(h, w) with the shorter side scaled down to `frame_size`; never upscales."""
    short = min(height, width)
    if short <= frame_size:
        return height, width
    scale = frame_size / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_video(path: str | os.PathLike[str], opts: MediaOptions) -> dict[str, Any]:
    """Decodes one video file into a `tiktalk/media` record (without `video_id`).

    Frames are the first decoded frame at or after each target time k / fps (one decoded frame
    is never used twice). When the header gives a duration with more than `max_frames` targets,
    the step is stretched to duration / max_frames so the frames cover the whole video rather
    than its first `max_frames / fps` seconds.

    Returns:
      {"frames": [jpeg bytes] (N <= max_frames), "frame_times": float32[N] seconds,
       "audio": int16[S] at `sample_rate` (S = 0 without audio track), "has_audio": bool,
       "duration": float32 seconds}

    Raises:
      DecodeError: no video stream or no decodable frame ("video_no_frames").
      Any PyAV/FFmpeg error for unreadable files (mapped to "video_undecodable" by the caller).
    """
    import av

    with av.open(os.fspath(path), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise DecodeError("video_no_frames", "the file has no video stream")
        vstream = container.streams.video[0]
        # One thread per decoder: the pool already uses every core.
        vstream.codec_context.thread_count = 1
        astream = container.streams.audio[0] if container.streams.audio else None
        start = container.start_time / 1e6 if container.start_time is not None else 0.0
        header_duration = container.duration / 1e6 if container.duration else None
        step = 1.0 / opts.fps
        if header_duration and header_duration * opts.fps > opts.max_frames:
            step = header_duration / opts.max_frames

        resampler = (
            av.AudioResampler(format="s16", layout="mono", rate=opts.sample_rate)
            if astream is not None
            else None
        )
        frames: list[bytes] = []
        times: list[float] = []
        chunks: list[np.ndarray] = []
        next_target = 0.0
        last_video_end = 0.0
        decoded = 0
        streams = [vstream] + ([astream] if astream is not None else [])
        for packet in container.demux(*streams):
            if packet.stream is vstream and len(frames) >= opts.max_frames:
                continue  # enough frames: only the audio still needs decoding
            for frame in packet.decode():
                if isinstance(frame, av.AudioFrame):
                    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
                    continue
                t = (frame.time if frame.time is not None else decoded * step) - start
                t = max(t, 0.0)
                decoded += 1
                rate = float(vstream.average_rate or 0) or opts.fps
                last_video_end = max(last_video_end, t + 1.0 / rate)
                if len(frames) >= opts.max_frames or t + 1e-6 < next_target:
                    continue
                h, w = resized_shape(frame.height, frame.width, opts.frame_size)
                rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA")
                frames.append(_encode_jpeg(rgb.to_ndarray(), opts.jpeg_quality))
                times.append(t)
                next_target = (math.floor(t / step + 1e-6) + 1) * step
        if resampler is not None:
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    if not frames:
        raise DecodeError("video_no_frames", "no video frame could be decoded")
    audio = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros([0], np.int16)
    observed = max(last_video_end, len(audio) / opts.sample_rate)
    # The decoded content is the truth for truncated files; the header is only a fallback.
    duration = observed if observed > 0 else (header_duration or 0.0)
    return {
        "frames": frames,
        "frame_times": np.asarray(times, np.float32),
        "audio": audio,
        "has_audio": bool(len(audio)),
        "duration": np.float32(duration),
    }


def probe_video(path: str | os.PathLike[str]) -> None:
    """Raises unless the file opens and its first video frame decodes (cheap, ~10 ms)."""
    import av

    with av.open(os.fspath(path), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise DecodeError("video_no_frames", "the file has no video stream")
        vstream = container.streams.video[0]
        vstream.codec_context.thread_count = 1
        for _ in container.decode(vstream):
            return
    raise DecodeError("video_no_frames", "no video frame could be decoded")


def _raise_timeout(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Timeout()


def _guarded(fn: Callable[[], Any], timeout_s: float) -> tuple[str, Any, str | None]:
    """Runs fn with a SIGALRM deadline; returns ("ok", result, None) or ("skip", reason, msg).

    PyAV returns to Python between packets, so the alarm interrupts a slow decode; a hang
    inside one FFmpeg call is caught by the parent's hard timeout instead.
    """
    use_alarm = (
        hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    )
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return "ok", fn(), None
    except _Timeout:
        return "skip", "video_timeout", f"decoding took more than {timeout_s:g} s"
    except DecodeError as e:
        return "skip", e.reason, str(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a skip, never a crash
        return "skip", "video_undecodable", f"{type(e).__name__}: {e}"[:500]
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def decode_task(task: tuple[str, str, MediaOptions]) -> tuple[str, str, Any, str | None]:
    """Pool task: (video_id, path, opts) -> (video_id, "ok"|"skip", record|reason, message)."""
    video_id, path, opts = task
    status, value, message = _guarded(lambda: decode_video(path, opts), opts.decode_timeout_s)
    return video_id, status, value, message


def probe_task(task: tuple[str, str, MediaOptions]) -> tuple[str, str, Any, str | None]:
    """Pool task: like `decode_task` but only checks the file opens and has a frame."""
    video_id, path, opts = task
    status, value, message = _guarded(lambda: probe_video(path), opts.decode_timeout_s)
    return video_id, status, value, message


# --------------------------------------------------------------------------------------------
# The pool.


def _ensure_workers_can_import() -> None:
    # `tfds build` imports this package as `tiktalk.media` with its parent directory on sys.path
    # only while importing. Workers re-import the module by name, and spawn/forkserver copy the
    # parent's sys.path when they start, so the package root must be on it then.
    root = str(pathlib.Path(__file__).resolve().parents[__name__.count(".")])
    if root not in sys.path:
        sys.path.append(root)


def _kill(executor: cf.ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor cannot cancel a running task; killing its processes is the only way to
    # reclaim a worker stuck inside FFmpeg. `_processes` is private but stable since 3.2.
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        process.kill()
    executor.shutdown(wait=False, cancel_futures=True)


def run_pool(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    num_workers: int,
    start_method: str = DEFAULT_START_METHOD,
    hard_timeout_s: float = 900.0,
    window: int | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yields (item, fn(item)) in completion order, with at most `window` items in flight.

    Failures come back as values, never as raised exceptions: an exception raised by `fn` is
    yielded as the result; a task still unfinished `hard_timeout_s` after submission yields
    TimeoutError (its pool is killed and the other in-flight tasks are resubmitted); when a
    worker process dies, every task that was in flight is rerun alone in a fresh one-worker pool
    and the one that kills that pool too yields WorkerCrashed.

    Args:
      fn: a module-level function (workers import it by name).
      items: consumed lazily, so a generator over 38K videos holds only `window` of them.
      num_workers: worker processes (>= 1).
      start_method: 'forkserver' or 'spawn' ('fork' would copy the parent's TF state).
      hard_timeout_s: a task's limit from submission; queueing is bounded by the window.
      window: tasks in flight; default 2 * num_workers keeps every worker busy.

    Raises:
      WorkerStartError: workers die before any task finishes, even run alone (an environment
        problem, such as an unguarded main script, rather than one bad input).
    """
    if start_method == "fork":
        raise ValueError("start_method='fork' is unsafe here; use 'forkserver' or 'spawn'")
    _ensure_workers_can_import()
    context = multiprocessing.get_context(start_method)
    window = window or 2 * num_workers

    def new_pool(workers: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=context)

    pool = new_pool(num_workers)
    pending: dict[cf.Future, tuple[Any, float]] = {}
    retry: collections.deque[Any] = collections.deque()  # resubmit after a pool kill
    source = iter(items)
    exhausted = False
    any_finished = False  # a worker ever returned: the pool itself works
    try:
        while True:
            suspects: list[Any] = []
            while len(pending) < window and (retry or not exhausted):
                item = retry.popleft() if retry else next(source, _END)
                if item is _END:
                    exhausted = True
                    break
                try:
                    pending[pool.submit(fn, item)] = (item, time.monotonic())
                except cf.process.BrokenProcessPool:
                    suspects.append(item)
                    break
            if not pending and not suspects:
                pool.shutdown(wait=True)  # idle workers exit cleanly; _kill below is a no-op
                return
            if pending and not suspects:
                done, _ = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    item, _ = pending.pop(future)
                    try:
                        result = future.result()
                    except cf.process.BrokenProcessPool:
                        suspects.append(item)
                        continue
                    except Exception as e:  # noqa: BLE001 - returned to the caller as a value
                        result = e
                    any_finished = True
                    yield item, result
            now = time.monotonic()
            overdue = [f for f, (_, t0) in pending.items() if now - t0 > hard_timeout_s]
            if not suspects and not overdue:
                continue
            _kill(pool)
            for future, (item, _) in list(pending.items()):
                if future in overdue:
                    yield item, TimeoutError(f"no result after {hard_timeout_s:g} s")
                elif suspects:
                    suspects.append(item)  # the pool broke: any in-flight task may be guilty
                else:
                    retry.append(item)
            pending.clear()
            alone = [(item, _run_alone(fn, item, new_pool, hard_timeout_s)) for item in suspects]
            crashed = sum(isinstance(r, WorkerCrashed) for _, r in alone)
            if not any_finished and len(alone) >= 2 and crashed == len(alone):
                raise WorkerStartError(
                    f"decoding workers die before finishing any task ({crashed} of {crashed} "
                    "tasks crashed even alone). With the 'forkserver'/'spawn' start methods each "
                    "worker re-imports the main module: a script that starts the build must guard "
                    "it with `if __name__ == '__main__':`. num_workers=1 decodes in-process."
                )
            any_finished |= crashed < len(alone)
            yield from alone
            pool = new_pool(num_workers)
    finally:
        _kill(pool)


def _run_alone(fn, item, new_pool, hard_timeout_s: float) -> Any:
    pool = new_pool(1)
    try:
        return pool.submit(fn, item).result(timeout=hard_timeout_s)
    except cf.process.BrokenProcessPool:
        return WorkerCrashed("the worker process died while decoding this file")
    except cf.TimeoutError:
        return TimeoutError(f"no result after {hard_timeout_s:g} s")
    except Exception as e:  # noqa: BLE001
        return e
    finally:
        _kill(pool)


def process_videos(
    task_fn: Callable[[Any], Any],
    videos: Iterable[tuple[str, str]],
    opts: MediaOptions,
) -> Iterator[tuple[str, str, Any, str | None]]:
    """Runs `decode_task` or `probe_task` over (video_id, path) pairs.

    Yields (video_id, "ok", record, None) or (video_id, "skip", reason, message) in completion
    order. `opts.num_workers == 1` decodes in this process (no pool; handy for debugging).
    """
    tasks = ((vid, str(path), opts) for vid, path in videos)
    workers = opts.num_workers or available_cores()
    if workers == 1:
        for task in tasks:
            yield task_fn(task)
        return
    hard_timeout = 2 * opts.decode_timeout_s + 60
    results = run_pool(
        task_fn,
        tasks,
        num_workers=workers,
        start_method=opts.start_method,
        hard_timeout_s=hard_timeout,
    )
    for (vid, _, _), result in results:
        if isinstance(result, WorkerCrashed):
            yield vid, "skip", "video_crashed", str(result)
        elif isinstance(result, TimeoutError):
            yield vid, "skip", "video_timeout", str(result)
        elif isinstance(result, BaseException):
            yield vid, "skip", "video_undecodable", f"{type(result).__name__}: {result}"[:500]
        else:
            yield result
