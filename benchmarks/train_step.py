r"""Train-step throughput and MFU: this project's step vs the PyTorch reference, in one run.

    .venv/bin/python benchmarks/train_step.py --model=maria --size=base --batch=64
    .venv/bin/python benchmarks/train_step.py --model=maria --size=small --batch=16 \
        --impls=jax,torch_eager,torch_compile --peak_tflops=1.2          # CPU, MFU vs 1.2 TF/s
    .venv/bin/python benchmarks/train_step.py --model=maria --size=tiny --batch=32 \
        --data=both --data_workdir=/tmp/sample      # + fed by the real input pipeline
    .venv/bin/python benchmarks/train_step.py --model=blip2 --size=1.5b --batch=32

JAX side: the project's own step, built as tiktalk_jax/train.py builds it (the registry family's
`build` and `loss_fn`, `optim.make_optimizer`, `train._Steps.train_step`, in/out shardings from
the params' logical axes, the carry donated), from configs/maria.py (or configs/blip2.py) with
the size's BERT shape and the paper's lengths (40 + 100 + 40 text, 50 frames, 50 audio rows).
One device. PyTorch side (Maria only): benchmarks/torch_maria.py, eager and `torch.compile`.
BLIP-2 has no PyTorch reference here (the target is MFU only).

Measured per implementation: compile / first-step seconds (reported, excluded), then `--warmup`
untimed steps and `--steps` timed steps, each timed to completion (the device is synchronised
after every step); examples/s and tokens/s from the median step; median, p10-p90 and min-max
step time; peak device memory (GPU; n/a on CPU); MFU from the FLOP count of benchmarks/flops.py
(model FLOPs only) against `--peak_tflops` or the device's bf16 peak (n/a on CPU without the
flag). The load average is recorded before and after (the CPU machine is shared).

--data=pipeline|both (Maria): the same compiled step fed (a) by the real input pipeline (grain
over the built dataset, features and knowledge joined, `make_global` per step, as train.py's
loop) and (b) by one device-resident batch (the pipeline's first); both loops dispatch without
per-step synchronisation, as train.py does, and report examples/s and their ratio (target: the
pipeline-fed step within 5%). `--data_workdir` holds a demo layout (raw/, data/); an empty one
is prepared with the bundled sample (tiktalk_jax/main.py prepare_sample).

Output: a JSON record (`--json_out`, else stdout) and Markdown rows (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

# Both frameworks share one GPU: JAX must not grab 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import flax  # noqa: E402
import flops  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from tiktalk_jax import input_pipeline, sharding, train  # noqa: E402
from tiktalk_jax.models import registry  # noqa: E402

IMPLS = ("jax", "torch_eager", "torch_compile")


# ---------------------------------------------------------------------------------------------
# Environment.
# ---------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict:
    import transformers

    dev = jax.devices()[0]
    env = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=f"{dev.platform} {dev.device_kind}",
        host=f"{platform.machine()}, {os.cpu_count()} CPUs",
        python=platform.python_version(),
        jax=jax.__version__,
        flax=flax.__version__,
        transformers=transformers.__version__,
    )
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name()
    except ImportError:
        env["torch"] = None
    return env


def write_vocab(directory: str, size: int) -> str:
    """A bert-base-chinese-shaped vocab.txt of `size` tokens ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103): the configs take their vocabulary and special ids from a tokenizer."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"t{i}" for i in range(size - len(tokens))]
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens[:size]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Configs and synthetic batches.
# ---------------------------------------------------------------------------------------------


def maria_config(shape: flops.MariaShape, batch: int, dtype: str, vocab_file: str | None):
    """configs/maria.py (T+V+A+K, base settings) with `shape`'s BERT and lengths, one device."""
    from configs import maria as maria_config_lib

    config = maria_config_lib.get_config("variant=tvak,size=base")
    config.model.bert.update(
        dict(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            max_position_embeddings=512,
        )
    )
    config.model.dtype = dtype
    inp = config.input
    inp.tokenizer = vocab_file
    inp.max_response_len, inp.max_context_len = shape.response, shape.context
    inp.max_knowledge_len, inp.max_frames, inp.max_audio = (
        shape.knowledge,
        shape.frames,
        shape.audio,
    )
    inp.frame_dim, inp.audio_dim = shape.frame_dim, shape.audio_dim
    inp.batch_size = batch
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    config.total_steps = 1000
    return config


def maria_batch(shape: flops.MariaShape, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Maria batch with realistic fill (segments partly padded, >= 1 real token each)."""
    rng = np.random.default_rng(seed)

    def text(length, lo, first=None):
        lengths = rng.integers(min(lo, length), length + 1, batch)
        valid = np.arange(length) < lengths[:, None]
        ids = rng.integers(200, shape.vocab, (batch, length))
        if first is not None:
            ids[:, 0] = first
        return np.where(valid, ids, 0).astype(np.int32), valid

    out = {}
    out["response_ids"], out["response_mask"] = text(shape.response, 4, first=101)
    out["context_ids"], out["context_mask"] = text(shape.context, 10)
    out["knowledge_ids"], out["knowledge_mask"] = text(shape.knowledge, 5)
    for name, n, dim in (("frame", shape.frames, shape.frame_dim), ("audio", shape.audio,
                                                                     shape.audio_dim)):  # fmt: skip
        out[f"{name}_feats"] = rng.normal(size=(batch, n, dim)).astype(np.float32)
        out[f"{name}_mask"] = np.arange(n) < rng.integers(max(n // 2, 1), n + 1, batch)[:, None]
    out["example_mask"] = np.ones((batch,), bool)
    return out


def blip2_config(size: str, batch: int, vocab_file: str, remat: str, instruct: bool = False):
    """configs/blip2.py (video variant), the LLM of `size` (tiny | 0.5b | 1.5b | 7b), one device;
    `instruct`: instruction-aware queries."""
    from configs import blip2 as blip2_config_lib

    names = {"tiny": "tiny", "0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "7b": "qwen2.5-7b"}
    if size not in names:
        raise ValueError(f"blip2 sizes: {sorted(names)}")
    # Registered here for the benchmark only (the configs know 0.5B and 7B).
    config = blip2_config_lib.get_config(f"variant=video,size={names[size]},instruct={instruct}")
    config.input.tokenizer = vocab_file
    config.input.batch_size = batch
    if remat != "auto":
        config.model.llm.remat = remat == "on"
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    return config


def blip2_batch(config, batch: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random BLIP-2 batch: left-padded prompt, right-padded response, one visual frame."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    inp = config.input
    lc, lr = int(inp.max_context_len), int(inp.max_response_len)
    plen = rng.integers(lc // 2, lc + 1, batch)
    rlen = rng.integers(4, lr + 1, batch)
    dtype = ml_dtypes.bfloat16 if inp.visual_dtype == "bfloat16" else np.float32
    frames, n, dv = int(inp.visual_frames), int(inp.visual_tokens), int(inp.visual_dim)
    return dict(
        prompt_ids=rng.integers(200, vocab, (batch, lc)).astype(np.int32),
        prompt_mask=np.arange(lc)[None, :] >= lc - plen[:, None],
        response_ids=rng.integers(200, vocab, (batch, lr)).astype(np.int32),
        response_mask=np.arange(lr)[None, :] < rlen[:, None],
        visual=rng.normal(size=(batch, frames, n, dv)).astype(dtype),
        visual_mask=np.ones((batch, frames), bool),
        example_mask=np.ones((batch,), bool),
    )


def blip2_shape(model, config) -> flops.Blip2Shape:
    q, lc = model.qformer.config, model.llm.config
    inp = config.input
    return flops.Blip2Shape(
        q_hidden=q.hidden_size,
        q_layers=q.num_hidden_layers,
        q_intermediate=q.intermediate_size,
        queries=model.num_queries,
        cross_every=q.cross_attention_frequency,
        visual_tokens=int(inp.visual_tokens),
        visual_frames=int(inp.visual_frames),
        visual_dim=int(inp.visual_dim),
        llm_hidden=lc.hidden_size,
        llm_layers=lc.num_hidden_layers,
        llm_intermediate=lc.intermediate_size,
        llm_heads=lc.num_attention_heads,
        llm_kv_heads=lc.num_key_value_heads,
        llm_head_dim=lc.head_dim,
        llm_vocab=lc.vocab_size,
        prompt=int(inp.max_context_len),
        response=int(inp.max_response_len),
        instruction=int(inp.max_context_len) if model.instructed else 0,
    )


# ---------------------------------------------------------------------------------------------
# The project's train step (as train.train_and_evaluate builds it).
# ---------------------------------------------------------------------------------------------


class JaxStep:
    """The jitted, carry-donating train step of `train.py` for `config` on `mesh`.

    Attributes: `step(carry, frozen, batch) -> carry` (compiled), `carry`, `frozen`, `model`
    (a view for reading shapes), `compile_s`.
    """

    def __init__(self, config, mesh, example_batch: dict):
        family = registry.get(config.model.name)
        self.mesh = mesh
        with jax.set_mesh(mesh):
            # The loop's own builders: the timed step is the one train.py runs.
            state = train.init_state(config, mesh, family)
            carry, self.frozen = state.carry, state.frozen
            self.info = nnx.merge(
                state.steps.model_def, self.frozen, carry["params"], carry["rest"]
            )
            self.model_config = getattr(self.info, "config", None)
            self.batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
            batch = self.to_device(example_batch)
            jitted, _ = train.compile_steps(state, mesh, batch)
            self.carry = state.carry
            start = time.perf_counter()
            self.step = jitted.lower(self.carry, self.frozen, batch).compile()
            self.compile_s = time.perf_counter() - start

    def to_device(self, host_batch: dict) -> dict:
        return input_pipeline.make_global(host_batch, self.mesh)

    def __call__(self, batch: dict) -> jax.Array:
        self.carry = self.step(self.carry, self.frozen, batch)
        return self.carry["step"]


def jax_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def time_steps(run, sync, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(first call incl. compilation, [seconds of each timed step]); every step synchronised."""
    start = time.perf_counter()
    sync(run())
    first = time.perf_counter() - start
    for _ in range(warmup):
        sync(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return first, times


def summarize(
    name: str,
    times: list[float],
    batch: int,
    tokens: int,
    flops_per_step: float,
    peak_tflops: float | None,
    **extra,
) -> dict:
    med = statistics.median(times)
    q = np.percentile(times, [10, 90]) if len(times) > 1 else [med, med]
    util = flops.mfu(flops_per_step, med, peak_tflops)
    return dict(
        impl=name,
        examples_per_s=batch / med,
        tokens_per_s=batch * tokens / med,
        step_ms_median=1e3 * med,
        step_ms_p10=1e3 * float(q[0]),
        step_ms_p90=1e3 * float(q[1]),
        step_ms_min=1e3 * min(times),
        step_ms_max=1e3 * max(times),
        timed_steps=len(times),
        flops_per_step=flops_per_step,
        tflops_per_s=flops_per_step / med / 1e12,
        mfu=util,
        **extra,
    )


def run_jax(config, host_batch, args, tokens, flops_per_step, peak) -> tuple[dict, JaxStep]:
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    step = JaxStep(config, mesh, host_batch)
    batch = step.to_device(host_batch)
    first, times = time_steps(lambda: step(batch), jax.block_until_ready, args.warmup, args.steps)
    peak_bytes = jax_peak_bytes()
    rec = summarize(
        "jax", times, args.batch, tokens, flops_per_step, peak,
        compile_s=step.compile_s, first_step_s=first,
        peak_memory_gb=None if peak_bytes is None else peak_bytes / 2**30,
    )  # fmt: skip
    return rec, step


def run_torch(compile: bool, shape, host_batch, args, tokens, flops_per_step, peak) -> dict:
    import torch
    import torch_maria

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    torch.manual_seed(0)
    model = torch_maria.TorchMaria(shape).to(device).train()
    step = torch_maria.TrainStep(model, dtype, compile=compile)
    batch = torch_maria.to_torch(host_batch, device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda x: x.item())
    first, times = time_steps(lambda: step(batch), sync, args.warmup, args.steps)
    peak_bytes = torch.cuda.max_memory_allocated() if cuda else None
    name = "torch_compile" if compile else "torch_eager"
    return summarize(
        name, times, args.batch, tokens, flops_per_step, peak,
        first_step_s=first, peak_memory_gb=None if peak_bytes is None else peak_bytes / 2**30,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# End to end: the real input pipeline vs a device-resident batch.
# ---------------------------------------------------------------------------------------------


def _sample_features(workdir: str) -> dict:
    """Features of a prepared demo workdir, preparing the bundled sample when it has none."""
    import ablation

    from tiktalk_jax import main as entry

    return ablation._features(workdir) or entry.prepare_sample(workdir, seed=0)


def run_pipeline(shape: flops.MariaShape, args, peak) -> dict:
    from tiktalk_jax import main as entry

    workdir = args.data_workdir
    features = _sample_features(workdir)
    config = entry.sample_config("tvak", workdir, features, 1000)
    config.model.bert.update(
        dict(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            max_position_embeddings=512,
        )
    )
    config.model.dtype = args.dtype
    inp = config.input
    inp.max_response_len, inp.max_context_len = shape.response, shape.context
    inp.max_knowledge_len, inp.max_frames, inp.max_audio = (
        shape.knowledge,
        shape.frames,
        shape.audio,
    )
    inp.batch_size = args.batch
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    family = registry.get("maria")
    datasets = input_pipeline.make_datasets(config, side_tables=family.side_tables(config))
    it = iter(datasets.train)
    first = next(it)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    step = JaxStep(config, mesh, first)
    fed_shape = flops.MariaShape(
        **{**shape.__dict__, "frame_dim": int(inp.frame_dim), "audio_dim": int(inp.audio_dim)}
    )
    fl = flops.maria_train_flops(fed_shape, step.model_config.max_masked, args.batch)

    def loop(next_batch) -> float:
        for _ in range(max(args.warmup, 1)):
            step(next_batch())
        jax.block_until_ready(step.carry)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(next_batch())  # dispatch only: the host prepares the next batch meanwhile
        jax.block_until_ready(step.carry)
        return (time.perf_counter() - start) / args.steps

    resident = step.to_device(first)
    t_resident = loop(lambda: resident)
    t_pipeline = loop(lambda: step.to_device(next(it)))
    out = {}
    for name, sec in (("synthetic_resident", t_resident), ("input_pipeline", t_pipeline)):
        out[name] = dict(
            examples_per_s=args.batch / sec,
            step_ms=1e3 * sec,
            mfu=flops.mfu(fl, sec, peak),
        )
    out["pipeline_over_resident"] = t_resident / t_pipeline
    out["data"] = f"{workdir} (tvak; feature dims {inp.frame_dim}/{inp.audio_dim})"
    out["timed_steps"] = args.steps
    return out


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------


def markdown_rows(result: dict) -> str:
    env, rows = result["environment"], []
    eager = next((r for r in result["results"] if r["impl"] == "torch_eager"), None)
    fmt = lambda x, f="{:.1f}": "n/a" if x is None else f.format(x)
    for r in result["results"]:
        ratio = eager and r["examples_per_s"] / eager["examples_per_s"]
        compile_s = r.get("compile_s", r["first_step_s"])
        rows.append(
            f"| {env['date'][:10]} | {env['device']} | {result['model']} {result['size']} | "
            f"{result['batch']} | {result['dtype']} | {r['impl']} | {r['examples_per_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['step_ms_median']:.1f} "
            f"({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f}) | {compile_s:.1f} | "
            f"{fmt(r['peak_memory_gb'], '{:.2f}')} | {fmt(r['mfu'] and 100 * r['mfu'])} | "
            f"{fmt(ratio, '{:.2f}x')} | {result['load_before'][0]}/{result['load_after'][0]} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="maria", choices=("maria", "blip2"))
    p.add_argument(
        "--size", default="base", help="maria: base|small|tiny; blip2: tiny|0.5b|1.5b|7b"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--impls", default=",".join(IMPLS), help="maria: comma list of " + str(IMPLS))
    p.add_argument("--dtype", default="auto", help="auto (bf16 on accelerators, f32 on CPU)")
    p.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU")
    p.add_argument("--data", default="synthetic", choices=("synthetic", "pipeline", "both"))
    p.add_argument("--data_workdir", default=None, help="demo layout for --data=pipeline|both")
    p.add_argument("--torch_threads", type=int, default=0, help="0: the CPU count")
    p.add_argument("--llm_remat", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--instruct", action="store_true", help="blip2: instruction-aware queries")
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    cpu = jax.devices()[0].platform == "cpu"
    if args.dtype == "auto":
        args.dtype = "float32" if cpu else "bfloat16"
    if "torch" in args.impls:
        import torch

        # One intra-op pool the size of the machine (the default may count hyperthreads or
        # be capped by the environment), no inter-op oversubscription.
        torch.set_num_threads(args.torch_threads or os.cpu_count())
    env = environment()
    peak = flops.peak_tflops(env["device"], args.dtype, args.peak_tflops)
    load_before = load_average()
    results = []
    extra = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "maria":
            if args.size not in flops.MARIA_SIZES:
                raise ValueError(f"maria sizes: {sorted(flops.MARIA_SIZES)}")
            shape = flops.MARIA_SIZES[args.size]
            vocab_file = write_vocab(tmp, shape.vocab)
            host_batch = maria_batch(shape, args.batch)
            masked = None
            if args.data in ("synthetic", "both"):
                for impl in args.impls.split(","):
                    if impl not in IMPLS:
                        raise ValueError(f"unknown impl {impl!r}")
                for impl in args.impls.split(","):
                    if impl == "jax":
                        config = maria_config(shape, args.batch, args.dtype, vocab_file)
                        from tiktalk_jax.models import maria

                        masked = maria.model_config(config).max_masked
                        fl = flops.maria_train_flops(shape, masked, args.batch)
                        rec, _ = run_jax(config, host_batch, args, shape.tokens, fl, peak)
                    else:
                        import torch_maria

                        masked = torch_maria.max_masked(shape)
                        fl = flops.maria_train_flops(shape, masked, args.batch)
                        compile = impl == "torch_compile"
                        rec = run_torch(compile, shape, host_batch, args, shape.tokens, fl, peak)
                    results.append(rec)
                    print(json.dumps(rec), flush=True)
            if args.data in ("pipeline", "both"):
                if not args.data_workdir:
                    raise ValueError("--data=pipeline|both needs --data_workdir")
                extra["end_to_end"] = run_pipeline(shape, args, peak)
                print(json.dumps(extra["end_to_end"]), flush=True)
            tokens = shape.tokens
        else:
            vocab_size = 1000 if args.size == "tiny" else 21128
            vocab_file = write_vocab(tmp, vocab_size)
            config = blip2_config(args.size, args.batch, vocab_file, args.llm_remat, args.instruct)
            host_batch = blip2_batch(config, args.batch, vocab_size)
            mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
            step = JaxStep(config, mesh, host_batch)
            shape_b = blip2_shape(step.info, config)
            fl = flops.blip2_train_flops(shape_b, args.batch)
            batch = step.to_device(host_batch)
            first, times = time_steps(
                lambda: step(batch), jax.block_until_ready, args.warmup, args.steps
            )
            peak_bytes = jax_peak_bytes()
            tokens = shape_b.llm_tokens
            rec = summarize(
                "jax", times, args.batch, tokens, fl, peak, compile_s=step.compile_s,
                first_step_s=first,
                peak_memory_gb=None if peak_bytes is None else peak_bytes / 2**30,
            )  # fmt: skip
            results.append(rec)
            extra["blip2_shape"] = shape_b.__dict__
            extra["llm_remat"] = bool(config.model.llm.remat)
            extra["reference"] = "none (BLIP-2 target: MFU only)"
    result = dict(
        model=args.model,
        size=args.size,
        batch=args.batch,
        dtype=args.dtype,
        tokens_per_example=tokens,
        peak_tflops=peak,
        environment=env,
        load_before=load_before,
        load_after=load_average(),
        max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        results=results,
        **extra,
    )
    by = {r["impl"]: r for r in results}
    if "jax" in by:
        result["ratios"] = {
            f"jax_over_{k}": by["jax"]["examples_per_s"] / v["examples_per_s"]
            for k, v in by.items()
            if k != "jax"
        }
    result["markdown"] = markdown_rows(result)
    text = json.dumps(result, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(text if not args.json_out else result["markdown"])
    return result


if __name__ == "__main__":
    main()
