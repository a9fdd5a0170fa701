"""VGGish (AudioSet's VGG-like audio embedder) in Flax NNX, loadable from the PyTorch port.

Input: VGGish log-mel examples `float[B, 96, 64]` (`tiktalk_jax.audio_features.vggish_examples`),
i.e. NHWC images of 96 frames x 64 mel bands with one channel. Output: one 128-d embedding per
0.96 s example.

Network (TF `vggish_slim.py`): 3x3 convs (stride 1, SAME) with ReLU and 2x2/2 max pools,
64-M-128-M-256-256-M-512-512-M, flatten (6 x 4 x 512, row-major over [time, mel, channel]),
FC 4096-ReLU-4096-ReLU-128. The TF original has no activation after the last layer; the common
PyTorch port (harritaylor/torchvggish) keeps a ReLU there; `final_relu` chooses (default True,
to reproduce features extracted with the port, which is what its checkpoint is used with).

Checkpoint naming (torchvggish `VGG.state_dict()`, e.g. `vggish-10086976.pth`):

    features.{0,3,6,8,11,13}.weight   float[out, in, 3, 3]   the six convs (torch Sequential
    features.{0,3,6,8,11,13}.bias     float[out]             indices; ReLU/pool slots have none)
    embeddings.{0,2,4}.weight         float[out, in]         FC 12288->4096, 4096->4096, 4096->128
    embeddings.{0,2,4}.bias           float[out]

The port flattens after moving channels last, so `embeddings.0` expects the [6, 4, 512] NHWC
order this module produces directly. Keys `pproc.*` (the PCA postprocessor of a whole-model state
dict) are ignored here; `Postprocessor` reads them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tiktalk_jax.models import hf_import, layers

# The conv stack: widths, "M" = 2x2/2 max pool.
_PLAN_FULL = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")


@dataclasses.dataclass(frozen=True)
class VGGishConfig:
    """Widths of the network; the defaults are VGGish. Smaller values only serve tests."""

    conv_widths: tuple[int, ...] = (64, 128, 256, 256, 512, 512)
    fc_widths: tuple[int, ...] = (4096, 4096)
    embedding_size: int = 128
    num_frames: int = 96
    num_bands: int = 64
    final_relu: bool = True

    def plan(self) -> list[int | str]:
        """The conv plan with these widths, in torch Sequential order."""
        widths = iter(self.conv_widths)
        return [v if v == "M" else next(widths) for v in _PLAN_FULL]


class VGGish(nnx.Module):
    """`log_mel: float[B, 96, 64]` -> `float[B, 128]` embeddings (pre-PCA)."""

    def __init__(self, cfg: VGGishConfig = VGGishConfig(), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        if len(cfg.conv_widths) != 6 or len(cfg.fc_widths) != 2:
            raise ValueError("VGGish has 6 convs and 2 hidden FC layers")
        self.config = cfg
        # TF init: N(0, 0.01) weights, zero biases (vggish_params.INIT_STDDEV).
        init = nnx.initializers.truncated_normal(stddev=0.01)
        convs, cin = [], 1
        for v in cfg.plan():
            if v != "M":
                convs.append(nnx.Conv(
                    cin, v, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                    param_dtype=param_dtype, kernel_init=init, rngs=rngs,
                ))  # fmt: skip
                cin = v
        self.features = nnx.List(convs)
        flat = (cfg.num_frames // 16) * (cfg.num_bands // 16) * cin
        widths = (flat, *cfg.fc_widths, cfg.embedding_size)
        # Megatron-style split when sharded: the first hidden width on "mlp", gathered after.
        axes = ((None, layers.MLP), (layers.MLP, None), (None, None))
        self.embeddings = nnx.List([
            layers.linear(a, b, axes=ax, dtype=dtype, param_dtype=param_dtype, kernel_init=init,
                          rngs=rngs)
            for a, b, ax in zip(widths[:-1], widths[1:], axes)
        ])  # fmt: skip

    @property
    def feature_dim(self) -> int:
        return self.config.embedding_size

    def __call__(self, log_mel: jax.Array) -> jax.Array:
        cfg = self.config
        if log_mel.shape[-2:] != (cfg.num_frames, cfg.num_bands):
            raise ValueError(
                f"expected [B, {cfg.num_frames}, {cfg.num_bands}], got {log_mel.shape}"
            )
        x = log_mel[..., None]
        convs = iter(self.features)
        for v in cfg.plan():
            if v == "M":
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = jax.nn.relu(next(convs)(x))
        x = x.reshape(x.shape[0], -1)
        for i, fc in enumerate(self.embeddings):
            x = fc(x)
            if i < len(self.embeddings) - 1 or cfg.final_relu:
                x = jax.nn.relu(x)
        return x

    def load_torch_state(self, sd: hf_import.StateDict) -> None:
        """Copies a torchvggish `VGG` state dict (naming in the module docstring)."""
        index = 0
        convs = iter(self.features)
        for v in self.config.plan():
            if v == "M":
                index += 1
                continue
            conv = next(convs)
            w = sd.get(f"features.{index}.weight").transpose(2, 3, 1, 0)
            hf_import.assign(conv.kernel, w, f"features.{index}.weight")
            hf_import.assign(conv.bias, sd.get(f"features.{index}.bias"), f"features.{index}.bias")
            index += 2  # conv, ReLU
        for i, fc in enumerate(self.embeddings):
            hf_import.assign_linear(fc, sd, f"embeddings.{2 * i}")

    @classmethod
    def from_config(cls, cfg: VGGishConfig = VGGishConfig(), *, seed: int = 0,
                    dtype=jnp.float32, param_dtype=jnp.float32) -> VGGish:  # fmt: skip
        """A seeded random-init model, for tests and runs without pretrained weights."""
        return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    @classmethod
    def from_pretrained(
        cls,
        file: str,
        *,
        final_relu: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        cfg: VGGishConfig | None = None,
    ) -> VGGish:
        """Loads a torchvggish state dict from a `.pth`/`.pt` (torch, weights_only) or
        `.safetensors` file. `cfg` only for non-standard widths."""
        cfg = dataclasses.replace(cfg or VGGishConfig(), final_relu=final_relu)
        model = hf_import.abstract_module(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        )
        sd = hf_import.StateDict(hf_import.read_weights_file(file), source=file)
        sd.mark_unused_ok(r"^pproc\.")
        model.load_torch_state(sd)
        sd.check_all_used()
        hf_import.check_all_set(model, source=file)
        return model


@dataclasses.dataclass(frozen=True)
class Postprocessor:
    """AudioSet's PCA (with whitening) + 8-bit quantisation of VGGish embeddings.

    The released AudioSet features went through this; raw embeddings did not. Parameters come
    from the TF release (`vggish_pca_params.npz`: `pca_eigen_vectors` [128, 128], `pca_means`
    [128]) or a torch/safetensors file with those names (optionally under `pproc.`).
    """

    eigen_vectors: np.ndarray  # float[128, 128], rows are output dims
    means: np.ndarray  # float[128]

    QUANTIZE_MIN = -2.0
    QUANTIZE_MAX = 2.0

    @classmethod
    def from_file(cls, file: str) -> Postprocessor:
        if file.endswith(".npz"):
            with np.load(file, allow_pickle=False) as f:
                tensors = dict(f)
        else:
            tensors = hf_import.read_weights_file(file)
        tensors = {k.removeprefix("pproc."): v for k, v in tensors.items()}
        try:
            vectors, means = tensors["pca_eigen_vectors"], tensors["pca_means"]
        except KeyError as e:
            raise KeyError(f"{file}: no {e} (found {sorted(tensors)})") from None
        return cls(np.asarray(vectors, np.float32), np.asarray(means, np.float32).reshape(-1))

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        """`float[..., 128]` -> `float[..., 128]` of integers in [0, 255]."""
        pca = (embeddings - self.means) @ self.eigen_vectors.T
        clipped = jnp.clip(pca, self.QUANTIZE_MIN, self.QUANTIZE_MAX)
        return jnp.round(
            (clipped - self.QUANTIZE_MIN) * (255.0 / (self.QUANTIZE_MAX - self.QUANTIZE_MIN))
        )
