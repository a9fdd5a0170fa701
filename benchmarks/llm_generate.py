"""LLM generation speed: prefill and cached decode tokens/s of `tiktalk_jax.models.llm`.

    .venv/bin/python benchmarks/llm_generate.py                       # CPU: small random model
    python benchmarks/llm_generate.py --shape=qwen2.5-7b --dtype=bfloat16 --batch=8,32   # GPU

Random weights (a `llm.SHAPES` shape or the script's own "small"), random prompts of `--prompt`
tokens, all real (no padding). Prefill: the jitted `llm.prefill` (the prompt into a KV cache of
prompt + `--new` slots and the first logits); prefill tokens/s = batch * prompt / time. Decode:
the jitted `llm.generate` (prefill + `--new` steps of greedy search, or beam search with
`--method=beam`) with the end tokens disabled so every run decodes exactly `--new` tokens;
decode time = generate - prefill, decode tokens/s = batch * new / decode time (a beam search
counts once per example and step), and ms per step. Compilation is excluded (one warm-up run
each); medians of `--repeats` timed runs.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tiktalk_jax.models import llm  # noqa: E402

# A small Qwen2-style decoder that runs on a laptop CPU (55M parameters, 32k vocabulary).
SMALL = dict(
    model_type="qwen2",
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(shape: str, dtype: str, batch: int, prompt: int, new: int, method: str, repeats: int):
    hf = dict(SMALL if shape == "small" else llm.SHAPES[shape])
    hf.setdefault("vocab_size", 32000)
    config = llm.LlmConfig.from_hf(hf, eos_token_ids=(), pad_token_id=0)
    dt = jnp.dtype(dtype)
    model = llm.Llm(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (batch, prompt)))
    mask = jnp.ones(ids.shape, bool)
    cfg = llm.search_config(config, max_new_tokens=new, num_beams=5, eos_ids=())
    prefill = nnx.jit(llm.prefill, static_argnums=(3,))
    generate = nnx.jit(llm.generate, static_argnames=("cfg", "method"))
    t_prefill = _time(lambda: prefill(model, ids, mask, new).first_logits, repeats)
    t_gen = _time(lambda: generate(model, ids, mask, cfg=cfg, method=method).tokens, repeats)
    t_decode = max(t_gen - t_prefill, 1e-9)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return dict(
        shape=shape,
        params_m=params / 1e6,
        batch=batch,
        prompt=prompt,
        new=new,
        method=method,
        prefill_tok_s=batch * prompt / t_prefill,
        prefill_ms=1e3 * t_prefill,
        decode_tok_s=batch * new / t_decode,
        ms_per_step=1e3 * t_decode / new,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="small", help="small or a llm.SHAPES name")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--method", default="greedy", help="greedy | beam")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"{datetime.date.today()} {platform.node() or 'host'}: backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}, {jax.device_count()} devices), jax {jax.__version__}, "
        f"flax {flax.__version__}, {args.dtype}, {args.method}"
    )
    print("| shape | params | batch | prompt | new | prefill tok/s | prefill ms | decode tok/s "
          "| ms/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batch.split(",")):
        r = run(args.shape, args.dtype, b, args.prompt, args.new, args.method, args.repeats)
        print(
            f"| {r['shape']} | {r['params_m']:.0f}M | {b} | {r['prompt']} | {r['new']} | "
            f"{r['prefill_tok_s']:,.0f} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:,.1f} | "
            f"{r['ms_per_step']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
