"""Maria end to end on the bundled sample, 8 fake devices: the demo's data preparation
(build, random-init feature extraction, knowledge retrieval, vocab), training through the shared
loop on a data x fsdp mesh, checkpoints, evaluation (scores and generations files, per-kind
scores, TensorBoard scalars), eval determinism, and every variant training with falling loss.

The data is prepared once for the module; the models are a 1-layer, 32-wide Maria so that
compiling (most of the runtime on CPU) stays short.
"""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from tiktalk_jax import evaluate, input_pipeline, main, metrics, train
from tiktalk_jax.models import maria, registry

STEPS = 16


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    from tfds_builder import tiktalk
    from tiktalk_jax import sample

    root = tmp_path_factory.mktemp("maria_e2e")
    raw, data = str(root / "raw"), str(root / "data")
    sample.write_sample(raw, seed=0)
    tiktalk.build(raw, data, "dialogues")
    tiktalk.build(raw, data, "media", num_workers=1)
    features = main.extract_sample_features(data)
    main.prepare_sample_knowledge(raw, data)
    main.write_sample_vocab(raw, data)
    return str(root), features


def tiny(root, features, variant, steps, **mesh):
    config = main.sample_config(variant, root, features, steps)
    config.model.bert.update(
        dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    config.mesh.update(mesh or dict(data=4, fsdp=2))
    config.input.batch_size = 16
    config.optim.lr = 1e-2  # a 32-wide model, a few steps
    config.log_every = 1
    config.decode.max_new_tokens = 8
    config.eval.skip_meteor = True  # METEOR itself is tested in test_metrics.py
    return config


@pytest.fixture(scope="module")
def trained(sample_data, tmp_path_factory):
    """T+V+A+K trained STEPS steps on data=4 x fsdp=2, checkpoints every STEPS / 2, both
    checkpoints evaluated on the test split."""
    root, features = sample_data
    config = tiny(root, features, "tvak", STEPS)
    config.checkpoint_every = STEPS // 2
    workdir = str(tmp_path_factory.mktemp("run_tvak"))
    result = train.train_and_evaluate(config, workdir)
    evals = evaluate.evaluate(config, workdir, steps="all")
    return config, workdir, result, evals


def _losses(workdir):
    return [m["train/loss"] for _, m in sorted(train.read_metrics(workdir).items()) if m]


def test_trains_on_a_data_x_fsdp_mesh_and_checkpoints(trained):
    config, workdir, result, _ = trained
    assert result.step == STEPS and not result.preempted
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert saved == [STEPS // 2, STEPS]
    losses = _losses(workdir)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    # Parameters are sharded over the fsdp axis (embed -> fsdp) on the 8 devices.
    params = nnx.state(result.model, nnx.Param)
    word = params["bert"]["embeddings"]["word_embeddings"]["embedding"].value
    assert "fsdp" in str(word.sharding.spec) and len(word.sharding.device_set) == 8


def test_eval_writes_scores_generations_and_tensorboard(trained, sample_data):
    config, workdir, _, evals = trained
    root, _ = sample_data
    assert [r.step for r in evals] == [STEPS // 2, STEPS]
    kinds = json.load(open(os.path.join(root, "raw", "sample_kinds.json"), encoding="utf-8"))
    for r in evals:
        assert r.scores_path == os.path.join(workdir, f"scores_test_step{r.step}.json")
        scores = json.load(open(r.scores_path, encoding="utf-8"))
        assert scores == r.scores
        n = scores["num_examples"]
        assert n == 55 and scores["split"] == "test" and scores["step"] == r.step
        assert set(scores["nlg_scores"]) == set(metrics.METRIC_KEYS)
        assert scores["nlg_scores"]["meteor"] is None
        assert set(scores["retrieval"]) == {"recall@1", "recall@5", "recall@10", "mean_rank"}
        assert 1 <= scores["retrieval"]["mean_rank"] <= 96
        per_kind = scores["per_kind"]
        assert set(per_kind) == {"vision", "audio", "knowledge", "text"}
        assert sum(k["num_examples"] for k in per_kind.values()) == n
        assert "recall@1" in per_kind["vision"] and "cider" in per_kind["audio"]

        meta = scores["metadata"]
        assert meta["checkpoint_step"] == r.step and meta["variant"] == "tvak"
        assert meta["skip_meteor"] is True and meta["meteor"].startswith("skipped")
        assert meta["tokenize"] == "char" and meta["aggregation"] == metrics.AGGREGATION
        assert meta["decoding"]["num_beams"] == 5 and meta["decoding"]["max_new_tokens"] == 8
        assert meta["retrieval"]["num_negatives"] == 95
        frames = meta["side_tables"]["frames"]
        assert frames["random_init"] is True and frames["weights"] == "random-init seed=0"
        assert "standardization" in frames["normalization"]
        assert frames["videos_without_features"] == 1  # the sample's missing test mp4
        assert meta["side_tables"]["audio"]["encoder"] == "vggish"
        assert len(meta["side_tables"]["knowledge"]["kg_sha256"]) == 64

        lines = [json.loads(x) for x in open(r.generations_path, encoding="utf-8")]
        assert len(lines) == n == len({g["dialogue_id"] for g in lines})
        for g in lines:
            assert len(g["references"]) == 5 and g["context"]
            assert isinstance(g["hypothesis"], str) and g["kind"] == kinds[g["dialogue_id"]]
            assert 1 <= g["best_reference_rank"] <= 96
    logged = train.read_metrics(workdir)[STEPS]
    assert logged["test/bleu2"] == evals[-1].scores["nlg_scores"]["bleu2"]
    assert logged["test/vision/mean_rank"] == evals[-1].scores["per_kind"]["vision"]["mean_rank"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_eval_is_deterministic_and_matches_the_in_memory_model(trained, tmp_path):
    """Evaluating the final model as returned by training (no restore) into another workdir
    gives the same hypotheses and scores as the restored checkpoint."""
    config, workdir, result, evals = trained
    (again,) = evaluate.evaluate(config, str(tmp_path), model=result.model, model_step=STEPS)
    first = evals[-1]
    read = lambda p: [json.loads(x) for x in open(p, encoding="utf-8")]
    assert read(again.generations_path) == read(first.generations_path)
    strip = lambda s: {k: v for k, v in s.items() if k != "metadata"}
    assert strip(again.scores) == strip(first.scores)


def test_side_tables_standardize_features_and_cover_videos_without_features(sample_data):
    root, features = sample_data
    config = tiny(root, features, "tva", 1)
    tables = maria.side_tables(config)
    assert sorted(tables) == ["train", "val"]  # the train split and config.input.eval_splits
    frames, audio = tables["train"]
    assert (frames.name, audio.name) == ("frames", "audio")
    source = frames.source
    rows = np.concatenate([source[i]["features"] for i in range(len(source))])
    # Standardized with the train split's own statistics: zero mean, unit std per dimension
    # (a dead ReLU channel of the random encoder stays constant: zero after centering).
    np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=1e-4)
    std = rows.std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-3) | (std == 0)) and np.mean(std > 0) > 0.9
    # The train video whose mp4 is truncated has no features: it answers with zero rows.
    (missing,) = source.extra
    assert source[frames.index()[missing]]["features"].shape == (0, features["frames"][1])
    assert source.metadata["random_init"] and source.metadata["videos_without_features"] == 1
    config.input.frame_dim = 7
    with pytest.raises(ValueError, match="64-d but config.input.frame_dim=7"):
        maria.side_tables(config)


# XLA's lowest backend optimisation level: these tiny programs compile twice as fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.mark.parametrize("variant", sorted(maria.VARIANTS))
def test_each_variant_trains_on_the_sample_with_falling_loss(sample_data, variant):
    """The family's build, side tables and formatter on the real sample for every variant (the
    loop itself is exercised above): a few AdamW steps on one device, fresh batches each."""
    root, features = sample_data
    config = tiny(root, features, variant, 10)
    family = registry.get("maria")
    datasets = input_pipeline.make_datasets(config, side_tables=family.side_tables(config))
    model = family.build(config, nnx.Rngs(0))
    flags = maria.VARIANTS[variant]
    assert (model.frames is not None, model.audio is not None, model.config.use_knowledge) == flags
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(state, batch, rng):
        model, optimizer = nnx.merge(graphdef, state)
        loss_fn = lambda m: family.loss_fn(m, batch, nnx.Rngs(dropout=rng))
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    losses, batches = [], iter(datasets.train)
    for i in range(10):
        batch = next(batches)
        keys = ["context_ids", "frame_feats", "audio_feats", "knowledge_ids"]
        assert [k in batch for k in keys] == [True, *flags]
        state, loss = step(state, batch, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
