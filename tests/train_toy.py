"""A toy model family, in-memory data and config for the train-loop tests.

Importable by the tests (`import train_toy`) and runnable as a script for the subprocess tests:

    python tests/train_toy.py WORKDIR [--config.total_steps=20 ...] [--signal=SIGKILL:14]

`--signal=NAME:N` makes the process send itself that signal when the input pipeline formats
its N-th training batch (counted from process start; the pipeline reads on the calling thread,
so batch N is the batch of the N-th step this process runs).

The task: regress `y = tanh(x @ W)` from `x` with a tiny MLP whose `encoder` can be frozen.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

# `configs/` is a top-level directory of the repo, importable from the repo root (where the entry
# point runs); pytest and the subprocess start elsewhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from tiktalk_jax import input_pipeline  # noqa: E402
from tiktalk_jax.models import layers, registry  # noqa: E402

D_IN, D_HIDDEN, D_OUT = 8, 16, 4
NUM_RECORDS = 96


class ToyModel(nnx.Module):
    """x float[B, 8] -> float[B, 4]; params annotated with logical axes like the real layers."""

    def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.model.dtype)
        param_dtype = jnp.dtype(config.model.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        # The "pretrained" encoder: its weights come from their own seed, like a loaded tower.
        enc_rngs = nnx.Rngs(int(config.model.encoder_seed))
        self.encoder = layers.linear(D_IN, D_HIDDEN, axes=("embed", "mlp"), rngs=enc_rngs, **kw)
        self.hidden = layers.linear(D_HIDDEN, D_HIDDEN, axes=("embed", "mlp"), rngs=rngs, **kw)
        self.norm = nnx.LayerNorm(D_HIDDEN, rngs=rngs, **kw)
        # Both ways NNX models draw dropout keys: a stream stored in the module (as the BERT
        # port does; its counter is model state the loop must carry and checkpoint) and the
        # `rngs` the loop passes to loss_fn.
        rate = float(config.model.dropout)
        self.stored_dropout = nnx.Dropout(rate, rngs=rngs)
        self.dropout = nnx.Dropout(rate)
        self.head = layers.linear(D_HIDDEN, D_OUT, axes=("mlp", "embed"), rngs=rngs, **kw)

    def __call__(self, x, *, rngs=None):
        h = jnp.tanh(self.encoder(x))
        h = self.stored_dropout(jax.nn.gelu(self.hidden(h)))
        return self.head(self.dropout(self.norm(h), rngs=rngs))


def build(config, rngs):
    return ToyModel(config, rngs)


def loss_fn(model, batch, rngs):
    pred = model(batch["x"], rngs=rngs).astype(jnp.float32)
    err = jnp.mean((pred - batch["y"]) ** 2, axis=-1)
    mask = batch["example_mask"].astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    loss = jnp.sum(err * mask) / denom
    mae = jnp.sum(jnp.mean(jnp.abs(pred - batch["y"]), -1) * mask) / denom
    return loss, {"mae": mae}


class ToyFormatter:
    """records -> {"x": float32[B, 8], "y": float32[B, 4]}; optionally signals itself."""

    def __init__(self, config, tokenizer, *, train):
        del config, tokenizer
        self.train = train
        self.calls = 0
        spec = os.environ.get("TOY_SIGNAL", "") if train else ""
        self.signal = None
        if spec:
            name, at = spec.split(":")
            self.signal = (getattr(signal, name), int(at))

    def __call__(self, records):
        self.calls += 1
        if self.signal and self.calls == self.signal[1]:
            os.kill(os.getpid(), self.signal[0])
        return {
            "x": np.stack([np.asarray(r["x"], np.float32) for r in records]),
            "y": np.stack([np.asarray(r["y"], np.float32) for r in records]),
        }


if "toy" not in input_pipeline.registered_formatters():
    input_pipeline.register_formatter("toy", batched=True)(ToyFormatter)
registry.register(
    registry.ModelFamily(
        name="toy",
        build=build,
        loss_fn=loss_fn,
        formatter="toy",
        frozen_source=lambda config: f"toy-encoder-seed-{config.model.encoder_seed}",
    ),
    override=True,
)


def records(n: int = NUM_RECORDS, seed: int = 0) -> list[dict]:
    """n examples of one fixed task; `seed` draws other inputs (train: 0, val: 1)."""
    w = np.random.default_rng(1234).normal(size=(D_IN, D_OUT)) / np.sqrt(D_IN)
    x = np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32)
    y = np.tanh(x @ w).astype(np.float32)
    return [{"dialogue_id": str(i), "x": x[i], "y": y[i]} for i in range(n)]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The toy config: 8 devices as data=4 x fsdp=2, tiny everything."""
    del arg
    config = common.base_config()
    config.model.name = "toy"
    config.model.encoder_seed = 7
    config.model.dropout = 0.1
    config.total_steps = 20
    config.log_every = 1
    config.checkpoint_every = 5
    config.keep_checkpoints = 10
    config.mesh = ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1))
    config.optim.lr = 3e-2
    config.optim.warmup_steps = 2
    config.optim.weight_decay = 1e-4
    config.input.batch_size = 16
    config.input.eval_batch_size = 16
    config.input.read_threads = 0
    config.input.prefetch_buffer = 0
    return config


def datasets(config, source=None) -> input_pipeline.Datasets:
    """The toy train/val pipelines over in-memory records (a real grain pipeline)."""
    source = records() if source is None else source
    val = records(24, seed=1)
    cfg = config.input
    args = dict(read_threads=cfg.read_threads, prefetch_buffer=cfg.prefetch_buffer)
    train = input_pipeline.train_dataset(
        source,
        input_pipeline.get_formatter("toy", cfg, None, train=True),
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        **args,
    )
    evals = {
        "val": input_pipeline.eval_dataset(
            val,
            input_pipeline.get_formatter("toy", cfg, None, train=False),
            global_batch_size=cfg.eval_batch_size,
            **args,
        )
    }
    return input_pipeline.Datasets(
        train=train,
        evals=evals,
        eval_sources={"val": val},
        num_eval_batches={"val": input_pipeline.num_eval_batches(len(val), cfg.eval_batch_size, 1)},
        tokenizer=None,
        skipped={},
    )


def main(argv: list[str]) -> None:
    from absl import logging as absl_logging

    from tiktalk_jax import train

    workdir, overrides = argv[0], argv[1:]
    config = get_config()
    for item in overrides:
        if item.startswith("--signal="):
            os.environ["TOY_SIGNAL"] = item.split("=", 1)[1]
            continue
        key, value = item.removeprefix("--config.").split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    absl_logging.set_verbosity(absl_logging.WARNING)
    result = train.train_and_evaluate(config, workdir, datasets=datasets(config))
    print(f"FINISHED step={result.step} preempted={result.preempted}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
