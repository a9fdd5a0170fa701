"""ResNet-101 feature extraction speed (frames/s) on this machine's devices.

    .venv/bin/python benchmarks/extract_resnet.py                    # CPU here; GPU when present
    .venv/bin/python benchmarks/extract_resnet.py --batch_size=256 --dtype=bfloat16

Random-init ResNet-101 (no weights are needed to measure speed), 224 x 224 frames. Two figures:
  encoder      the jitted forward pass the extractor runs (`extract.Runner`: host-local mesh,
               data-parallel over all local devices), on a fixed batch of random normalised
               frames: host->device copy + forward + device->host copy of the pooled [B, 2048]
               features, compile excluded; median and best of --steps timed steps.
  end_to_end   `extract.extract_split` over the media of the bundled synthetic release
               (`tiktalk_jax.sample`, built to tiktalk/media in a temp dir): record reading,
               JPEG decoding, ResNet preprocessing (PIL bicubic resize + crop), the encoder,
               msgpack + ArrayRecord writing; frames/s over the whole run (compile included,
               so short runs understate it). Skipped with --no_end_to_end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tiktalk_jax import encoders, extract  # noqa: E402


def describe() -> str:
    devices = jax.local_devices()
    kinds = sorted({d.device_kind for d in devices})
    versions = {m: metadata.version(m) for m in ("jax", "jaxlib", "flax", "numpy", "pillow")}
    return "\n".join(
        [
            f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
            f"devices: {len(devices)} x {', '.join(kinds)} ({jax.default_backend()})",
            f"host: {platform.platform()}, {os.cpu_count()} CPU cores, {platform.processor()}",
            f"python {platform.python_version()}, "
            + ", ".join(f"{k} {v}" for k, v in versions.items()),
        ]
    )


def bench_encoder(encoder, batch_size: int, steps: int) -> dict:
    runner = extract.Runner(encoder, jax.local_devices(), batch_size)
    bs = runner.batch_size
    frames = np.random.default_rng(0).standard_normal((bs, 224, 224, 3)).astype(np.float32)
    start = time.perf_counter()
    np.asarray(runner(frames))  # compile + first step
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        np.asarray(runner(frames))
        times.append(time.perf_counter() - start)
    return dict(
        batch_size=bs,
        compile_s=round(compile_s, 2),
        median_frames_per_s=round(bs / statistics.median(times), 2),
        best_frames_per_s=round(bs / min(times), 2),
    )


def bench_end_to_end(encoder, batch_size: int, storage_dtype: str) -> dict:
    from tfds_builder import tiktalk
    from tiktalk_jax import sample

    with tempfile.TemporaryDirectory() as tmp:
        sample.write_sample(os.path.join(tmp, "release"))
        tiktalk.build(os.path.join(tmp, "release"), os.path.join(tmp, "data"), "media")
        media = extract.media_dir(os.path.join(tmp, "data"))
        sources = {s: extract.open_media(media, s) for s in extract.media_splits(media)}
        start = time.perf_counter()
        report = extract.extract_dataset(
            encoder,
            sources,
            os.path.join(tmp, "features"),
            storage_dtype=storage_dtype,
            batch_size=batch_size,
            progress=False,
        )
        seconds = time.perf_counter() - start
    runs = report["last_run"].values()
    frames = sum(r["items"] for r in runs)
    videos = sum(r["written"] for r in runs)
    return dict(
        videos=videos,
        frames=frames,
        seconds=round(seconds, 2),
        frames_per_s=round(frames / seconds, 2),
        videos_per_s=round(videos / seconds, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32, help="frames per host step")
    parser.add_argument("--steps", type=int, default=5, help="timed encoder steps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no_end_to_end", action="store_true")
    args = parser.parse_args()

    print(describe())
    encoder = encoders.build_encoder("resnet101", dtype=args.dtype)
    result = bench_encoder(encoder, args.batch_size, args.steps)
    print(f"encoder (resnet101, {args.dtype}, 224x224): {result}")
    if not args.no_end_to_end:
        result = bench_end_to_end(encoder, args.batch_size, args.dtype)
        print(f"end_to_end (sample media, resnet101, {args.dtype}): {result}")


if __name__ == "__main__":
    main()
