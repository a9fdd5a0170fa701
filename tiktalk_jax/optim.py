"""Optimizer: AdamW with warmup + linear decay, gradient clipping, decay mask, frozen parameters.

Configuration (`config.optim`, see `default_config()`):
  lr               peak learning rate.
  warmup_steps     linear warmup 0 -> lr over these updates.
  end_lr_fraction  then linear decay to lr * end_lr_fraction at the last update.
  b1, b2, eps      Adam moments.
  weight_decay     decoupled (AdamW) weight decay, applied to parameters NOT matching `no_decay`.
  no_decay         regex over parameter paths exempt from weight decay (biases, LayerNorm scales).
  clip_norm        clip gradients to this global norm (0 or None: no clipping).
  grad_accum_steps split every batch into this many micro-batches and average their gradients
                   inside one step (same update as the whole batch, less activation memory).

Frozen parameters (`config.frozen`, regex(es) over parameter paths, e.g. `"^llm/"`) are excluded
from the optimizer with `nnx.Optimizer(..., wrt=trainable_filter(...))`: they get no Adam moments
and the train step differentiates only the trainable filter, so they get no gradients either.

Paths are "/"-joined keys (`sharding.path_str`), the same for parameters, gradients and the
optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from tiktalk_jax import sharding


def default_config() -> ml_collections.ConfigDict:
    """The `config.optim` section with its defaults (documented in the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            warmup_steps=100,
            end_lr_fraction=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            no_decay=r"(^|/)(bias|scale)$",
            clip_norm=1.0,
            grad_accum_steps=1,
        )
    )


# ---------------------------------------------------------------------------------------------
# Filters.
# ---------------------------------------------------------------------------------------------


def frozen_filter(frozen: str | Sequence[str] | None) -> nnx.filterlib.Filter:
    """Parameters selected by the frozen regex(es); matches nothing when `frozen` is empty."""
    return nnx.All(nnx.Param, sharding.PathRegex(frozen))


def trainable_filter(frozen: str | Sequence[str] | None) -> nnx.filterlib.Filter:
    """Parameters NOT selected by the frozen regex(es): what the optimizer and grads see."""
    return nnx.All(nnx.Param, nnx.Not(sharding.PathRegex(frozen)))


# ---------------------------------------------------------------------------------------------
# Schedule and transformation.
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then linear decay to `lr * end_lr_fraction` at the end."""
    lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
    end = lr * float(cfg.end_lr_fraction)
    decay_steps = max(int(total_steps) - warmup, 1)
    if warmup <= 0:
        return optax.linear_schedule(lr, end, decay_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, end, decay_steps)],
        [warmup],
    )


def decay_mask(no_decay: str | Sequence[str] | None) -> Callable[[Any], Any]:
    """optax mask fn: True (decay) for every parameter whose path does not match `no_decay`."""
    regex = sharding.compile_regex(no_decay)

    def mask(params: Any) -> Any:
        return sharding.tree_map_with_path_str(
            lambda p, _: regex is None or regex.search(p) is None, params
        )

    return mask


def make_tx(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (optional) -> AdamW with the schedule and the weight-decay mask."""
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=float(cfg.b1),
            b2=float(cfg.b2),
            eps=float(cfg.eps),
            weight_decay=float(cfg.weight_decay),
            mask=decay_mask(cfg.no_decay),
        )
    )
    return optax.chain(*parts)


def make_optimizer(
    model: nnx.Module,
    cfg: ml_collections.ConfigDict,
    total_steps: int,
    frozen: str | Sequence[str] | None = None,
) -> nnx.Optimizer:
    """`nnx.Optimizer` over the trainable parameters only (frozen ones get no state)."""
    return nnx.Optimizer(model, make_tx(cfg, total_steps), wrt=trainable_filter(frozen))


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.
# ---------------------------------------------------------------------------------------------


def split_microbatches(batch: Any, num_micro: int, data_spec: Any = None) -> Any:
    """`[B, ...]` leaves -> `[num_micro, B / num_micro, ...]`, micro-batch i = rows i::num_micro.

    Strided rather than contiguous: the batch dim is sharded in contiguous blocks over devices,
    so rows i, i + k, ... are spread over every device and each micro-batch stays balanced
    without moving data. `data_spec` (a PartitionSpec entry for the per-micro-batch dim, e.g.
    `("data", "fsdp")`) pins that sharding for the compiler.
    """

    def one(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"batch of {x.shape[0]} not divisible by {num_micro} micro-batches")
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        if data_spec is not None:
            x = jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(None, data_spec))
        return x

    return jax.tree.map(one, batch)


def accumulate_gradients(
    fn: Callable[[Any, Any, jax.Array], tuple[Any, Any, Any]],
    carry: Any,
    batch: Any,
    num_micro: int,
    data_spec: Any = None,
) -> tuple[Any, Any, Any]:
    """Averages `fn` over micro-batches with a `lax.scan` (one micro-batch's activations live).

    Args:
      fn: `fn(carry, micro_batch, micro_index) -> (carry, outputs, grads)`; `carry` threads
        state a forward pass mutates (e.g. RNG counters), `outputs` is a pytree of float
        scalars (loss, metrics) averaged like the grads.
      carry: initial carry.
      batch: pytree of `[B, ...]` arrays.
      num_micro: number of micro-batches (1: a plain call).
      data_spec: see `split_microbatches`.

    Returns:
      `(carry, mean outputs, mean grads)`: equal to one call on the whole batch when the loss
      is a mean over equally weighted examples.
    """
    if num_micro <= 1:
        return fn(carry, batch, jnp.zeros((), jnp.int32))
    micro = split_microbatches(batch, num_micro, data_spec)
    first = jax.tree.map(lambda x: x[0], micro)
    _, out_shape, grad_shape = jax.eval_shape(fn, carry, first, jnp.zeros((), jnp.int32))
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)

    def body(acc, xs):
        carry, out_sum, grad_sum = acc
        mb, i = xs
        carry, out, grads = fn(carry, mb, i)
        add = lambda s, x: s + x.astype(jnp.float32)
        return (carry, jax.tree.map(add, out_sum, out), jax.tree.map(add, grad_sum, grads)), None

    init = (carry, zeros(out_shape), zeros(grad_shape))
    (carry, out_sum, grad_sum), _ = jax.lax.scan(
        body, init, (micro, jnp.arange(num_micro, dtype=jnp.int32))
    )
    mean = lambda tree, like: jax.tree.map(lambda s, l: (s / num_micro).astype(l.dtype), tree, like)
    return carry, mean(out_sum, out_shape), mean(grad_sum, grad_shape)
