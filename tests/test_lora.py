"""LoRA adapters on the repo's Linear-like layers: identity at init, frozen base, merging."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tiktalk_jax import optim, sharding
from tiktalk_jax.models import bert, layers, llm, lora

CONFIG = llm.LlmConfig(
    model_type="qwen3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    qk_norm=True,
    initializer_range=0.2,
)
# q and v (Einsum, 1 input axis), the attention output (Einsum, 2 input axes), MLP (Linear).
TARGETS = r"attention/(query|value|out)$|mlp/(up|down)$"


def _model(config=CONFIG, seed=0):
    return llm.Llm(config, rngs=nnx.Rngs(seed))


def _ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)))


@nnx.jit
def _forward(model, ids):
    return model(ids)


@nnx.jit
def _grads(model, ids):
    return nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids)


def _loss(model, ids):
    logp = jax.nn.log_softmax(model(ids[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _randomize_b(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam) and np.all(np.asarray(var.get_value()) == 0):
            var.set_value(jnp.asarray(rng.normal(0, 0.3, var.get_value().shape), jnp.float32))


def test_zero_init_b_gives_identical_outputs_and_annotated_params():
    model = _model()
    ids = _ids()
    want = np.asarray(_forward(model, ids))
    paths = lora.apply(model, rank=4, alpha=8, targets=TARGETS, rngs=nnx.Rngs(1))
    assert len(paths) == 2 * 5 and "layers/1/attention/out" in paths
    assert "layers/0/attention/key" not in paths
    np.testing.assert_allclose(np.asarray(_forward(model, ids)), want, atol=1e-6)
    layers.check_param_axes(model)
    axes = layers.param_axes(model)
    assert axes["layers/0/attention/query/lora_a"] == ("embed", None)
    assert axes["layers/0/attention/query/lora_b"] == (None, "heads", "kv")
    assert axes["layers/0/attention/out/lora_a"] == ("heads", "kv", None)
    assert axes["layers/0/mlp/down/lora_b"] == (None, "embed")
    assert model.layers[0].attention.out.lora_a.get_value().shape == (4, 8, 4)
    # The adapters shard with their base kernels on an fsdp x tensor mesh.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    specs = dict(sharding.leaves_with_paths(sharding.state_shardings(nnx.state(model), mesh)))
    assert specs["layers/0/attention/query/lora_a"].spec == P("fsdp")
    assert specs["layers/0/attention/query/lora_b"].spec == P(None, "tensor")
    with pytest.raises(ValueError, match="no Linear/Einsum"):
        lora.apply(model, rank=2, targets=r"norm$", rngs=nnx.Rngs(0))
    # Applying again to the same layers adds nothing (their bases are already adapted).
    with pytest.raises(ValueError, match="no Linear/Einsum"):
        lora.apply(model, rank=2, targets=r"attention/query", rngs=nnx.Rngs(0))


def test_only_lora_params_get_gradients_and_optimizer_state():
    model = _model()
    lora.apply(model, rank=4, targets=TARGETS, rngs=nnx.Rngs(1))
    _randomize_b(model)
    ids = _ids()
    base_before = jax.tree.map(
        np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    )
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    moments = [p for p, _ in sharding.leaves_with_paths(opt.opt_state) if "/mu/" in f"/{p}/"]
    assert moments and all(p.endswith(("lora_a", "lora_b")) for p in moments)
    assert len(moments) == 2 * 10

    grads = _grads(model, ids)
    grad_paths = [p for p, _ in sharding.leaves_with_paths(grads)]
    assert len(grad_paths) == 20 and all(p.endswith(("lora_a", "lora_b")) for p in grad_paths)
    loss = nnx.jit(_loss)
    before = float(loss(model, ids))
    opt.update(model, grads)
    assert float(loss(model, ids)) < before
    base_after = jax.tree.map(
        np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    )
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)

    # The train loop's route: a frozen-path regex leaves the optimizer the adapters only.
    cfg = ml_collections.ConfigDict(dict(optim.default_config()))
    loop_opt = optim.make_optimizer(model, cfg, 10, lora.frozen_regex())
    paths = [p for p, _ in sharding.leaves_with_paths(loop_opt.opt_state) if "/mu/" in f"/{p}/"]
    params = lambda ps: sorted(p.split("mu/", 1)[1] for p in ps)  # noqa: E731
    assert params(paths) == params(moments)


def test_remat_gives_the_same_gradients():
    grads = []
    for remat in (False, True):
        model = _model(dataclasses.replace(CONFIG, remat=remat))
        lora.apply(model, rank=4, targets=TARGETS, rngs=nnx.Rngs(1))
        _randomize_b(model)
        grads.append(jax.tree.map(np.asarray, _grads(model, _ids())))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads)


def test_merge_equals_unmerged():
    model = _model()
    plain_paths = set(layers.param_axes(model))
    lora.apply(model, rank=4, alpha=16, targets=TARGETS, rngs=nnx.Rngs(1))
    _randomize_b(model)
    ids = _ids()
    want = np.asarray(_forward(model, ids))
    # The adapters matter: the base alone computes something else.
    assert not np.allclose(want, np.asarray(_forward(_model(), ids)), atol=1e-3)
    merged = lora.merge(model)
    assert len(merged) == 10
    assert type(model.layers[0].attention.out) is nnx.Einsum
    assert set(layers.param_axes(model)) == plain_paths  # original structure and paths
    np.testing.assert_allclose(np.asarray(_forward(model, ids)), want, atol=1e-5)


def test_generic_over_other_models():
    """The same wrapper adapts a BERT encoder's attention (with biases)."""
    cfg = bert.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=12,
    )  # fmt: skip
    model = bert.BertModel(cfg, add_pooling_layer=False, rngs=nnx.Rngs(0))
    model.eval()
    ids = jnp.asarray(np.arange(10).reshape(2, 5))
    want = np.asarray(_forward(model, ids))
    paths = lora.apply(model, rank=2, targets=r"attention/(query|value)$", rngs=nnx.Rngs(1))
    assert paths == ["layers/0/attention/query", "layers/0/attention/value"]
    np.testing.assert_allclose(np.asarray(_forward(model, ids)), want, atol=1e-6)
    with pytest.raises(ValueError, match="nnx.Linear or nnx.Einsum"):
        lora.LoRA(model.embeddings.word_embeddings, rank=2, rngs=nnx.Rngs(0))
    assert lora.frozen_regex("^llm/") == r"^llm/(?!.*(^|/)lora_[ab]$)"
    frozen = sharding.PathRegex(lora.frozen_regex("llm/"))
    assert frozen(("llm", "layers", 0, "attention", "query", "base", "kernel"), None)
    assert not frozen(("llm", "layers", 0, "attention", "query", "lora_a"), None)
    assert not frozen(("adapter", "kernel"), None)
