"""Mesh construction, logical-axis rules -> NamedShardings, regex path selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_toy
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from tiktalk_jax import optim, sharding
from tiktalk_jax.models import layers


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"data": 8, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="cannot fill"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)


def test_make_mesh_has_auto_axes_in_config_order():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sharding.batch_spec(mesh) == P(("data", "fsdp"))
    assert sharding.data_parallel_size(mesh) == 8


def test_rules_place_params_and_optimizer_moments_on_a_data_x_fsdp_mesh():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    config = train_toy.get_config()
    model = train_toy.build(config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    shardings = sharding.state_shardings(nnx.state(model), mesh, sharding.DEFAULT_RULES)
    specs = {p: s.spec for p, s in sharding.leaves_with_paths(shardings)}
    # "embed" -> fsdp; "mlp" -> tensor (size 1: dropped); un-annotated LayerNorm: replicated.
    assert specs["encoder/kernel"] == P("fsdp")  # [8 embed, 16 mlp]
    assert specs["encoder/bias"] == P()  # [16 mlp]
    assert specs["head/kernel"] == P(None, "fsdp")  # [16 mlp, 4 embed]
    assert specs["head/bias"] == P("fsdp")
    assert specs["norm/scale"] == P()

    placed = jax.device_put(nnx.state(model), shardings)
    kernel = placed["encoder"]["kernel"].get_value()
    assert kernel.sharding.spec == P("fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 16)}

    # Adam moments inherit the params' logical axes, so they are sharded the same way.
    opt_sh = sharding.state_shardings(nnx.state(optimizer), mesh, sharding.DEFAULT_RULES)
    opt_specs = {p: s.spec for p, s in sharding.leaves_with_paths(opt_sh)}
    assert opt_specs["opt_state/0/mu/head/kernel"] == P(None, "fsdp")
    assert opt_specs["opt_state/0/nu/encoder/kernel"] == P("fsdp")
    assert opt_specs["step"] == P()


def test_tensor_rules_indivisible_dims_and_regex_overrides():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = layers.linear(8, 6, axes=("embed", "mlp"), rngs=rngs)
            self.odd = layers.linear(3, 4, axes=("embed", "mlp"), rngs=rngs)
            self.emb = layers.embedding(10, 8, axes=("vocab", "embed"), rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)))
    specs = {
        p: s.spec
        for p, s in sharding.leaves_with_paths(sharding.state_shardings(state, mesh, rules))
    }
    assert specs["up/kernel"] == P("fsdp", "tensor")
    assert specs["odd/kernel"] == P(None, "tensor")  # 3 is not divisible by fsdp=2: replicated
    assert specs["emb/embedding"] == P("tensor", "fsdp")
    overrides = (("up/kernel$", ("tensor", None)), ("emb/", ()))
    specs = {
        p: s.spec
        for p, s in sharding.leaves_with_paths(
            sharding.state_shardings(state, mesh, rules, overrides)
        )
    }
    assert specs["up/kernel"] == P("tensor")
    assert specs["up/bias"] == P("tensor")  # not matched: rules
    assert specs["emb/embedding"] == P()


def test_path_regex_filter_selects_params_by_path():
    model = train_toy.build(train_toy.get_config(), nnx.Rngs(0))
    frozen = nnx.state(model, optim.frozen_filter("^encoder/"))
    trainable = nnx.state(model, optim.trainable_filter("^encoder/"))
    assert [p for p, _ in sharding.leaves_with_paths(frozen)] == ["encoder/bias", "encoder/kernel"]
    assert "encoder/kernel" not in [p for p, _ in sharding.leaves_with_paths(trainable)]
    several = nnx.state(model, sharding.PathRegex(["^head/kernel$", "norm"]))
    assert [p for p, _ in sharding.leaves_with_paths(several)] == [
        "head/kernel",
        "norm/bias",
        "norm/scale",
    ]
    assert not jax.tree.leaves(nnx.state(model, optim.frozen_filter("")))
    mask = sharding.regex_mask({"a": {"bias": 1, "kernel": 2}}, r"bias$")
    assert mask == {"a": {"bias": True, "kernel": False}}
    assert sharding.path_str(("a", 0, "kernel")) == "a/0/kernel"


def test_sharded_params_compute_like_unsharded():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    config = train_toy.get_config()
    model = train_toy.build(config, nnx.Rngs(0))
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, train_toy.D_IN)), jnp.float32)
    expected = model(x)
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-6)
