"""LoRA (Hu et al. 2021) for any Linear-like layer of the repo, selected by path regex.

`apply(model, rank=8, alpha=16, targets=r"attention/(query|value)$", rngs=...)` replaces every
matching `nnx.Linear` / `nnx.Einsum` (kernels `[in..., out...]`: MLP `[embed, mlp]`, q/k/v
`[embed, heads, kv]`, attention output `[heads, kv, embed]`) by a `LoRA` wrapper:

    y = base(x) + alpha / rank * (x . A) . B,   A: [in..., rank], B: [rank, out...]

A starts uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform with a = sqrt(5)), B at zero, so a
freshly adapted model computes exactly what the base did. A and B are `nnx.LoRAParam`s (a
subclass of `nnx.Param`) carrying the base kernel's logical axes on their in / out dims, so they
shard with it.

Training only the adapters ("base frozen"): give the optimizer `wrt=nnx.LoRAParam` (and
differentiate `nnx.DiffState(0, nnx.LoRAParam)`), or, in the shared train loop, set
`config.frozen = lora.frozen_regex("^llm/")` (every parameter under the prefix except A and B).
Full fine-tuning is then the same model with `config.frozen` unset.

`merge(model)` folds `alpha / rank * A . B` into each base kernel and puts the base layer back:
the result has the original module structure and parameter paths (an exported checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tiktalk_jax import sharding
from tiktalk_jax.models import layers

Array = jax.Array

# Path names of the adapter parameters (`.../query/lora_a`).
LORA_NAMES = ("lora_a", "lora_b")


def frozen_regex(prefix: str = "") -> str:
    """Regex over parameter paths selecting everything under `prefix` (a regex anchored at the
    path start, e.g. "llm/") except the LoRA matrices: the train loop's `config.frozen`."""
    prefix = prefix.removeprefix("^")
    return rf"^{prefix}(?!.*(^|/)lora_[ab]$)"


def num_input_axes(module: nnx.Module) -> int:
    """How many leading kernel axes a Linear-like module contracts with its input (Linear: 1;
    Einsum `"...d,dhk->...hk"`: 1, `"...hk,hkd->...d"`: 2). Raises for anything else."""
    if isinstance(module, nnx.Linear):
        return 1
    if isinstance(module, nnx.Einsum):
        inputs, out = module.einsum_str.split("->")
        lhs, kernel = inputs.split(",")
        lhs, out = lhs.replace("...", ""), out.replace("...", "")
        n = len(lhs)
        if "..." in kernel or kernel[:n] != lhs or kernel[n:] != out:
            raise ValueError(
                f"LoRA needs a kernel laid out [in..., out...], got {module.einsum_str}"
            )
        return n
    raise ValueError(f"LoRA wraps nnx.Linear or nnx.Einsum, not {type(module).__name__}")


class LoRA(nnx.Module):
    """A Linear-like `base` plus a low-rank update; called like the base (`x: float[..., in...]`
    -> `float[..., out...]`)."""

    def __init__(
        self,
        base: nnx.Module,
        *,
        rank: int,
        alpha: float | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        n_in = num_input_axes(base)
        shape = tuple(base.kernel.get_value().shape)
        axes = base.kernel.get_metadata().get("out_sharding") or (None,) * len(shape)
        in_shape, out_shape = shape[:n_in], shape[n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a_init = layers.partitioned(
            lambda key, s, dtype: jax.random.uniform(key, s, dtype, -bound, bound),
            (*axes[:n_in], None),
        )
        b_init = layers.partitioned(nnx.initializers.zeros_init(), (None, *axes[n_in:]))
        self.base = base
        self.num_input_axes = n_in
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank
        self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (*in_shape, rank), param_dtype))
        self.lora_b = nnx.LoRAParam(b_init(rngs.params(), (rank, *out_shape), param_dtype))

    def delta(self, x: Array, dtype: Any) -> Array:
        """`scale * (x . A) . B` in `dtype`."""
        a, b = self.lora_a.get_value().astype(dtype), self.lora_b.get_value().astype(dtype)
        h = jnp.tensordot(x.astype(dtype), a, axes=self.num_input_axes)
        return self.scale * jnp.tensordot(h, b, axes=1)

    def __call__(self, x: Array) -> Array:
        y = self.base(x)
        # The base's compute dtype (e.g. bf16 under f32 adapters), else what the base returned.
        dtype = getattr(self.base, "dtype", None) or y.dtype
        return y + self.delta(x, dtype).astype(y.dtype)

    def merged_kernel(self) -> Array:
        """The base kernel plus `scale * A . B`, in the kernel's dtype."""
        kernel = self.base.kernel.get_value()
        a = self.lora_a.get_value().astype(jnp.float32)
        update = self.scale * jnp.tensordot(a, self.lora_b.get_value().astype(jnp.float32), 1)
        return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)


def _child(node: Any, key: Any) -> Any:
    return node[key] if isinstance(key, int) else getattr(node, key)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str],
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
) -> list[str]:
    """Wraps every Linear-like module whose path (`"layers/0/attention/query"`) `re.search`es
    `targets` (one regex or several, OR-ed); returns the wrapped paths (raises if none).

    `alpha` defaults to `rank` (scale 1). A and B are created on the default device; the train
    loop places them by their logical axes like every other parameter.
    """
    regex = sharding.compile_regex(targets)
    if regex is None:
        raise ValueError("LoRA needs at least one target regex")
    found = []
    for path, module in nnx.iter_modules(model):
        if not path or not isinstance(module, nnx.Linear | nnx.Einsum):
            continue
        if isinstance(_parent(model, path), LoRA):  # already adapted
            continue
        if regex.search(sharding.path_str(path)):
            found.append((path, module))
    if not found:
        raise ValueError(f"no Linear/Einsum module path matches LoRA targets {regex.pattern!r}")
    for path, module in found:
        _replace(
            model, path, LoRA(module, rank=rank, alpha=alpha, param_dtype=param_dtype, rngs=rngs)
        )
    return sorted(sharding.path_str(p) for p, _ in found)


def _parent(model: nnx.Module, path: tuple) -> Any:
    node = model
    for key in path[:-1]:
        node = _child(node, key)
    return node


def merge(model: nnx.Module) -> list[str]:
    """Folds every `LoRA` into its base kernel and puts the base back in its place; returns the
    merged paths. The model then computes what the adapted one did, with no adapter left."""
    found = [(p, m) for p, m in nnx.iter_modules(model) if p and isinstance(m, LoRA)]
    for path, wrapper in found:
        wrapper.base.kernel.set_value(wrapper.merged_kernel())
        _replace(model, path, wrapper.base)
    return sorted(sharding.path_str(p) for p, _ in found)
