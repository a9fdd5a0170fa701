"""Maria decoding speed: key/value-cached vs full-recompute beam search (tokens/s).

    .venv/bin/python benchmarks/maria_decode.py                    # base-like and tiny configs
    .venv/bin/python benchmarks/maria_decode.py --configs=tiny --batch=8

Both paths run the same jitted beam search (`maria.generate`, beam 5, 20 steps) on random
weights and inputs; end tokens are disabled so every run decodes exactly `--steps` tokens. The
variant is T+V+A+K with the TikTalk lengths (response slot 40, context 100, knowledge 40, 50
frames, 50 audio rows: a 240-token prefix). Cached: the prefix is encoded once and each step runs
two tokens ([last word, MASK]) per beam; recompute: each step re-encodes the whole sequence, as
the original code did. Reported: generated tokens/s (batch * steps / seconds; a beam search
counts once per example and step), ms per step, and the speed-up. Compilation is excluded (one
warm-up run); the median of the timed runs is reported.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tiktalk_jax.models import bert, maria  # noqa: E402

CONFIGS = {
    # bert-base-chinese's shape.
    "base": dict(
        vocab_size=21128,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    ),
    "tiny": dict(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    ),
}


def make_batch(config: maria.MariaConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs with realistic fill: contexts/knowledge/media partly padded."""
    rng = np.random.default_rng(seed)

    def text(length, lo):
        lengths = rng.integers(lo, length + 1, batch)
        valid = np.arange(length) < lengths[:, None]
        ids = rng.integers(200, config.bert.vocab_size, (batch, length))
        return np.where(valid, ids, config.pad_id).astype(np.int32), valid

    out = {}
    out["context_ids"], out["context_mask"] = text(config.max_context_len, 10)
    out["knowledge_ids"], out["knowledge_mask"] = text(config.max_knowledge_len, 5)
    for name, n, dim in (
        ("frame", config.max_frames, config.frame_dim),
        ("audio", config.max_audio, config.audio_dim),
    ):
        out[f"{name}_feats"] = rng.normal(size=(batch, n, dim)).astype(np.float32)
        out[f"{name}_mask"] = np.arange(n) < rng.integers(n // 2, n + 1, batch)[:, None]
    return out


def time_runs(fn, args, min_runs: int, budget_s: float) -> list[float]:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 20):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
        if len(times) >= min_runs and time.perf_counter() - start > budget_s:
            break
    return times


def bench(name: str, batch: int, beams: int, steps: int, min_runs: int, budget_s: float):
    config = maria.MariaConfig(
        bert=bert.BertConfig(**CONFIGS[name], type_vocab_size=3, hidden_dropout_prob=0.0),
        use_vision=True,
        use_audio=True,
        use_knowledge=True,
    )
    model = maria.Maria(config, rngs=nnx.Rngs(0))
    model.eval()
    inputs = make_batch(config, batch)
    # No end tokens: every run decodes exactly `steps` tokens.
    cfg = maria.search_config(config, max_new_tokens=steps, num_beams=beams, eos_ids=())
    graphdef, state = nnx.split(model)
    rows = []
    outs = {}
    for cached in (True, False):
        fn = jax.jit(
            lambda s, b, cached=cached: maria.generate(
                nnx.merge(graphdef, s), b, cfg, cached=cached
            )
        )
        outs[cached] = jax.device_get(fn(state, inputs).tokens)
        times = time_runs(fn, (state, inputs), min_runs, budget_s)
        sec = statistics.median(times)
        rows.append((cached, sec, len(times)))
    same = bool(np.array_equal(outs[True], outs[False]))
    print(
        f"\n[{name}] hidden {config.bert.hidden_size}, {config.bert.num_hidden_layers} layers, "
        f"vocab {config.bert.vocab_size}; batch {batch}, beam {beams}, {steps} steps; prefix "
        f"{config.prefix_len} tokens; same tokens cached/recompute: {same}"
    )
    print(f"{'path':<10} {'tokens/s':>10} {'ms/step':>9} {'s/run':>8} {'runs':>5}")
    for cached, sec, runs in rows:
        label = "cached" if cached else "recompute"
        tps, ms = batch * steps / sec, 1e3 * sec / steps
        print(f"{label:<10} {tps:>10.1f} {ms:>9.2f} {sec:>8.3f} {runs:>5}")
    print(f"speed-up (cached / recompute): {rows[1][1] / rows[0][1]:.1f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default="base,tiny", help="comma list of " + ",".join(CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--min_runs", type=int, default=2)
    p.add_argument("--budget_s", type=float, default=20.0, help="timed seconds per path (soft)")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}; host {platform.node()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    jaxlib = getattr(jax.lib, "__version__", "?")
    print(
        f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib}, "
        f"flax {flax.__version__}"
    )
    for name in args.configs.split(","):
        bench(name, args.batch, args.beams, args.steps, args.min_runs, args.budget_s)


if __name__ == "__main__":
    main()
