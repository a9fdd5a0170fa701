"""BLIP-2 for dialogue: formatter, prefix masking, training through the shared loop on 8 devices
(fsdp-sharded frozen LLM), generation and scoring vs the training forward, temporal positions,
a pretrained Q-Former with a different LLM width, and the per-frame token extraction option."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from configs import blip2 as blip2_config
from tiktalk_jax import encoders, optim, sharding, train
from tiktalk_jax import input_pipeline as ip
from tiktalk_jax import tokenizer as tokenizer_lib
from tiktalk_jax.models import blip2, blip2_inputs, llm, llm_inputs, registry

COLOURS = ("红色", "绿色", "蓝色", "黄色")
TEXT = "好看这是什么颜色的哈视频标题回复" + "".join(COLOURS)
N_TOKENS, DIM, FRAMES = 5, 12, 3
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_records(n, seed=0, frames=FRAMES):
    """Dialogues whose answer is the video's colour, with their "visual" side record attached.

    Colour c puts its prototype into ONE frame (the moment); the other frames are noise."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(123).normal(size=(len(COLOURS), DIM)).astype(np.float32)
    records = []
    for i in range(n):
        c = int(rng.integers(len(COLOURS)))
        tokens = 0.3 * rng.normal(size=(frames, N_TOKENS, DIM)).astype(np.float32)
        moment = int(rng.integers(frames))
        tokens[moment] += prototypes[c]
        visual = dict(
            video_id=f"v{i}",
            features=tokens.mean(0),
            image_features=tokens[moment],
            frame_features=tokens,
        )
        records.append(
            dict(
                dialogue_id=f"v{i}/c{i}",
                video_id=f"v{i}",
                title="好看",
                context=["这是什么颜色的"],
                responses=[f"{COLOURS[c]}的"] * 5,
                visual=visual,
            )
        )
    return records


def dialogues(records):
    return [{k: v for k, v in r.items() if k != blip2_inputs.VISUAL} for r in records]


def visual_table(records):
    return ip.SideTable(blip2_inputs.VISUAL, [r["visual"] for r in records], key="video_id")


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab")
    tokenizer_lib.load_tokenizer(None, str(path), texts=[TEXT], vocab_size=100)
    return str(path)


def tiny_config(variant, vocab_dir, **input_overrides):
    config = blip2_config.get_config(f"variant={variant},size=tiny,visual_dim={DIM}")
    inp = config.input
    inp.update(
        vocab_dir=vocab_dir,
        visual_tokens=N_TOKENS,
        max_title_len=4,
        max_context_len=24,
        max_response_len=6,
        batch_size=8,
        eval_splits=(),
        num_references=0,
    )
    if variant == "temporal":
        inp.visual_frames = FRAMES
    inp.update(input_overrides)
    config.model.qformer.update(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_query_tokens=4,
    )  # fmt: skip
    config.mesh.update(data=2, fsdp=4, tensor=1)
    config.update(total_steps=10, log_every=1, checkpoint_every=100, async_checkpoints=False)
    config.optim.update(lr=3e-3, warmup_steps=1)
    return config


def build(config):
    return blip2.build(config, nnx.Rngs(int(config.seed)))


def formatted(config, records, train=True):
    tok = tokenizer_lib.load_tokenizer(None, config.input.vocab_dir)
    return ip.get_formatter("blip2", config.input, tok, train=train)(records)


def jit_with(model, fn, **static):
    graphdef, state = nnx.split(model)
    compiled = jax.jit(
        lambda state, *args: fn(nnx.merge(graphdef, state), *args, **static),
        compiler_options=FAST_COMPILE,
    )
    return lambda *args: compiled(state, *args)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _response_logits(graphdef, state, batch):
    return nnx.merge(graphdef, state).response_logits(batch)


def response_logits(model, batch):
    """Teacher-forced response logits (one compilation for every model of the same graph)."""
    return np.asarray(_response_logits(*nnx.split(model), batch))


def _params(model):
    return {
        sharding.path_str(k): np.asarray(v)
        for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", blip2.VARIANTS)
def test_formatter_adds_the_variants_frames_to_the_llm_formatters_text(vocab_dir, variant):
    config = tiny_config(variant, vocab_dir, visual_frames=2 if variant == "temporal" else 1)
    records = make_records(4, seed=1, frames=FRAMES)
    records[3]["visual"] = dict(video_id="v3", features=np.zeros((0, DIM), np.float32))
    batch = formatted(config, records)
    tok = tokenizer_lib.load_tokenizer(None, vocab_dir)
    text = llm_inputs.LlmFormatter(config.input, tok, train=True)(records)
    for key, value in text.items():
        np.testing.assert_array_equal(batch[key], value)
    f = 2 if variant == "temporal" else 1
    assert batch["visual"].shape == (4, f, N_TOKENS, DIM) and batch["visual"].dtype == np.float32
    assert batch["visual_mask"].tolist() == [[True] * f] * 3 + [[False] * f]
    assert not batch["visual"][3].any()
    for i in range(3):
        v = records[i]["visual"]
        want = {
            "img": v["image_features"][None],
            "video": v["features"][None],
            "temporal": v["frame_features"][[0, 2]],  # 3 frames -> 2 spread over the video
        }[variant]
        np.testing.assert_array_equal(batch["visual"][i], want)
    with pytest.raises(KeyError, match="vit_g features"):
        formatted(config, dialogues(records))


@pytest.fixture(scope="module")
def eval_model(vocab_dir):
    config = tiny_config("temporal", vocab_dir)
    model = build(config)
    # Non-zero frame positions (they start at zero) and a larger projection make the prefix
    # matter visibly to the random LLM.
    pos = model.frame_positions
    pos.set_value(jax.random.normal(jax.random.key(1), pos.get_value().shape))
    proj = model.qformer.language_projection.kernel
    proj.set_value(proj.get_value() * 50)
    model.eval()
    return config, model


def test_no_frames_means_exactly_the_text_only_llm(eval_model):
    config, model = eval_model
    records = make_records(3, seed=2)
    batch = formatted(config, records)
    logits = response_logits(model, batch)
    blind = dict(batch, visual_mask=np.zeros_like(batch["visual_mask"]))
    blind_logits = response_logits(model, blind)
    ids = np.concatenate([batch["prompt_ids"], batch["response_ids"]], 1)
    mask = np.concatenate([batch["prompt_mask"], batch["response_mask"]], 1)
    text_only = np.asarray(jit_with(model.llm, lambda m, i, k: m(i, k))(ids, mask))
    lc, lr = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    valid = batch["response_mask"]
    np.testing.assert_allclose(
        blind_logits[valid], text_only[:, lc - 1 : lc + lr - 1][valid], atol=1e-4
    )
    assert np.abs(logits - blind_logits)[valid].max() > 1e-2  # the frames are read


def test_scores_and_greedy_generation_agree_with_the_training_forward(eval_model):
    config, model = eval_model
    batch = formatted(config, make_records(3, seed=3))
    logits = response_logits(model, batch)
    logp = jax.nn.log_softmax(logits)
    ids, mask = batch["response_ids"], batch["response_mask"]
    want = np.sum(np.where(mask, np.take_along_axis(logp, ids[..., None], 2)[..., 0], 0), 1)
    # Candidates: the reference and a shuffled copy, scored with the prompt cache.
    cands = np.stack([ids, ids[::-1]], 1)
    cmask = np.stack([mask, mask[::-1]], 1)
    got = np.asarray(jit_with(model, blip2.score_responses)(batch, cands, cmask))
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4)
    cfg = llm.search_config(model.llm.config, max_new_tokens=4)
    out = jit_with(model, blip2.generate, cfg=cfg, method="greedy")(batch)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], logits[:, 0].argmax(-1))


def test_frame_positions_make_frame_order_matter(eval_model, vocab_dir):
    config, model = eval_model
    batch = formatted(config, make_records(2, seed=4))
    prefix = jit_with(model, lambda m, v, k: m.visual_prefix(v, k)[0])
    swapped = batch["visual"][:, ::-1]
    base = np.asarray(prefix(batch["visual"], batch["visual_mask"]))
    assert np.abs(np.asarray(prefix(swapped, batch["visual_mask"])) - base).max() > 1e-3
    # Without positions (img / video, or all-zero positions) the queries see a set of tokens.
    model.frame_positions.set_value(jnp.zeros_like(model.frame_positions.get_value()))
    prefix = jit_with(model, lambda m, v, k: m.visual_prefix(v, k)[0])
    base = np.asarray(prefix(batch["visual"], batch["visual_mask"]))
    np.testing.assert_allclose(
        np.asarray(prefix(swapped, batch["visual_mask"])), base, rtol=1e-4, atol=1e-4
    )


def _capturing_family(store):
    """The blip2 family under another name whose build also records the initial parameters
    (the loop builds the model itself; building it again would cost a second random init)."""
    family = registry.get("blip2")

    def build(config, rngs):
        model = family.build(config, rngs)
        store.update(_params(model))
        return model

    return registry.register(
        dataclasses.replace(family, name="blip2_capture", build=build), override=True
    )


@pytest.fixture(scope="module")
def llm_run(vocab_dir, tmp_path_factory):
    """An `llm` family run (configs/llm_text.py, LoRA on a random-init base, 2 steps) on the
    mesh the BLIP-2 runs use, as the paper fine-tunes its LLM on text before BLIP-2."""
    from configs import llm_text

    workdir = str(tmp_path_factory.mktemp("llm_run"))
    run = llm_text.get_config("size=tiny,rank=2")
    run.input.update(vocab_dir=vocab_dir, max_title_len=4, max_context_len=24,
                     max_response_len=6, batch_size=8, eval_splits=())  # fmt: skip
    run.mesh.update(data=2, fsdp=4, tensor=1)
    run.update(total_steps=2, log_every=1, async_checkpoints=False)
    run.eval.at_end = False
    data = ip.make_datasets(run, sources={"train": dialogues(make_records(8, seed=9))},
                            process_index=0, process_count=1)  # fmt: skip
    train.train_and_evaluate(run, workdir, datasets=data)
    return workdir


def test_temporal_trains_through_the_loop_on_8_devices_only_the_adapter_changes(
    vocab_dir, llm_run, tmp_path
):
    from tiktalk_jax import evaluate

    before = {}
    config = tiny_config("temporal", vocab_dir)
    config.model.llm_run = llm_run  # the text-trained LLM, frozen
    config.model.name = _capturing_family(before).name
    config.input.formatter = "blip2"
    records = make_records(32, seed=5)
    data = ip.make_datasets(
        config,
        sources={"train": dialogues(records)},
        side_tables={"train": [visual_table(records)]},
        process_index=0,
        process_count=1,
    )
    result = train.train_and_evaluate(config, str(tmp_path), datasets=data)
    assert result.step == config.total_steps
    losses = [m["train/loss"] for _, m in sorted(train.read_metrics(str(tmp_path)).items())]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    after = _params(result.model)
    assert set(after) == set(before)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    llm_paths = {k for k in before if k.startswith("llm/")}
    assert llm_paths and not changed & llm_paths  # the LLM is frozen
    adapter = set(before) - llm_paths
    assert {"qformer/query_tokens", "qformer/language_projection/kernel", "frame_positions"} <= (
        changed
    )
    # Every adapter parameter moves (key biases only by rounding: softmax ignores a per-query
    # constant, so their exact gradient is zero).
    assert {k for k in adapter if not k.endswith("key/bias")} <= changed
    # The frozen LLM lives in fsdp shards.
    spec = result.model.llm.layers[0].mlp.up.kernel.get_value().sharding.spec
    assert "fsdp" in jax.tree.leaves(tuple(spec)), spec
    # ... and is the llm run's model, its LoRA adapters merged: same outputs, no adapters.
    assert not any("lora" in k for k in after)
    mesh = sharding.make_mesh(config.mesh)
    trained = evaluate.ModelLoader(evaluate.load_config(llm_run), llm_run, mesh).load(2)
    batch = formatted(config, records[:8])
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    with jax.set_mesh(mesh):
        want = np.asarray(nnx.jit(lambda m: m(ids, mask))(trained))
        got = np.asarray(nnx.jit(lambda m: m(ids, mask))(result.model.llm))
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4)
    assert registry.get("blip2").frozen_source(config) == llm_run


def test_llm_run_with_another_tokenizer_is_refused(vocab_dir, llm_run, tmp_path):
    config = tiny_config("video", str(tmp_path), vocab_size=7)  # no vocab.txt: another spec
    config.model.llm_run = llm_run
    with pytest.raises(ValueError, match="another tokenizer"):
        blip2.llm_from_run(config, llm_run)
    config.model.llm_run = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        blip2.llm_from_run(config, str(tmp_path))


@pytest.mark.parametrize("variant", ["img", "video"])
def test_img_and_video_train_with_falling_loss(eval_model, vocab_dir, variant):
    config = tiny_config(variant, vocab_dir)
    model = build(config)
    assert model.frame_positions is None
    frozen = {k: v for k, v in _params(model).items() if k.startswith("llm/")}
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=optim.trainable_filter(config.frozen))
    batch = formatted(config, make_records(16, seed=7))
    graphdef, state = nnx.split((model, optimizer))
    diff = nnx.DiffState(0, optim.trainable_filter(config.frozen))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def train_step(state):
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(lambda m: blip2.loss_fn(m, batch), argnums=diff, has_aux=True)
        (loss, _), grads = grad_fn(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    losses = []
    for _ in range(10):
        state, loss = train_step(state)
        losses.append(float(loss))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    model, _ = nnx.merge(graphdef, state)
    after = _params(model)
    assert all(np.array_equal(after[k], v) for k, v in frozen.items())


def test_instructed_queries_read_the_prompt_and_train_with_the_adapter(vocab_dir):
    """config.model.qformer.instruction (InstructBLIP): the prefix depends on the prompt, not on
    its padding; training moves the instruction input with the rest of the adapter only."""
    config = tiny_config("video", vocab_dir)
    config.model.qformer.instruction = True
    model = build(config)
    assert model.instructed and not build(tiny_config("video", vocab_dir)).instructed
    records = make_records(4, seed=8)
    batch = formatted(config, records)
    prefix = jit_with(model, lambda m, b: m.prompt_inputs(b)[0][:, : m.num_queries])
    base = np.asarray(prefix(batch))
    other = [dict(r, context=[r["context"][0] + "再问一次"]) for r in records]
    changed = np.asarray(prefix(formatted(config, other)))
    assert np.abs(changed - base).max() > 1e-4  # another prompt, another prefix
    # The same prompt with more left padding (a longer neighbour in the batch): same prefix.
    longer = records[:1] + [dict(records[1], context=["很长的上下文" * 3])]
    pair = np.asarray(prefix(formatted(config, longer)))
    np.testing.assert_allclose(pair[0], base[0], atol=1e-5)
    params = _params(model)
    assert {"qformer/instruction/projection/kernel",
            "qformer/layers/0/text_mlp/up/kernel"} <= set(params)  # fmt: skip
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=optim.trainable_filter(config.frozen))
    diff = nnx.DiffState(0, optim.trainable_filter(config.frozen))

    @nnx.jit
    def train_step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(lambda m: blip2.loss_fn(m, batch), argnums=diff, has_aux=True)
        (loss, _), grads = grad_fn(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(2):
        train_step(model, optimizer, batch)
    after = _params(model)
    moved = {k for k in params if not np.array_equal(params[k], after[k])}
    assert not {k for k in moved if k.startswith("llm/")}
    # (The last layer's text FFN feeds nothing the queries read: it gets no gradient.)
    assert {"qformer/instruction/projection/kernel", "qformer/layers/0/text_mlp/down/kernel",
            "qformer/query_tokens"} <= moved  # fmt: skip
    assert "qformer/layers/1/text_mlp/down/kernel" not in moved


def test_pretrained_qformer_feeds_an_llm_of_another_width(vocab_dir, tmp_path, caplog):
    hf_config = transformers.Blip2Config(
        vision_config=dict(hidden_size=DIM, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32),
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=40, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
        num_query_tokens=3,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Blip2ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        hf.query_tokens.normal_()
    hf.save_pretrained(tmp_path)
    config = tiny_config("video", vocab_dir)
    config.model.qformer.init_from = str(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = build(config)
    assert "RE-INITIALISED" in caplog.text
    assert model.num_queries == 3 and model.qformer.config.hidden_size == 16
    np.testing.assert_allclose(
        model.qformer.query_tokens.get_value(), hf.query_tokens.detach().numpy(), atol=1e-6
    )
    assert model.qformer.language_projection.kernel.get_value().shape == (16, 64)
    batch = formatted(config, make_records(2, seed=6))
    loss, aux = jit_with(model, blip2.loss_fn)(batch)
    assert np.isfinite(float(loss)) and float(aux["tokens"]) == batch["response_mask"].sum()
    config.input.visual_dim = DIM + 1
    with pytest.raises(ValueError, match="visual_dim"):
        blip2.build(config, nnx.Rngs(0))


def test_extraction_option_stores_spread_frame_tokens(monkeypatch):
    from tiktalk_jax.models import vit

    # No weights are used here: build the encoder shape-only (a random init compiles a small
    # program per parameter shape).
    monkeypatch.setattr(
        vit.VisionTransformer,
        "from_config",
        classmethod(lambda cls, cfg, **kw: nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))),
    )
    tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    plain = encoders.build_encoder("vit_g", model_config=tiny)
    assert "frame_features" not in plain.metadata["fields"]
    assert "frame_tokens" not in plain.metadata  # old datasets still resume
    enc = encoders.build_encoder("vit_g", model_config=tiny, frame_tokens=3)
    assert enc.metadata["frame_tokens"] == 3
    assert enc.metadata["fields"]["frame_features"]["shape"] == [None, 257, 8]
    assert "frame_features" in enc.feature_fields
    out = np.arange(7 * 2 * 8, dtype=np.float32).reshape(7, 2, 8)  # 7 frames of 2 tokens
    prep = encoders.Prepared(out, {"times": np.arange(7, dtype=np.float32)})
    record = enc.assemble("v0", prep, out)
    np.testing.assert_array_equal(record["frame_indices"], [0, 3, 6])
    np.testing.assert_array_equal(record["frame_features"], out[[0, 3, 6]])
    short = enc.assemble("v1", prep, out[:2])
    assert short["frame_features"].shape == (2, 2, 8)
    with pytest.raises(ValueError, match="only for vit_g"):
        encoders.build_encoder("vggish", frame_tokens=2)


def test_side_tables_check_the_features_field(vocab_dir, tmp_path):
    from tiktalk_jax import features

    features.write_json(
        str(tmp_path / features.METADATA_NAME),
        {"fields": {"features": {"shape": [N_TOKENS, DIM]},
                    "image_features": {"shape": [N_TOKENS, DIM]}}},
    )  # fmt: skip
    config = tiny_config("temporal", vocab_dir, visual_dir=str(tmp_path))
    with pytest.raises(ValueError, match="frame_tokens"):
        blip2.side_tables(config)
    config = tiny_config("video", vocab_dir, visual_dir=str(tmp_path), visual_tokens=257)
    with pytest.raises(ValueError, match="visual_tokens"):
        blip2.side_tables(config)


# --------------------------------------------------------------------------------------------
# The bundled sample end to end: extraction, the text LLM run, every variant through the loop.
# --------------------------------------------------------------------------------------------

SAMPLE_VIT = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory):
    """The sample built as `make demo` does, tiny random-init vit_g features with per-frame
    tokens (`extract --frame_tokens=2`), and a 2-step full fine-tuning `llm` run on it."""
    from configs import llm_text
    from tfds_builder import tiktalk
    from tiktalk_jax import extract, main, sample

    root = tmp_path_factory.mktemp("blip2_sample")
    raw, data = str(root / "raw"), str(root / "data")
    sample.write_sample(raw, seed=0)
    tiktalk.build(raw, data, "dialogues")
    tiktalk.build(raw, data, "media", num_workers=1)
    main.write_sample_vocab(raw, data)
    media = extract.media_dir(data)
    sources = {s: extract.open_media(media, s) for s in extract.media_splits(media)}
    encoder = encoders.build_encoder("vit_g", model_config=SAMPLE_VIT, frame_tokens=2)
    extract.extract_dataset(encoder, sources, str(root / "data" / "features" / "vit_g"),
                            progress=False, media=dict(dir=media))  # fmt: skip
    kinds = str(root / "raw" / "sample_kinds.json")
    run = llm_text.get_config(f"size=tiny,lora=false,data_dir={data},kinds_file={kinds}")
    _shrink(run)
    llm_dir = str(root / "llm_text")
    train.train_and_evaluate(run, llm_dir)
    return data, kinds, llm_dir


def _shrink(config):
    """A few steps on short sequences; eval with few tokens and candidates (CPU time)."""
    config.input.update(max_title_len=4, max_context_len=16, max_response_len=8, batch_size=8,
                        eval_batch_size=32, eval_splits=())  # fmt: skip
    config.mesh.update(data=2, fsdp=4, tensor=1)
    config.update(total_steps=2, log_every=1, checkpoint_every=2, async_checkpoints=False)
    config.decode.update(num_beams=2, max_new_tokens=4)
    config.eval.update(at_end=False, skip_meteor=True, num_negatives=3)


# video runs with instruction-aware queries (instruct=true) here: the loop and fsdp sharding
# cover that option too; plain video trains and evaluates on the sample in tests/test_table3.py.
@pytest.mark.parametrize("variant,instruct", [("img", False), ("video", True),
                                              ("temporal", False)])  # fmt: skip
def test_each_variant_trains_and_evaluates_on_the_sample(sample_runs, variant, instruct, tmp_path):
    from tiktalk_jax import evaluate

    data, kinds, llm_dir = sample_runs
    config = blip2_config.get_config(
        f"variant={variant},size=tiny,data_dir={data},llm_run={llm_dir},kinds_file={kinds},"
        f"visual_dim={SAMPLE_VIT['hidden_size']},frames=2,instruct={instruct}"
    )
    assert config.model.qformer.instruction == instruct
    _shrink(config)
    config.model.qformer.update(hidden_size=16, intermediate_size=32, num_query_tokens=2)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result.step == 2
    losses = [m["train/loss"] for _, m in sorted(train.read_metrics(str(tmp_path)).items())]
    assert len(losses) == 2 and np.isfinite(losses).all()
    # The frozen LLM is the llm run's, sharded over fsdp, unchanged by training.
    mesh = sharding.make_mesh(config.mesh)
    text_llm = evaluate.ModelLoader(evaluate.load_config(llm_dir), llm_dir, mesh).load(2)
    before = {k: v for k, v in _params(text_llm).items()}
    after = {k.removeprefix("llm/"): v for k, v in _params(result.model).items()
             if k.startswith("llm/")}  # fmt: skip
    assert set(after) == set(before)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    spec = result.model.llm.layers[0].mlp.up.kernel.get_value().sharding.spec
    assert "fsdp" in jax.tree.leaves(tuple(spec)), spec
    assert result.model.instructed == instruct

    if variant != "temporal":
        return  # img and video are evaluated on the sample by tests/test_table3.py (CPU time)
    (scores,) = evaluate.evaluate(config, str(tmp_path), model=result.model, model_step=2)
    source = ip.open_split(ip.dataset_dir(data), "test")
    s = scores.scores
    assert s["split"] == "test" and s["num_examples"] == len(source)
    assert set(s["per_kind"]) == {"vision", "audio", "knowledge", "text"}
    assert sum(k["num_examples"] for k in s["per_kind"].values()) == len(source)
    assert 1 <= s["per_kind"]["vision"]["mean_rank"] <= 4  # 1 reference among 4 candidates
    assert s["metadata"]["variant"] == variant


def test_caption_stage_aligns_the_qformer_the_dialogue_stage_starts_from(sample_runs, tmp_path):
    """stage=caption trains on (video, caption) records through the loop and evaluates captions;
    a dialogue run with qformer_run starts from exactly its Q-Former, and refuses it over
    another frozen LLM."""
    import json
    import os

    from tiktalk_jax import checkpoint, evaluate, sample

    data, kinds, llm_dir = sample_runs
    captions = os.path.join(os.path.dirname(kinds), sample.CAPTIONS_FILE)
    shape = dict(hidden_size=16, intermediate_size=32, num_query_tokens=2)
    common = f"size=tiny,data_dir={data},llm_run={llm_dir},visual_dim={SAMPLE_VIT['hidden_size']}"
    cap = blip2_config.get_config(f"stage=caption,variant=img,captions={captions},{common}")
    _shrink(cap)
    cap.model.qformer.update(shape)
    cap.eval.num_negatives = 0
    cap.input.eval_splits = ("val",)
    sources = registry.get("blip2").data_inputs(cap)["sources"]
    train_videos = {r["video_id"] for r in sources["train"]}
    by_video = json.load(open(captions, encoding="utf-8"))
    assert len(sources["train"]) == sum(len(by_video[v]) for v in train_videos)
    assert all(r["title"] == "" and r["responses"][0] in by_video[r["video_id"]]
               for r in sources["train"])  # fmt: skip
    cap_dir = str(tmp_path / "caption")
    result = train.train_and_evaluate(cap, cap_dir)
    assert result.step == 2
    (scores,) = evaluate.evaluate(cap, cap_dir, split="val", model=result.model, model_step=2)
    assert scores.scores["num_examples"] == len(sources["val"]) > 0
    gens = [json.loads(line) for line in open(scores.generations_path, encoding="utf-8")]
    assert all(g["references"] == by_video[g["dialogue_id"]] for g in gens)

    # The dialogue stage with the train captions mixed in: dialogues + every caption record x 2.
    mixed = blip2_config.get_config(f"variant=img,captions={captions},caption_mix=2,{common}")
    mixed_sources = registry.get("blip2").data_inputs(mixed)["sources"]
    dialogues = ip.open_split(ip.dataset_dir(data), "train")
    assert set(mixed_sources) == {"train"}
    assert len(mixed_sources["train"]) == len(dialogues) + 2 * len(sources["train"])
    assert mixed_sources["train"][len(dialogues)] == sources["train"][0]

    dialogue = blip2_config.get_config(f"variant=temporal,frames=2,qformer_run={cap_dir},{common}")
    _shrink(dialogue)
    dialogue.model.qformer.update(shape)
    mesh = sharding.make_mesh(dialogue.mesh)
    with jax.set_mesh(mesh):
        model = blip2.build(dialogue, nnx.Rngs(1))
        built = _params(model)
        blip2.initialize(model, dialogue)  # what train.init_state does after build
    assert not all(np.array_equal(built[k], v) for k, v in _params(result.model).items()
                   if k.startswith("qformer/"))  # fmt: skip
    start, aligned = _params(model), _params(result.model)
    qformer_keys = [k for k in aligned if k.startswith("qformer/")]
    assert qformer_keys and all(np.array_equal(start[k], aligned[k]) for k in qformer_keys)
    assert not np.any(start["frame_positions"])  # not in the img caption run: its init

    instructed = blip2_config.get_config(
        f"variant=img,qformer_run={cap_dir},instruct=true,{common}"
    )
    instructed.model.qformer.update(shape)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="without an instruction input"):
        blip2.initialize(blip2.build(instructed, nnx.Rngs(1)), instructed)

    dialogue.model.llm_run = None  # a random-init LLM of the same shape
    with jax.set_mesh(mesh), pytest.raises(checkpoint.FrozenWeightsChanged, match="qformer_run"):
        blip2.initialize(blip2.build(dialogue, nnx.Rngs(1)), dialogue)
