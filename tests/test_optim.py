"""Schedule, weight-decay mask, frozen parameters and gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_toy
from flax import nnx
from jax.sharding import NamedSharding

from tiktalk_jax import optim, sharding


def _cfg(**kw):
    cfg = optim.default_config()
    cfg.update(kw)
    return cfg


def test_warmup_then_linear_decay():
    schedule = optim.learning_rate_schedule(_cfg(lr=1.0, warmup_steps=10, end_lr_fraction=0.1), 110)
    values = [float(schedule(s)) for s in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    no_warmup = optim.learning_rate_schedule(_cfg(lr=2.0, warmup_steps=0), 4)
    np.testing.assert_allclose([float(no_warmup(s)) for s in (0, 2, 4)], [2.0, 1.0, 0.0])


def test_weight_decay_skips_biases_and_layernorm():
    model = train_toy.build(train_toy.get_config(), nnx.Rngs(0))
    params = lambda: sharding.leaves_with_paths(nnx.state(model, nnx.Param))
    before = {p: np.asarray(v) for p, v in params()}
    cfg = _cfg(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    optimizer = optim.make_optimizer(model, cfg, total_steps=100)
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    # Adam's update is 0: only decay moves params. (jit: eager optax dispatches op by op.)
    nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, zero_grads)
    after = {p: np.asarray(v) for p, v in params()}
    for path in before:
        if path.endswith(("bias", "scale")):
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        else:  # p <- p - lr * wd * p
            np.testing.assert_allclose(after[path], before[path] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_frozen_params_get_no_optimizer_state_and_no_updates():
    model = train_toy.build(train_toy.get_config(), nnx.Rngs(0))
    model.eval()
    cfg = _cfg(lr=0.05, warmup_steps=0)
    frozen, trainable = optim.frozen_filter("^encoder/"), optim.trainable_filter("^encoder/")
    optimizer = optim.make_optimizer(model, cfg, total_steps=10, frozen="^encoder/")
    opt_paths = [p for p, _ in sharding.leaves_with_paths(nnx.state(optimizer))]
    assert not [p for p in opt_paths if "encoder" in p]
    assert any(p.endswith("mu/head/kernel") for p in opt_paths)

    start = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    x = jnp.ones((4, train_toy.D_IN))

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: jnp.mean((m(x) - 1.0) ** 2)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(model)
        assert not jax.tree.leaves(nnx.state(grads, frozen))  # no gradient for frozen params
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)
    end = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    np.testing.assert_array_equal(end["encoder"]["kernel"], start["encoder"]["kernel"])
    np.testing.assert_array_equal(end["encoder"]["bias"], start["encoder"]["bias"])
    assert not np.allclose(end["hidden"]["kernel"], start["hidden"]["kernel"])


def test_gradient_accumulation_equals_the_big_batch(num_micro=4):
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    model = train_toy.build(train_toy.get_config(), nnx.Rngs(0))
    model.eval()  # no dropout: micro-batches see the same function as the big batch
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    records = train_toy.records(64)
    batch = {
        "x": np.stack([r["x"] for r in records]),
        "y": np.stack([r["y"] for r in records]),
        "example_mask": np.ones(64, bool),
    }
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, NamedSharding(mesh, sharding.batch_spec(mesh)))

        def fn(carry, mb, i):
            def loss(p):
                return train_toy.loss_fn(nnx.merge(graphdef, p, rest), mb, None)

            (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
            return carry + 1, {"loss": value, **aux}, grads

        @jax.jit
        def both(batch):
            big = optim.accumulate_gradients(fn, 0, batch, 1)
            acc = optim.accumulate_gradients(fn, 0, batch, num_micro, ("data", "fsdp"))
            return big, acc

        (n1, out1, g1), (nk, outk, gk) = both(batch)
    assert int(n1) == 1 and int(nk) == num_micro
    np.testing.assert_allclose(float(outk["loss"]), float(out1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(outk["mae"]), float(out1["mae"]), rtol=1e-5)
    for (path, a), (_, b) in zip(sharding.leaves_with_paths(g1), sharding.leaves_with_paths(gk)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7, err_msg=path)


def test_microbatches_are_strided_and_balanced():
    x = jnp.arange(8)
    micro = optim.split_microbatches({"x": x}, 2)["x"]
    np.testing.assert_array_equal(np.asarray(micro), [[0, 2, 4, 6], [1, 3, 5, 7]])
    with pytest.raises(ValueError, match="not divisible"):
        optim.split_microbatches({"x": jnp.arange(6)}, 4)
