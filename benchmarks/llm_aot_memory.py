"""Ahead-of-time memory of the LLM train step: per-device footprint on an fsdp x tensor mesh.

    # 8 fake CPU devices (XLA:CPU's buffer assignment: an approximation, see below)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        .venv/bin/python benchmarks/llm_aot_memory.py
    # TPU v5e 2x4 compiled by the real TPU compiler on a machine without a TPU: needs libtpu
    # (`pip install "libtpu==0.0.42.*"`, the `jax[tpu]` pin of jax 0.10.2) importable
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/llm_aot_memory.py --topology=v5e:2x4
    # on a host with 8 GPUs or TPU chips: compile for the local devices
    .venv/bin/python benchmarks/llm_aot_memory.py
    .venv/bin/python benchmarks/llm_aot_memory.py --cases=lora_remat --batch=128 --mesh=fsdp=8

What is compiled is the shared loop's train step itself (`tiktalk_jax.train._Steps.train_step`:
forward, backward w.r.t. the trainable parameters, clipping, AdamW, the non-finite guard,
metrics), with the loop's carry / frozen / batch shardings and the carry donated, for the family
"llm" built from `configs/llm_text.py` with the random-init `--shape` (Qwen2.5-7B by default).
Nothing is allocated: the model and optimizer are built with `nnx.eval_shape`, every argument is
a `jax.ShapeDtypeStruct` carrying its `NamedSharding`, and `jit(...).lower(...).compile()` runs
on those; `compiled.memory_analysis()` then gives the per-device sizes of one SPMD partition.

Per device: arguments (frozen base + trainable params + optimizer state + batch), temporaries
(activations kept for the backward pass, gradients, workspace), outputs not aliased to donated
inputs; peak <= arguments + temporaries + unaliased outputs (XLA's buffer assignment can reuse
argument buffers, so this is an upper estimate of what the executable needs beyond the runtime).

The CPU backend's buffer assignment only approximates an accelerator's: fusion, layouts, the
scheduler and bf16 handling differ (XLA:CPU computes bf16 dots in f32 and keeps f32 copies of
the bf16 weights). `--topology` compiles for a TPU slice with the TPU compiler itself (a
compile-only client, `jax.experimental.topologies`), whose memory analysis is the TPU's. On a
host with 8 GPUs or TPU chips, run without the XLA_FLAGS / JAX_PLATFORMS variables to compile
for the real devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from configs import llm_text  # noqa: E402
from tiktalk_jax import optim, sharding, train  # noqa: E402
from tiktalk_jax.models import registry  # noqa: E402

GIB = 1024**3
DEVICES = {"H100 80GB": 80e9, "TPU v5e (16 GB)": 16e9}
# name -> (LoRA?, remat?)
CASES = {
    "lora_remat": (True, True),
    "lora": (True, False),
    "full_remat": (False, True),
}


@dataclasses.dataclass
class Footprint:
    case: str
    shape: str
    mesh: dict[str, int]
    batch: int
    seq_len: int
    trainable_params: int
    frozen_params: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    frozen_bytes_per_device: int
    state_bytes_per_device: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def make_config(args, lora: bool, remat: bool) -> ml_collections.ConfigDict:
    config = llm_text.get_config(f"size={args.shape},lora={lora}")
    config.model.remat = remat
    config.model.attention_impl = args.attention_impl
    config.input.batch_size = args.batch
    config.input.max_context_len = args.context
    config.input.max_response_len = args.response
    config.mesh = ml_collections.ConfigDict(dict(data=1, **args.mesh))
    return config


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _per_device_bytes(tree, shardings) -> int:
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = s.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def compile_step(
    config: ml_collections.ConfigDict, case: str, shape: str, devices=None
) -> Footprint:
    """Compiles the loop's train step for `config` on abstract inputs over `devices` (default:
    the local ones); returns its footprint."""
    family = registry.get(config.model.name)
    mesh = sharding.make_mesh(config.mesh, devices)
    total = int(config.total_steps)

    def make():
        model = family.build(config, nnx.Rngs(0))
        return model, optim.make_optimizer(model, config.optim, total, config.frozen)

    # Shapes only, outside any mesh (logical axis names are not mesh axes; see
    # hf_import.abstract_module).
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        model, optimizer = nnx.eval_shape(make)
    frozen_f = optim.frozen_filter(config.frozen)
    trainable_f = optim.trainable_filter(config.frozen)
    model_def, frozen, params, rest = nnx.split(model, frozen_f, trainable_f, ...)
    opt_def, opt_state = nnx.split(optimizer)

    rules = tuple(tuple(r) for r in config.sharding.rules)
    place = lambda s: sharding.state_shardings(s, mesh, rules, ())  # noqa: E731
    steps = train._Steps(family, config, mesh, model_def, model_def, opt_def, trainable_f)
    steps.metrics_cls = train._metrics_class(["loss", "grad_norm", "token_accuracy", "tokens"])
    # The loop's own carry layout and shardings, abstract.
    carry = jax.eval_shape(lambda p, r, o: train.new_carry(p, r, o, 0), params, rest, opt_state)
    carry["metrics"] = jax.eval_shape(steps.metrics_cls.empty)
    carry_sh = train.carry_shardings(carry, mesh, place)
    frozen_sh = place(frozen)
    b, lc, lr = (
        int(config.input[k]) for k in ("batch_size", "max_context_len", "max_response_len")
    )
    batch = {
        "prompt_ids": jax.ShapeDtypeStruct((b, lc), jnp.int32),
        "prompt_mask": jax.ShapeDtypeStruct((b, lc), jnp.bool_),
        "response_ids": jax.ShapeDtypeStruct((b, lr), jnp.int32),
        "response_mask": jax.ShapeDtypeStruct((b, lr), jnp.bool_),
        "example_mask": jax.ShapeDtypeStruct((b,), jnp.bool_),
        "record_index": jax.ShapeDtypeStruct((b,), jnp.int32),
    }
    batch_sh = jax.tree.map(lambda _: NamedSharding(mesh, sharding.batch_spec(mesh)), batch)

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step = jax.jit(
            steps.train_step,
            in_shardings=(carry_sh, frozen_sh, batch_sh),
            out_shardings=carry_sh,
            donate_argnums=(0,),
        )
        lowered = step.lower(
            _abstract(carry, carry_sh), _abstract(frozen, frozen_sh), _abstract(batch, batch_sh)
        )
        compiled = lowered.compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    state = {"params": params, "opt": opt_state}
    state_sh = {"params": carry_sh["params"], "opt": carry_sh["opt"]}
    return Footprint(
        case=case,
        shape=shape,
        mesh=dict(mesh.shape),
        batch=b,
        seq_len=lc + lr,
        trainable_params=_count(params),
        frozen_params=_count(frozen),
        argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        frozen_bytes_per_device=_per_device_bytes(frozen, frozen_sh),
        state_bytes_per_device=_per_device_bytes(state, state_sh),
        compile_seconds=seconds,
    )


def table(rows: list[Footprint]) -> str:
    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    head = (
        "| case | trainable / frozen params | frozen base / device (GiB) | trainable + Adam / "
        "device | arguments | temporaries | peak / device | "
        + " | ".join(f"fits {d}" for d in DEVICES)
        + " |"
    )
    lines = [head, "|" + "---|" * (7 + len(DEVICES))]
    for r in rows:
        fits = [
            f"yes ({100 * r.peak_bytes / cap:.0f}%)" if r.peak_bytes < cap else "no"
            for cap in DEVICES.values()
        ]
        lines.append(
            f"| {r.case} | {r.trainable_params / 1e6:,.1f}M / {r.frozen_params / 1e9:.2f}B | "
            f"{gib(r.frozen_bytes_per_device)} | {gib(r.state_bytes_per_device)} | "
            f"{gib(r.argument_bytes)} | {gib(r.temp_bytes)} | **{gib(r.peak_bytes)}** | "
            + " | ".join(fits)
            + " |"
        )
    return "\n".join(lines)


def _mesh_arg(text: str) -> dict[str, int]:
    axes = dict(item.split("=") for item in text.split(","))
    out = {"fsdp": int(axes.pop("fsdp", 1)), "tensor": int(axes.pop("tensor", 1))}
    if axes:
        raise ValueError(f"unknown mesh axes {sorted(axes)} (fsdp, tensor)")
    return out


def main(argv=None) -> list[Footprint]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen2.5-7b")
    parser.add_argument("--mesh", type=_mesh_arg, default=_mesh_arg("fsdp=4,tensor=2"))
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--context", type=int, default=224, help="prompt tokens")
    parser.add_argument("--response", type=int, default=32, help="response tokens")
    parser.add_argument("--cases", default="lora_remat,lora", help=",".join(CASES))
    parser.add_argument("--attention_impl", default="auto", help="auto | xla | cudnn")
    parser.add_argument("--topology", default=None, help="compile for a TPU slice, e.g. v5e:2x4")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    n = args.mesh["fsdp"] * args.mesh["tensor"]
    devices = None
    if args.topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(args.topology, platform="tpu").devices
        if len(devices) != n:
            raise SystemExit(f"topology {args.topology} has {len(devices)} devices, mesh {n}")
    elif jax.device_count() != n:
        raise SystemExit(
            f"mesh {args.mesh} needs {n} devices, have {jax.device_count()}: on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu"
        )
    rows = []
    for case in args.cases.split(","):
        lora, remat = CASES[case]
        config = make_config(args, lora, remat)
        row = compile_step(config, case, args.shape, devices)
        print(f"{case}: peak {row.peak_bytes / GIB:.2f} GiB/device, compiled in "
              f"{row.compile_seconds:.0f} s", flush=True)  # fmt: skip
        rows.append(row)
    print()
    target = (devices or jax.devices())[0]
    print(
        f"{args.shape}, mesh {rows[0].mesh}, global batch {args.batch}, sequence "
        f"{args.context}+{args.response}, compiled for {target.platform} "
        f"({target.device_kind}{', compile-only' if devices else ''}), jax {jax.__version__}, "
        f"{datetime.date.today()}, {platform.node() or 'host'}"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"peak_bytes": r.peak_bytes} for r in rows], f,
                      indent=1)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
