"""Device mesh, logical-axis sharding of NNX states, and regex selection of parameters by path.

Mesh. `config.mesh` names the size of each mesh axis, in order (data, fsdp, tensor); one size may
be -1 and takes the remaining devices. The axes are `Auto` (GSPMD-style propagation): the models
annotate parameters, not activations, so the compiler must be free to choose the rest (with jax
0.10's default Explicit axes, grads through sharded code fail).

Parameter shardings. Every parameter carries logical axis names in its `out_sharding` metadata
(tiktalk_jax/models/layers.py). `config.sharding.rules` maps each name to a mesh axis (or None);
`state_shardings` turns a whole NNX state (params, optimizer moments, which inherit the params'
metadata) into `NamedSharding`s. Two refinements on top of the rules:
  * `config.sharding.overrides`: `(regex, (mesh axis or None, ...))` pairs; the first regex that
    `re.search`es a leaf's path replaces its spec (optimizer moments live under paths that END
    with the parameter path, so anchor at the end, e.g. `"head/kernel$"`).
  * a dimension whose size is not divisible by its mesh axes is replicated instead (a small
    vocabulary or an odd hidden size must not stop a run; the fallback is logged once per path).
Leaves without annotations (RNG keys, counters, LayerNorm params of third-party modules) are
replicated.

Paths. A leaf's path is its keys joined by "/" (`"encoder/layers/0/attention/query/kernel"`),
the same string for NNX graph paths, `nnx.State` pytree paths and optimizer state paths.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-parallel axes (FSDP is data parallelism whose
# parameters are also sharded).
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
)

# ---------------------------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------------------------


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of `axes` (ordered mapping name -> size, one size may be -1) for `num_devices`."""
    sizes = [int(s) for s in axes.values()]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot fill mesh {dict(axes)}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(axes)} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axes named and sized by `axes` (e.g. `config.mesh`)."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axes.keys())
    shape = mesh_shape(axes, len(devices))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_spec(mesh: Mesh) -> P:
    """PartitionSpec of a batch `[B, ...]`: B over the mesh's data-parallel axes."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return P(axes if axes else None)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split (the product of the data-parallel axis sizes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


# ---------------------------------------------------------------------------------------------
# Paths and regex selection.
# ---------------------------------------------------------------------------------------------


def _key_str(key: Any) -> str | None:
    """One path entry as text; None for the `.value` hop into an `nnx.Variable`."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Iterable[Any]) -> str:
    """`("encoder", 0, "kernel")` or a jax key path -> `"encoder/0/kernel"`."""
    return "/".join(s for s in map(_key_str, path) if s is not None)


def compile_regex(patterns: str | Sequence[str] | None) -> re.Pattern | None:
    """One pattern (or several, OR-ed) compiled; None or "" selects nothing."""
    if not patterns:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = [p for p in patterns if p]
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


class PathRegex:
    """NNX filter: variables whose path `re.search`es a regex (OR of several; none: nothing).

    Usable anywhere NNX takes a filter (`nnx.state`, `nnx.split`, `nnx.Optimizer(wrt=...)`,
    `nnx.DiffState`), e.g. `nnx.All(nnx.Param, PathRegex("^llm/"))`.
    """

    def __init__(self, patterns: str | Sequence[str] | None):
        self.regex = compile_regex(patterns)

    def __call__(self, path: tuple, value: Any) -> bool:
        del value
        return self.regex is not None and self.regex.search(path_str(path)) is not None

    def __repr__(self) -> str:
        return f"PathRegex({self.regex.pattern if self.regex else None!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathRegex) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """`[(path, leaf)]` of a pytree (an `nnx.State` gives its arrays under parameter paths)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), x) for p, x in flat]


def tree_map_with_path_str(fn, tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` whose `fn(path_str, leaf, *others)` also gets the leaf's path string."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def regex_mask(tree: Any, patterns: str | Sequence[str] | None) -> Any:
    """Same-structured tree of bools: True where the leaf's path matches."""
    regex = compile_regex(patterns)
    return tree_map_with_path_str(
        lambda p, _: regex is not None and regex.search(p) is not None, tree
    )


# ---------------------------------------------------------------------------------------------
# Logical axes -> shardings.
# ---------------------------------------------------------------------------------------------


def logical_to_mesh(
    names: Sequence[str | None] | None, rules: Sequence[tuple[str, Any]], ndim: int
) -> P:
    """Logical axis names of one array -> PartitionSpec over mesh axes (unknown names: None)."""
    if names is None:
        return P()
    if len(names) != ndim:
        raise ValueError(f"{len(names)} logical axes {tuple(names)} for an array of rank {ndim}")
    table = {name: axis for name, axis in rules}
    return P(*(table.get(n) if n is not None else None for n in names))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str, warned: set[str]) -> P:
    """Replicates dimensions that their mesh axes do not divide, and repeated mesh axes."""
    out, used = [], set()
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        group = tuple(a for a in group if a in mesh.axis_names and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in group)
        if group and (size % ways or used.intersection(group)):
            if path not in warned:
                warned.add(path)
                logging.info(
                    "sharding: %s %s dim %d over %s not possible: replicated",
                    path,
                    shape,
                    size,
                    group,
                )
            group = ()
        used.update(group)
        out.append(group[0] if len(group) == 1 else (group or None))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def spec_for(
    path: str,
    shape: tuple[int, ...],
    names: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
    overrides: Sequence[tuple[str, Sequence[Any]]] = (),
    _warned: set[str] | None = None,
) -> P:
    """The PartitionSpec of one leaf: override regex, else logical rules; then made to fit."""
    for pattern, axes in overrides:
        if re.search(pattern, path):
            spec = P(*axes)
            break
    else:
        spec = logical_to_mesh(names, rules, len(shape))
    return _fit(spec, tuple(shape), mesh, path, set() if _warned is None else _warned)


def state_shardings(
    state: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
    overrides: Sequence[tuple[str, Sequence[Any]]] = (),
) -> Any:
    """A pytree like `state` (an `nnx.State`, Variables kept) with a `NamedSharding` per leaf.

    Works for abstract states (`nnx.eval_shape`) too. The result is a valid `in_shardings` /
    `out_shardings` / `jax.device_put` target for `state`.
    """
    warned: set[str] = set()

    def one(path, leaf):
        if isinstance(leaf, nnx.Variable):
            names = leaf.get_metadata().get("out_sharding")
            shape = np.shape(leaf.get_value())
            spec = spec_for(path_str(path), shape, names, mesh, rules, overrides, warned)
            return leaf.replace(NamedSharding(mesh, spec))
        spec = spec_for(path_str(path), np.shape(leaf), None, mesh, rules, overrides, warned)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def replicated(tree: Any, mesh: Mesh) -> Any:
    """A fully replicated `NamedSharding` for every leaf of `tree`."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def shard(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` onto the target shardings (works on sharded and host arrays)."""
    return jax.device_put(tree, shardings)


def describe(tree: Any) -> list[str]:
    """`"path shape spec"` lines of a sharded pytree (for logs and tests)."""
    return [
        f"{p} {tuple(x.shape)} {x.sharding.spec if hasattr(x.sharding, 'spec') else x.sharding}"
        for p, x in leaves_with_paths(tree)
    ]
