r"""The training loop shared by every model family.

    python -m tiktalk_jax.train --config=configs/maria.py:variant=tvak,size=tiny \
        --workdir=/tmp/maria [--config.total_steps=200 ...]

(`python -m tiktalk_jax.main --mode=train ...` runs the same `train_and_evaluate`.) Restarting
the same command in the same workdir resumes from the latest checkpoint, with the same batches
and the same random streams as an uninterrupted run.

What the workdir holds:
  config.json      the resolved config (every `--config.x=y` override applied).
  checkpoints/     Orbax steps (tiktalk_jax/checkpoint.py): async every `checkpoint_every`
                   steps, at the end, and on SIGTERM; the latest `keep_checkpoints` are kept.
  tensorboard/     CLU summaries (train and eval metrics, steps/s, learning rate).
  metrics.jsonl    the same scalars, one `{"step": ..., name: value}` line per write.

The step. The model is split once into a graph definition and states: frozen params
(`config.frozen`), trainable params, the rest (RNG stream counters, batch stats), and the
optimizer state (moments of the trainable params only). One pure function maps
`(carry, frozen, batch) -> carry` and is `jax.jit`-ed with explicit in/out shardings derived
from the params' logical axes, the carry donated. Gradients are taken w.r.t. the trainable
params only; gradient accumulation scans over micro-batches inside the step. Train metrics
(clu.metrics) accumulate on device in the carry and are fetched only every `log_every` steps.

Non-finite values. A step whose loss or gradient norm is not finite does not update anything
and records its step number in the carry; every later step is a no-op too. The loop reads that
record (a device->host copy of three scalars) only when it logs or checkpoints, and then stops
with `NonFiniteError` naming the step, before writing any checkpoint. The params written are
therefore always the last finite ones.

Multi-host (launch/README.md). Every process runs this loop on its share of the devices:
each reads shard `distributed.data_shard(mesh)` of every global batch (the rows its devices
hold) and `input_pipeline.make_global` assembles the global `jax.Array`s; checkpoints are
written collectively into one shared directory (a file system or gs://); only process 0 writes
config.json, metrics.jsonl and summaries. Resuming restores model and optimizer state onto any
mesh; the data iterators resume exactly only with the same process count and global batch size
(`data_resume="restart"` starts them afresh instead of stopping with
`checkpoint.DataStateMismatch`).

Preemption. SIGTERM sets a flag; after the current step the loop saves a checkpoint of that
step, waits for it to commit and returns normally. (On multi-host jobs started with
`jax.distributed.initialize`, Orbax's preemption sync point makes every host stop at the same
step.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, parameter_overview, periodic_actions
from clu import metrics as clu_metrics
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tiktalk_jax import checkpoint, distributed, input_pipeline, optim, sharding
from tiktalk_jax.models import registry


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm stopped being finite."""


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` returns.

    Attributes:
      model: the model with the final state (sharded on the run's mesh).
      step: the last step trained.
      preempted: True when the run stopped early on SIGTERM.
      metrics: the last train metrics written.
    """

    model: nnx.Module
    step: int
    preempted: bool
    metrics: dict[str, float]


# ---------------------------------------------------------------------------------------------
# Metric writers.
# ---------------------------------------------------------------------------------------------


class JsonlWriter(metric_writers.MetricWriter):
    """Appends scalars as `{"step": s, name: value, ...}` lines (a file people and tests read).

    Each write opens, appends and closes: a killed run loses nothing it wrote. A resumed run
    rewrites the steps after its checkpoint; readers keep the last line of each step.
    """

    def __init__(self, path: str):
        self.path = path

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with epath.Path(self.path).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
    """`metrics.jsonl` as `{step: {name: value}}`, later lines winning (resumed runs)."""
    out: dict[int, dict[str, float]] = {}
    path = epath.Path(workdir) / "metrics.jsonl"
    if path.exists():
        with path.open() as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    out.setdefault(record.pop("step"), {}).update(record)
    return out


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """Console + TensorBoard + metrics.jsonl on process 0; nothing on other hosts."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter(
        [
            metric_writers.LoggingWriter(),
            metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ]
    )


# ---------------------------------------------------------------------------------------------
# SIGTERM.
# ---------------------------------------------------------------------------------------------


class _Preemption:
    """Turns SIGTERM into a flag the loop polls after each step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True
        logging.warning("SIGTERM: saving a checkpoint after the current step, then stopping")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------
# The train state and the step functions.
# ---------------------------------------------------------------------------------------------

_NO_BAD = {"step": -1, "loss": 0.0, "grad_norm": 0.0}


def _metrics_class(names) -> type[clu_metrics.Collection]:
    return clu_metrics.Collection.create(
        **{n: clu_metrics.Average.from_output(n) for n in sorted(names)}
    )


@dataclasses.dataclass
class _Steps:
    """The jitted functions and what they close over (graph definitions, filters, config)."""

    family: registry.ModelFamily
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model_def: Any
    eval_def: Any
    opt_def: Any
    trainable: Any
    metrics_cls: Any = None

    def _loss(self, graphdef, params, frozen, rest, batch, rng):
        """(loss, (aux, rest after the forward pass)) of one (micro-)batch."""
        model = nnx.merge(graphdef, frozen, params, rest, copy=True)
        loss, aux = self.family.loss_fn(model, batch, nnx.Rngs(dropout=rng))
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        return jnp.asarray(loss, jnp.float32), (aux, new_rest)

    def forward_outputs(self, carry, frozen, batch):
        """The scalars one step logs (for jax.eval_shape: their names)."""
        loss, (aux, _) = self._loss(
            self.model_def, carry["params"], frozen, carry["rest"], batch, carry["rng"]
        )
        return {"loss": loss, "grad_norm": loss, **aux}

    def train_step(self, carry, frozen, batch):
        step_rng = jax.random.fold_in(carry["rng"], carry["step"])
        num_micro = int(self.config.optim.grad_accum_steps)

        def micro(rest, mb, i):
            grad_fn = jax.value_and_grad(self._loss, argnums=1, has_aux=True)
            rng = jax.random.fold_in(step_rng, i)
            (loss, (aux, rest)), grads = grad_fn(
                self.model_def, carry["params"], frozen, rest, mb, rng
            )
            return rest, {"loss": loss, **aux}, grads

        data_spec = sharding.batch_spec(self.mesh)[0]
        rest, outs, grads = optim.accumulate_gradients(
            micro, carry["rest"], batch, num_micro, data_spec
        )
        grad_norm = optax.global_norm(grads)

        model = nnx.merge(self.model_def, frozen, carry["params"], rest)
        optimizer = nnx.merge(self.opt_def, carry["opt"])
        optimizer.update(model, grads)

        bad = carry["bad"]
        ok = jnp.isfinite(outs["loss"]) & jnp.isfinite(grad_norm) & (bad["step"] < 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        first_bad = (bad["step"] < 0) & ~ok
        new_bad = {
            "step": jnp.where(first_bad, carry["step"] + 1, bad["step"]),
            "loss": jnp.where(first_bad, outs["loss"], bad["loss"]),
            "grad_norm": jnp.where(first_bad, grad_norm, bad["grad_norm"]),
        }
        outs = {**outs, "grad_norm": grad_norm}
        return {
            "params": keep(nnx.state(model, self.trainable), carry["params"]),
            "rest": keep(rest, carry["rest"]),
            "opt": keep(nnx.state(optimizer), carry["opt"]),
            "rng": carry["rng"],
            "step": carry["step"] + 1,
            "bad": new_bad,
            "metrics": carry["metrics"].merge(self.metrics_cls.single_from_model_output(**outs)),
        }

    def eval_step(self, params, rest, frozen, batch):
        """Eval metrics of one batch, weighted by its valid examples (`example_mask`)."""
        rng = jax.random.key(0)  # unused by deterministic models; loss_fn still gets a stream
        loss, (aux, _) = self._loss(self.eval_def, params, frozen, rest, batch, rng)
        mask = batch["example_mask"]
        per_example = {k: jnp.full(mask.shape, v) for k, v in {"loss": loss, **aux}.items()}
        cls = _metrics_class(per_example)
        return cls.single_from_model_output(**per_example, mask=mask)


# ---------------------------------------------------------------------------------------------
# Setup helpers.
# ---------------------------------------------------------------------------------------------


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
        (epath.Path(workdir) / "config.json").write_text(text)


def _log_overview(name: str, state: Any) -> None:
    if jax.process_index() != 0 or not jax.tree.leaves(state):
        return
    table = parameter_overview.get_parameter_overview(
        nnx.to_pure_dict(state), include_stats="sharding"
    )
    logging.info("%s:\n%s", name, table)


def _fetch(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x).item(), jax.device_get(tree))


def _raise_if_bad(carry: Mapping[str, Any], last_saved: int | None) -> None:
    """Reads the non-finite record (three scalars) and stops the run if it is set."""
    bad = _fetch(carry["bad"])
    if bad["step"] >= 0:
        raise NonFiniteError(
            f"non-finite loss or gradient norm at step {bad['step']} (loss={bad['loss']}, "
            f"grad_norm={bad['grad_norm']}); stopping without saving (latest checkpoint: "
            f"step {last_saved})"
        )


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Scalar config fields as `{"a.b": value}` (TensorBoard hparams take scalars only)."""
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                walk(name + ".", value)
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value

    walk("", config)
    return out


def _checkpoint_tree(carry: Mapping[str, Any]) -> dict[str, Any]:
    """The saved part of the carry, as plain nested dicts of arrays."""
    return {
        "params": nnx.to_pure_dict(carry["params"]),
        "rest": nnx.to_pure_dict(carry["rest"]),
        "opt": nnx.to_pure_dict(carry["opt"]),
        "rng": carry["rng"],
        "step": carry["step"],
    }


def _restore_into(carry: dict[str, Any], tree: Mapping[str, Any]) -> dict[str, Any]:
    carry = dict(carry)
    for name in ("params", "rest", "opt"):
        state = carry[name]
        nnx.replace_by_pure_dict(state, tree[name])
        carry[name] = state
    carry["rng"], carry["step"] = tree["rng"], tree["step"]
    return carry


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """The step functions and the mesh-placed state one train step reads (`init_state`).

    `carry`: what the step updates and checkpoints (params, rest, opt, rng, step, bad and, once
    compiled, metrics); `frozen`: parameters the step reads but never updates.
    """

    steps: _Steps
    carry: dict[str, Any]
    carry_shardings: dict[str, Any]
    frozen: Any
    frozen_shardings: Any


def init_state(
    config: ml_collections.ConfigDict, mesh: Mesh, family: registry.ModelFamily
) -> TrainState:
    """Builds the model and optimizer of `config` and places them on `mesh` by the config's
    logical-axis rules. Call under `jax.set_mesh(mesh)`. Benchmarks build the step with this
    and `compile_steps`, so they time exactly what the loop runs."""
    model = family.build(config, nnx.Rngs(int(config.seed)))
    if family.initialize is not None:
        family.initialize(model, config)
    frozen_f = optim.frozen_filter(config.frozen)
    trainable_f = optim.trainable_filter(config.frozen)
    optimizer = optim.make_optimizer(model, config.optim, int(config.total_steps), config.frozen)
    eval_model = nnx.view(
        model, deterministic=True, use_running_average=True, raise_if_not_found=False
    )
    model_def, frozen, params, rest = nnx.split(model, frozen_f, trainable_f, ...)
    eval_def = nnx.graphdef(eval_model)
    opt_def, opt_state = nnx.split(optimizer)
    del model, optimizer, eval_model

    rules = tuple(tuple(r) for r in config.sharding.rules)
    overrides = tuple(tuple(o) for o in config.sharding.overrides)
    place = lambda s: sharding.state_shardings(s, mesh, rules, overrides)
    frozen_sh = place(frozen)
    frozen = jax.device_put(frozen, frozen_sh)
    steps = _Steps(family, config, mesh, model_def, eval_def, opt_def, trainable_f)
    carry = new_carry(params, rest, opt_state, int(config.seed))
    carry_sh = carry_shardings(carry, mesh, place)
    carry = jax.device_put(carry, carry_sh)
    return TrainState(steps, carry, carry_sh, frozen, frozen_sh)


def new_carry(params: Any, rest: Any, opt_state: Any, seed: int) -> dict[str, Any]:
    """The step's carry before training (the metrics accumulator is added by `compile_steps`).
    Under `jax.eval_shape` (with `seed` bound) it gives the abstract carry of an AOT compile."""
    return {
        "params": params,
        "rest": rest,
        "opt": opt_state,
        "rng": jax.random.fold_in(jax.random.key(seed), 1),
        "step": jnp.zeros((), jnp.int32),
        "bad": {
            k: jnp.asarray(v, jnp.int32 if k == "step" else jnp.float32) for k, v in _NO_BAD.items()
        },
    }


def carry_shardings(carry: dict[str, Any], mesh: Mesh, place) -> dict[str, Any]:
    """Shardings of `carry`: params / rest / opt by `place` (the logical-axis rules), every
    other entry (rng, step, bad, metrics) replicated."""
    replicated = NamedSharding(mesh, P())
    state = ("params", "rest", "opt")
    return {
        k: place(v) if k in state else jax.tree.map(lambda _: replicated, v)
        for k, v in carry.items()
    }


def compile_steps(state: TrainState, mesh: Mesh, first_batch: Mapping[str, Any] | None):
    """Jits the train step (carry donated) and the eval step with explicit shardings.

    The loss_fn's metric names come from an abstract trace on `first_batch` (a global batch;
    None: loss and grad_norm only); the metrics accumulator is added to `state.carry`.

    Returns:
      `(train_step(carry, frozen, batch) -> carry, eval_step(params, rest, frozen, batch))`.
    """
    steps, carry, carry_sh = state.steps, state.carry, state.carry_shardings
    names = ["loss", "grad_norm"]
    if first_batch is not None:
        names = list(jax.eval_shape(steps.forward_outputs, carry, state.frozen, first_batch))
    steps.metrics_cls = _metrics_class(names)
    replicated = NamedSharding(mesh, P())
    carry["metrics"] = jax.device_put(steps.metrics_cls.empty(), replicated)
    carry_sh["metrics"] = jax.tree.map(lambda _: replicated, carry["metrics"])
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
    train_step = jax.jit(
        steps.train_step,
        in_shardings=(carry_sh, state.frozen_shardings, batch_sharding),
        out_shardings=carry_sh,
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        steps.eval_step,
        in_shardings=(carry_sh["params"], carry_sh["rest"], state.frozen_shardings, batch_sharding),
    )
    return train_step, eval_step


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    datasets: input_pipeline.Datasets | None = None,
    data_resume: str = "exact",
) -> TrainResult:
    """Trains `config.model.name` for `config.total_steps`, resuming from `workdir`.

    Args:
      config: the full config (configs/common.py documents the fields).
      workdir: checkpoints, summaries and config.json go here; an existing checkpoint resumes.
      datasets: the input pipelines; None builds them with `input_pipeline.make_datasets`,
        each host reading its shard `distributed.data_shard(mesh)`.
      data_resume: "exact" resumes every host's data iterator where the checkpoint left it
        and stops with `checkpoint.DataStateMismatch` when that is impossible (another host
        count or global batch size); "restart" then starts the iterators afresh instead
        (model and optimizer state are restored either way, onto any mesh).

    Returns:
      `TrainResult`. Raises `NonFiniteError` (naming the step) when training diverges and
      `checkpoint.FrozenWeightsChanged` when resuming over other frozen weights.
    """
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or gs://
    write_config(config, workdir)
    family = registry.get(config.model.name)
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh: %s", dict(mesh.shape))
    total = int(config.total_steps)

    # -- Data ------------------------------------------------------------------------------------
    if datasets is None:
        shard, shards = distributed.data_shard(mesh)
        datasets = input_pipeline.make_datasets(
            config, **family.data_inputs(config), process_index=shard, process_count=shards
        )
    train_iter = iter(datasets.train)

    with jax.set_mesh(mesh):
        # -- Model and optimizer -------------------------------------------------------------
        state = init_state(config, mesh, family)
        steps, carry, frozen = state.steps, state.carry, state.frozen
        replicated = NamedSharding(mesh, P())
        _log_overview("trainable parameters", carry["params"])
        _log_overview("frozen parameters", frozen)
        frozen_info = checkpoint.frozen_record(
            frozen, family.frozen_source(config) if family.frozen_source else None
        )

        # -- Resume --------------------------------------------------------------------------
        ckpt = checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=int(config.keep_checkpoints),
            async_save=bool(config.async_checkpoints),
        )
        data_info = {
            "global_batch_size": int(config.input.batch_size),
            "process_count": jax.process_count(),
        }
        last_saved = ckpt.latest_step()
        if last_saved is not None:
            where = f"{ckpt.directory}/{last_saved}"
            tree, data_state, meta = ckpt.restore(
                last_saved, _checkpoint_tree(carry), data_info=data_info, data=data_resume
            )
            checkpoint.check_frozen(meta.get("frozen"), frozen_info, where)
            carry = _restore_into(carry, tree)
            if data_state is not None:
                train_iter.set_state(data_state)
            logging.info("resumed from %s", where)
        step = int(_fetch(carry["step"]))

        # -- Compile -------------------------------------------------------------------------
        def batches():
            for host_batch in train_iter:
                yield input_pipeline.make_global(host_batch, mesh)

        batch_iter = batches()
        # The first batch gives the names of the loss_fn's metrics (an abstract trace).
        first = next(batch_iter, None) if step < total else None
        state.carry = carry
        train_step, eval_step = compile_steps(state, mesh, first)
        carry = state.carry
        schedule = optim.learning_rate_schedule(config.optim, total)
        writer = make_writer(workdir)

        def evaluate(at: int) -> None:
            for split, ds in datasets.evals.items():
                acc = None
                for host_batch in ds:
                    batch = input_pipeline.make_global(host_batch, mesh)
                    out = eval_step(carry["params"], carry["rest"], frozen, batch)
                    acc = out if acc is None else acc.merge(out)
                if acc is not None:
                    values = _fetch(acc.compute())
                    writer.write_scalars(at, {f"{split}/{k}": v for k, v in values.items()})

        def save(at: int) -> None:
            nonlocal last_saved
            _raise_if_bad(carry, last_saved)
            state = _checkpoint_tree(carry)
            meta = {"frozen": frozen_info, "data": data_info}
            ckpt.save(at, state, train_iter.get_state(), meta)
            last_saved = at

        # -- Train -----------------------------------------------------------------------------
        if step == 0:
            writer.write_hparams(_flat_hparams(config))
        log_every, ckpt_every = int(config.log_every), int(config.checkpoint_every)
        eval_every = int(config.eval_every)
        report = periodic_actions.ReportProgress(
            num_train_steps=total, writer=writer, every_steps=log_every
        )
        preempted, last_metrics, batch = False, {}, first
        try:
            with _Preemption() as sigterm, metric_writers.ensure_flushes(writer):
                while step < total:
                    if batch is None:
                        with report.timed("data", wait_jax_async_dispatch=False):
                            batch = next(batch_iter, None)
                        if batch is None:
                            logging.warning("training data exhausted at step %d", step)
                            break
                    carry = train_step(carry, frozen, batch)
                    batch = None
                    step += 1
                    if jax.process_index() == 0:
                        report(step)
                    preempted = sigterm.requested or ckpt.manager.reached_preemption(step)
                    if step % log_every == 0 or step == total or preempted:
                        _raise_if_bad(carry, last_saved)
                        values = _fetch(carry["metrics"].compute())
                        values["learning_rate"] = float(schedule(step - 1))
                        writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
                        carry["metrics"] = jax.device_put(steps.metrics_cls.empty(), replicated)
                        last_metrics = values
                    if eval_every and (step % eval_every == 0 or step == total):
                        with report.timed("eval"):
                            evaluate(step)
                    if step % ckpt_every == 0 or step == total or preempted:
                        save(step)
                    if preempted:
                        logging.warning("SIGTERM: stopped at step %d, checkpoint saved", step)
                        break
                if step > 0 and last_saved != step:
                    save(step)  # the data ran out before total_steps
        finally:
            ckpt.close()
            writer.close()

        model = nnx.merge(steps.model_def, frozen, carry["params"], carry["rest"])
    return TrainResult(model=model, step=step, preempted=preempted, metrics=last_metrics)


# ---------------------------------------------------------------------------------------------
# Command line: `python -m tiktalk_jax.train ...` is `python -m tiktalk_jax.main --mode=train ...`.
# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":
    from absl import app

    from tiktalk_jax import main as entry

    app.run(entry.main)
