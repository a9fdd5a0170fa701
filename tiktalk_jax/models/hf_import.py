"""Reading local Hugging Face checkpoints into Flax NNX modules.

One place for what every port needs: find and read `config.json` and the weights
(`model.safetensors`, sharded `model.safetensors.index.json`, or `pytorch_model.bin`),
hand tensors out by name, check shapes on assignment, and fail when a checkpoint tensor
was never used or a parameter never set, so a silently half-loaded model cannot happen.

Safetensors files are parsed here (header + memory map) rather than through a framework,
so loading needs neither torch nor an accelerator and bf16 tensors stay bf16 (ml_dtypes).
`pytorch_model.bin` needs torch and is always loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def load_config(path: str) -> dict:
    """Returns the parsed `config.json` of the HF model directory `path`."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a HF model directory: no config.json in it")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def read_safetensors(file: str) -> dict[str, np.ndarray]:
    """Memory-maps one .safetensors file; returns read-only numpy arrays by tensor name."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{file} is a PyTorch pickle; reading it needs torch. Install torch or convert the "
            "checkpoint to safetensors (model.save_pretrained(..., safe_serialization=True))."
        ) from e
    # weights_only=True: a checkpoint is untrusted input and must not run code when loaded.
    state = torch.load(file, map_location="cpu", weights_only=True)
    # numpy has no bfloat16: widen such tensors; `assign` casts to the parameter dtype anyway.
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_weights_file(file: str) -> dict[str, np.ndarray]:
    """Reads one standalone weights file (not a HF directory) by its extension: `.safetensors`
    without torch, anything else (`.pth`, `.pt`, `.bin`) as a torch state dict (weights_only)."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no weights file {file!r}")
    return read_safetensors(file) if file.endswith(".safetensors") else _read_torch_bin(file)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads all weights of the HF model directory `path` as numpy arrays keyed by HF name."""
    candidates = [
        ("model.safetensors", read_safetensors),
        ("model.safetensors.index.json", None),
        ("pytorch_model.bin", _read_torch_bin),
        ("pytorch_model.bin.index.json", None),
    ]
    for name, reader in candidates:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if reader is not None:
            return reader(file)
        with open(file, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        shard_reader = read_safetensors if name.startswith("model.safetensors") else _read_torch_bin
        state = {}
        for shard in shards:
            state.update(shard_reader(os.path.join(path, shard)))
        return state
    found = sorted(os.listdir(path)) if os.path.isdir(path) else "no such directory"
    raise FileNotFoundError(
        f"no weights in {path!r}: expected one of {[c[0] for c in candidates]}, found {found}"
    )


class StateDict:
    """HF tensors handed out by name, remembering which were used.

    `prefix` strips a leading module name (e.g. "bert.") so one port reads both a bare
    model and the same model inside a task head.
    """

    def __init__(self, tensors: dict[str, np.ndarray], source: str = "checkpoint"):
        self.tensors = dict(tensors)
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)

    def get(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            near = [k for k in self.tensors if k.split(".")[-1] == key.split(".")[-1]][:5]
            raise KeyError(f"{self.source}: no tensor {key!r} (similar names: {near})")
        self.used.add(key)
        return self.tensors[key]

    def mark_unused_ok(self, pattern: str) -> None:
        """Marks tensors matching the regex as deliberately ignored (e.g. position_ids buffers)."""
        self.used.update(k for k in self.tensors if re.search(pattern, k))

    def check_all_used(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            shown = ", ".join(left[:10]) + (" ..." if len(left) > 10 else "")
            raise ValueError(f"{self.source}: {len(left)} tensors were not loaded: {shown}")


def assign(variable: nnx.Variable, value: np.ndarray, name: str = "") -> None:
    """Sets an NNX variable from a numpy array, keeping the variable's dtype; checks the shape."""
    target = variable.value
    value = np.asarray(value)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{name or 'parameter'}: checkpoint shape {value.shape} != {target.shape}")
    variable.value = jnp.asarray(
        value.astype(np.float32) if value.dtype.kind == "V" else value, dtype=target.dtype
    )


def assign_linear(linear: nnx.Linear, sd: StateDict, key: str, *, reshape: Callable | None = None):
    """Loads a torch `nn.Linear` (`{key}.weight` [out, in], `{key}.bias`) into an NNX Linear-like
    module whose `kernel` is [in, ...out] (transposed, then `reshape`d when given)."""
    kernel = sd.get(f"{key}.weight").T
    if reshape is not None:
        kernel = reshape(kernel)
    assign(linear.kernel, kernel.reshape(linear.kernel.value.shape), f"{key}.weight")
    if getattr(linear, "bias", None) is not None and linear.bias.value is not None:
        bias = sd.get(f"{key}.bias")
        assign(linear.bias, bias.reshape(linear.bias.value.shape), f"{key}.bias")


def assign_layer_norm(
    norm: nnx.LayerNorm, sd: StateDict, key: str, names: Iterable[str] = ("weight", "bias")
) -> None:
    """Loads a torch LayerNorm (`{key}.weight`, `{key}.bias`) into `nnx.LayerNorm`."""
    scale_name, bias_name = names
    assign(norm.scale, sd.get(f"{key}.{scale_name}"), f"{key}.{scale_name}")
    if norm.bias is not None:
        assign(norm.bias, sd.get(f"{key}.{bias_name}"), f"{key}.{bias_name}")


def linear_tensors(linear: nnx.Module, key: str, in_dims: int = 1) -> dict[str, np.ndarray]:
    """The inverse of `assign_linear`: a Linear-like module as torch `nn.Linear` tensors,
    `{key}.weight` [out, in] (float32) and `{key}.bias`. `in_dims`: leading kernel axes that
    form the input (1 for `[in, ...out]` kernels, 2 for an attention output `[heads, d, out]`)."""
    kernel = np.asarray(linear.kernel.value, np.float32)
    rows = int(np.prod(kernel.shape[:in_dims]))
    out = {f"{key}.weight": np.ascontiguousarray(kernel.reshape(rows, -1).T)}
    if getattr(linear, "bias", None) is not None and linear.bias.value is not None:
        out[f"{key}.bias"] = np.asarray(linear.bias.value, np.float32).reshape(-1)
    return out


def layer_norm_tensors(
    norm: nnx.LayerNorm, key: str, names: Iterable[str] = ("weight", "bias")
) -> dict[str, np.ndarray]:
    """The inverse of `assign_layer_norm`: `{key}.weight`, `{key}.bias` (float32)."""
    scale_name, bias_name = names
    out = {f"{key}.{scale_name}": np.asarray(norm.scale.value, np.float32)}
    if norm.bias is not None:
        out[f"{key}.{bias_name}"] = np.asarray(norm.bias.value, np.float32)
    return out


def abstract_module(constructor: Callable[[], nnx.Module]) -> nnx.Module:
    """Builds a module with shape-only parameters (no random init, no memory), to be filled by
    `assign`; pair with `check_all_set` after loading.

    RNG streams (e.g. of dropout layers) are not weights: they get concrete values (seed 0), so
    the loaded module is usable as is.

    Built outside any mesh: under one set with `jax.set_mesh`, `nnx.eval_shape` would turn the
    logical axis names into mesh shardings itself (and fail, the names not being mesh axes);
    callers place the loaded tensors on the mesh themselves."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        module = nnx.eval_shape(constructor)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.RngState):
            abstract = var.get_value()
            if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
                var.set_value(jnp.broadcast_to(jax.random.key(0), abstract.shape))
            else:
                var.set_value(jnp.zeros(abstract.shape, abstract.dtype))
    return module


def check_all_set(module: nnx.Module, source: str = "checkpoint") -> None:
    """Fails if a variable of an `abstract_module` was never assigned from the checkpoint."""
    missing = [
        ".".join(str(p) for p in path)
        for path, var in nnx.to_flat_state(nnx.state(module))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{source}: {len(missing)} parameters were not set: {shown}")
