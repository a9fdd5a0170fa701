"""Media build speed: builds tiktalk/media and prints videos/s.

    python benchmarks/build_media.py                       # the bundled sample (64 videos)
    python benchmarks/build_media.py --synthetic 60 --height 720 --width 1280 --seconds 10
    python benchmarks/build_media.py --manual_dir RELEASE --num_workers 16

The whole build is timed (text stage, probe, decoding, ArrayRecord writing); the report's
`videos_per_s` counts the probe + decode phases only. Not a test: figures go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np


def write_synthetic(root: pathlib.Path, n: int, height: int, width: int, seconds: float, fps: int):
    """n videos of moving shapes (compressible like real footage) with a tone, one dialogue each."""
    from tfds_builder.tiktalk.fake_release import comment, reply, video, write_json
    from tiktalk_jax.sample import write_video

    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    frames_n = round(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        base = rng.integers(0, 255, 3).astype(np.uint8)
        frames = np.empty([frames_n, height, width, 3], np.uint8)
        r = min(height, width) // 6
        for t in range(frames_n):
            frames[t] = base
            cx = (width // 4 + t * 7) % width
            cy = height // 2 + int(height / 4 * np.sin(t / 10))
            frames[t][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (255, 64, 32)
        sr = 16000
        tt = np.arange(round(seconds * sr)) / sr
        audio = (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * tt)).astype(np.float32)
        write_video(str(root / "videos" / f"s{i}.mp4"), frames, fps, audio, sr)
    body = {
        f"s{i}": video("视频", [comment("c", "评论", 1, [reply("r", "回复", 1)])]) for i in range(n)
    }
    write_json(root, "train", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual_dir", help="an existing release; default: generate one")
    parser.add_argument("--synthetic", type=int, default=0, help="generate N synthetic videos")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--num_workers", type=int, default=0, help="0: all cores")
    parser.add_argument("--data_dir", help="default: a temporary directory")
    args = parser.parse_args()

    from tfds_builder import tiktalk
    from tfds_builder.tiktalk import media

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        manual_dir = pathlib.Path(args.manual_dir) if args.manual_dir else tmp / "release"
        if not args.manual_dir:
            start = time.perf_counter()
            if args.synthetic:
                write_synthetic(
                    manual_dir, args.synthetic, args.height, args.width, args.seconds, args.fps
                )
                what = (
                    f"{args.synthetic} synthetic videos {args.width}x{args.height}, "
                    f"{args.seconds:g} s at {args.fps} fps"
                )
            else:
                from tiktalk_jax.sample import write_sample

                write_sample(str(manual_dir))
                what = "the bundled sample"
            print(f"wrote {what} in {time.perf_counter() - start:.1f} s")
        data_dir = pathlib.Path(args.data_dir) if args.data_dir else tmp / "data"
        start = time.perf_counter()
        builder = tiktalk.build(manual_dir, data_dir, "media", num_workers=args.num_workers)
        wall = time.perf_counter() - start
        report = tiktalk.report.load_report(data_dir, "media")
        stored = sum(s.num_examples for s in builder.info.splits.values())
        # Missing and zero-byte files are only stat'ed; every other video was opened.
        not_opened = ("video_missing", "video_empty")
        attempted = stored + sum(
            n
            for reason, n in report["totals"]["skipped"].items()
            if reason.startswith("video_") and reason not in not_opened
        )
        result = {
            "videos_stored": stored,
            "videos_attempted": attempted,
            "workers": args.num_workers or media.available_cores(),
            "build_wall_s": round(wall, 2),
            "videos_per_s_build": round(attempted / wall, 2),
            "videos_per_s_decode": report["videos_per_s"],
            "avg_frames_per_video": report["totals"]["stats"].get("avg_frames_per_video"),
        }
        print(json.dumps(result))


if __name__ == "__main__":  # required: decoding workers (forkserver/spawn) re-import __main__
    main()
