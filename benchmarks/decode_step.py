r"""Maria beam decoding vs the original's recompute-every-step decoding in PyTorch, in one run.

    .venv/bin/python benchmarks/decode_step.py --size=base --batch=8       # GPU: the M10 target
    .venv/bin/python benchmarks/decode_step.py --size=tiny --batch=2 --runs=2

Three decoders of the same T+V+A+K model shape (benchmarks/flops.py sizes, the paper's lengths:
a 40-slot response and a 240-token prefix), beam 5, exactly `--new_tokens` (20) tokens (end
tokens disabled so every decoder does the same work), random weights and inputs
(`maria_decode.make_batch`):

  jax_cached       `maria.generate(cached=True)`: the prefix encoded once per example, two
                   tokens per beam and step (tiktalk_jax/models/maria.py)
  jax_recompute    `maria.generate(cached=False)`: the whole sequence every step
  torch_recompute  benchmarks/torch_maria.py `beam_search_recompute`: HF BertModel's modules on
                   the whole `[CLS] w.. [MASK] pad][prefix]` sequence for every beam and step, as
                   the original Maria code decodes (eager; bf16 autocast on accelerators)

Reported: generated tokens/s (batch * new tokens / seconds of a whole search, prefix included),
ms per step, the median and spread over `--runs` timed searches after one untimed (compiling)
search, model FLOPs (flops.maria_decode_flops) and MFU where the peak is known, and the speed-ups
jax_cached / torch_recompute (M10 target >= 10x on an H100) and jax_cached / jax_recompute.
benchmarks/maria_decode.py is the earlier JAX-only cached vs recompute measurement (M2).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import flops  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import maria_decode  # noqa: E402
import numpy as np  # noqa: E402
import train_step  # noqa: E402
from flax import nnx  # noqa: E402

from tiktalk_jax.models import bert, maria  # noqa: E402

DECODERS = ("jax_cached", "jax_recompute", "torch_recompute")


def jax_model(shape: flops.MariaShape, dtype: str) -> maria.Maria:
    config = maria.MariaConfig(
        bert=bert.BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            type_vocab_size=3,
            max_position_embeddings=512,
        ),
        use_vision=True,
        use_audio=True,
        use_knowledge=True,
        max_response_len=shape.response,
        max_context_len=shape.context,
        max_knowledge_len=shape.knowledge,
        max_frames=shape.frames,
        max_audio=shape.audio,
        frame_dim=shape.frame_dim,
        audio_dim=shape.audio_dim,
    )
    model = maria.Maria(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    model.eval()
    return model


def time_runs(run, sync, runs: int):
    """(first search incl. compilation, [seconds of each timed search], last output)."""
    start = time.perf_counter()
    out = sync(run())
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = sync(run())
        times.append(time.perf_counter() - start)
    return first, times, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="base", help="comma-free one of base|small|tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=20)
    p.add_argument("--runs", type=int, default=5, help="timed searches per decoder")
    p.add_argument("--decoders", default=",".join(DECODERS))
    p.add_argument("--dtype", default="auto", help="auto (bf16 on accelerators, f32 on CPU)")
    p.add_argument("--peak_tflops", type=float, default=None)
    p.add_argument("--torch_threads", type=int, default=0, help="0: the CPU count")
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    if jax.devices()[0].platform == "cpu" and args.dtype == "auto":
        args.dtype = "float32"
    elif args.dtype == "auto":
        args.dtype = "bfloat16"
    shape = flops.MARIA_SIZES[args.size]
    env = train_step.environment()
    peak = flops.peak_tflops(env["device"], args.dtype, args.peak_tflops)
    load_before = train_step.load_average()
    model = jax_model(shape, args.dtype)
    host_batch = maria_decode.make_batch(model.config, args.batch)
    cfg = maria.search_config(
        model.config, max_new_tokens=args.new_tokens, num_beams=args.beams, eos_ids=()
    )
    graphdef, state = nnx.split(model)
    dev = jax.devices()[0]
    batch = jax.device_put(host_batch, dev)
    state = jax.device_put(state, dev)
    results, tokens = [], {}
    for name in args.decoders.split(","):
        if name not in DECODERS:
            raise ValueError(f"unknown decoder {name!r}; known: {DECODERS}")
        if name.startswith("jax"):
            cached = name == "jax_cached"
            fn = jax.jit(
                lambda s, b, cached=cached: (
                    maria.generate(nnx.merge(graphdef, s), b, cfg, cached=cached).tokens
                )
            )
            run, sync = (lambda fn=fn: fn(state, batch)), jax.block_until_ready
        else:
            import torch
            import torch_maria

            torch.set_num_threads(args.torch_threads or os.cpu_count())
            device = "cuda" if torch.cuda.is_available() else "cpu"
            torch.manual_seed(0)
            tmodel = torch_maria.TorchMaria(shape).to(device).eval()
            tbatch = torch_maria.to_torch(host_batch, device)
            tdtype = torch.bfloat16 if args.dtype == "bfloat16" else None
            run = functools.partial(
                torch_maria.beam_search_recompute,
                tmodel, tbatch, args.beams, args.new_tokens, tdtype,
            )  # fmt: skip
            sync = lambda x: x.cpu()  # noqa: E731
        first, times, out = time_runs(run, sync, args.runs)
        tokens[name] = np.asarray(out)
        med = statistics.median(times)
        fl = flops.maria_decode_flops(
            shape, args.batch, args.beams, args.new_tokens, name == "jax_cached"
        )
        rec = dict(
            decoder=name,
            tokens_per_s=args.batch * args.new_tokens / med,
            ms_per_step=1e3 * med / args.new_tokens,
            search_s_median=med,
            search_s_min=min(times),
            search_s_max=max(times),
            timed_runs=len(times),
            first_run_s=first,
            flops_per_search=fl,
            mfu=flops.mfu(fl, med, peak),
        )
        results.append(rec)
        print(json.dumps(rec), flush=True)
    by = {r["decoder"]: r for r in results}
    speedups = {}
    if "jax_cached" in by:
        for other in ("torch_recompute", "jax_recompute"):
            if other in by:
                speedups[f"jax_cached_over_{other}"] = (
                    by["jax_cached"]["tokens_per_s"] / by[other]["tokens_per_s"]
                )
    shapes_ok = all(t.shape[-1] == args.new_tokens for t in tokens.values())
    result = dict(
        size=args.size,
        batch=args.batch,
        beams=args.beams,
        new_tokens=args.new_tokens,
        prefix_tokens=shape.tokens - shape.response,
        dtype=args.dtype,
        peak_tflops=peak,
        environment=env,
        load_before=load_before,
        load_after=train_step.load_average(),
        results=results,
        speedups=speedups,
        all_decoded_new_tokens=shapes_ok,
    )
    rows = []
    for r in results:
        util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}"
        rows.append(
            f"| {env['date'][:10]} | {env['device']} | maria {args.size} | {args.batch} | "
            f"{args.beams} | {args.dtype} | {r['decoder']} | {r['tokens_per_s']:.1f} | "
            f"{r['ms_per_step']:.1f} | {r['search_s_min']:.2f}-{r['search_s_max']:.2f} | "
            f"{util} | "
            f"{result['load_before'][0]}/{result['load_after'][0]} |"
        )
    result["markdown"] = "\n".join(rows)
    text = json.dumps(result, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(text if not args.json_out else result["markdown"])
    return result


if __name__ == "__main__":
    main()
