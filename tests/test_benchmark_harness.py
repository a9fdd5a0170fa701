"""The M10 benchmark harness on CPU at tiny sizes: well-formed results, no timing assertions.

Also checks that the PyTorch reference (benchmarks/torch_maria.py) is the same model as
tiktalk_jax's Maria: with the reference's weights loaded into the JAX model, both give the same
hidden states, and the reference's masking draws as many slots as `maria.mask_tokens`.
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import decode_step  # noqa: E402
import flops  # noqa: E402
import torch_maria  # noqa: E402
import train_step  # noqa: E402

from tiktalk_jax.models import maria  # noqa: E402

TINY = flops.MARIA_SIZES["tiny"]


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_reference_is_the_same_model(tmp_path):
    torch.manual_seed(0)
    ref = torch_maria.TorchMaria(TINY, dropout=0.0).eval()
    model = decode_step.jax_model(TINY, "float32")
    assert model.config.max_masked == torch_maria.max_masked(TINY)
    torch_maria.save_bert_checkpoint(ref, str(tmp_path))
    maria.load_bert_weights(model, str(tmp_path))
    for name, w in torch_maria.media_weights(ref).items():
        module = getattr(model, name)
        module.proj.kernel.set_value(jnp.asarray(w["kernel"]))
        module.proj.bias.set_value(jnp.asarray(w["bias"]))
        module.norm.scale.set_value(jnp.asarray(w["scale"]))
        module.norm.bias.set_value(jnp.asarray(w["ln_bias"]))
    batch = train_step.maria_batch(TINY, 3)
    ours = np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))  # jit: eager ops are slow
    with torch.no_grad():
        theirs = ref.hidden(torch_maria.to_torch(batch, "cpu")).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)
    assert ours.shape == (3, TINY.tokens, TINY.hidden)

    # Masking: the same per-segment counts as the JAX objective, gathered to the same slots.
    tb = torch_maria.to_torch(batch, "cpu")
    _, positions, labels, weights = torch_maria.mask_tokens(tb, TINY)
    mask = jax.jit(lambda k, b: maria.mask_tokens(k, b, model.config)[1])
    t = mask(jax.random.key(0), batch)
    np.testing.assert_array_equal(weights.sum(1).numpy(), np.asarray(t.weights).sum(1))
    text = np.concatenate([batch["response_ids"], batch["context_ids"], batch["knowledge_ids"]], 1)
    picked = np.take_along_axis(text, positions.numpy(), 1)
    np.testing.assert_array_equal(np.where(weights.numpy() > 0, picked, 0),
                                  np.where(weights.numpy() > 0, labels.numpy(), 0))  # fmt: skip


def test_flop_counts():
    s = flops.MariaShape(hidden=4, layers=1, heads=1, intermediate=8, vocab=10, response=2,
                         context=1, knowledge=1, frames=1, audio=1, frame_dim=3,
                         audio_dim=2)  # fmt: skip
    t = 6
    expected = 2 * t * (4 * 16 + 2 * 4 * 8) + 4 * t * t * 4 + 2 * 3 * 4 + 2 * 2 * 4
    expected += 2 * 5 * (16 + 40)
    assert flops.maria_forward_flops(s, masked=5) == expected
    assert flops.maria_train_flops(s, 5, batch=2) == 6 * expected
    assert flops.peak_tflops("gpu NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert flops.peak_tflops("cpu cpu", "float32") is None
    assert flops.peak_tflops("cpu cpu", "float32", override=2.0) == 2.0
    assert flops.mfu(1e12, 1.0, 2.0) == 0.5 and flops.mfu(1e12, 1.0, None) is None
    # A cached search does far less work than recomputing (what the decoding target measures).
    base = flops.MARIA_SIZES["base"]
    assert flops.maria_decode_flops(base, 1, 5, 20, cached=False) > 10 * flops.maria_decode_flops(
        base, 1, 5, 20, cached=True
    )


@pytest.mark.parametrize("instruction", [0, 48])
def test_qformer_flop_formula_matches_xla(instruction):
    """The Q-Former term of the BLIP-2 FLOP formula against XLA's own count of the compiled
    forward (which also counts norms, softmax and GELU: a few percent at these widths)."""
    from tiktalk_jax.models import qformer

    q, hq, iq, layers, n, dv, d = 8, 128, 512, 4, 64, 96, 80
    cfg = qformer.QFormerConfig(
        hidden_size=hq, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=iq,
        num_query_tokens=q, encoder_hidden_size=dv, use_qformer_text_input=bool(instruction),
        instruction_features=d if instruction else 0,
    )  # fmt: skip
    model = qformer.QFormer(cfg, projection_features=d, rngs=nnx.Rngs(0))
    model.eval()
    image = jnp.ones((1, n, dv))
    kw = dict(instruction=jnp.ones((1, instruction, d))) if instruction else {}
    graphdef, state = nnx.split(model)

    def forward(state, image):
        m = nnx.merge(graphdef, state)
        return m.project(m(image, **kw))

    xla = jax.jit(forward).lower(state, image).compile().cost_analysis()
    xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
    shape = flops.Blip2Shape(
        q_hidden=hq, q_layers=layers, q_intermediate=iq, queries=q, cross_every=2,
        visual_tokens=n, visual_frames=1, visual_dim=dv, llm_hidden=d, llm_layers=1,
        llm_intermediate=1, llm_heads=1, llm_kv_heads=1, llm_head_dim=1, llm_vocab=1, prompt=1,
        response=1, instruction=instruction,
    )  # fmt: skip
    formula = flops.blip2_flops(shape)["qformer"]
    assert formula <= xla <= 1.1 * formula, (formula, xla)


def test_train_step_maria_json_and_markdown(tmp_path):
    out = tmp_path / "maria.json"
    result = train_step.main(
        ["--model=maria", "--size=tiny", "--batch=2", "--steps=2", "--warmup=0",
         "--impls=jax,torch_eager", "--peak_tflops=1.0", f"--json_out={out}"]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["impl"] for r in result["results"]] == ["jax", "torch_eager"]
    assert result["tokens_per_example"] == TINY.tokens == 280
    for r in result["results"]:
        assert r["timed_steps"] == 2
        for key in ("examples_per_s", "tokens_per_s", "step_ms_median", "flops_per_step", "mfu"):
            assert _finite_positive(r[key]), (key, r[key])
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert r["tokens_per_s"] == pytest.approx(r["examples_per_s"] * 280)
        assert r["peak_memory_gb"] is None  # CPU: no device memory statistics
    jax_rec, torch_rec = result["results"]
    assert jax_rec["flops_per_step"] == torch_rec["flops_per_step"]  # same model, same count
    assert _finite_positive(jax_rec["compile_s"])
    assert _finite_positive(result["ratios"]["jax_over_torch_eager"])
    rows = result["markdown"].splitlines()
    assert len(rows) == 2 and all(r.startswith("| ") and r.count("|") == 15 for r in rows)
    assert len(result["load_before"]) == 3 and result["environment"]["torch"]


def test_train_step_blip2_tiny():
    result = train_step.main(["--model=blip2", "--size=tiny", "--batch=2", "--steps=2",
                              "--warmup=0"])  # fmt: skip
    (r,) = result["results"]
    assert r["impl"] == "jax" and r["mfu"] is None  # CPU without --peak_tflops: n/a
    assert _finite_positive(r["examples_per_s"]) and _finite_positive(r["flops_per_step"])
    shape = result["blip2_shape"]
    assert result["tokens_per_example"] == shape["queries"] + shape["prompt"] + shape["response"]
    assert shape["instruction"] == 0
    instructed = train_step.main(["--model=blip2", "--size=tiny", "--batch=2", "--steps=2",
                                  "--warmup=0", "--instruct"])  # fmt: skip
    assert instructed["blip2_shape"]["instruction"] == shape["prompt"]
    assert instructed["results"][0]["flops_per_step"] > r["flops_per_step"]


def test_decode_step_tiny():
    result = decode_step.main(["--size=tiny", "--batch=1", "--new_tokens=3", "--runs=1"])
    assert [r["decoder"] for r in result["results"]] == list(decode_step.DECODERS)
    assert result["all_decoded_new_tokens"] and result["prefix_tokens"] == 240
    for r in result["results"]:
        assert _finite_positive(r["tokens_per_s"]) and _finite_positive(r["ms_per_step"])
    assert set(result["speedups"]) == {
        "jax_cached_over_torch_recompute",
        "jax_cached_over_jax_recompute",
    }
    assert len(result["markdown"].splitlines()) == 3


def _measured(vision: dict, colour: str, text_cider: float = 50.0, another=None, blind=None):
    m = {"own": vision, "text_cider": text_cider, "colour": colour}
    if another is not None:
        m.update(another=another, colour_blind=blind)
    return m


def test_blip2_vision_seed_summary():
    """The multi-seed table of benchmarks/blip2_vision.py: a seed's value is its mean over the
    splits, a cell the mean ± std over seeds, and the win count compares each seed with the
    text LLM (lower is better for MeanRank only); colour counts are summed."""
    import blip2_vision

    def v(b, c, r, mr):
        return {"bleu2": b, "cider": c, "recall@1": r, "mean_rank": mr}

    llm = {"test": _measured(v(20, 100, 20, 4), "2/9", 250.0),
           "val": _measured(v(22, 100, 30, 4), "3/9", 240.0)}  # fmt: skip
    other = v(0, 0, 0, 9)
    seeds = {
        0: {"test": _measured(v(24, 110, 30, 2), "5/9", 100.0, other, "2/9"),
            "val": _measured(v(22, 90, 30, 3), "4/9", 120.0, other, "1/9")},
        1: {"test": _measured(v(18, 100, 10, 5), "1/9", 80.0, other, "3/9"),
            "val": _measured(v(20, 100, 20, 5), "2/9", 100.0, other, "2/9")},
    }  # fmt: skip
    text = blip2_vision.seed_summary(llm, {"video": seeds})
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in text.splitlines() if line.startswith("| ")}  # fmt: skip
    # The LLM: (20+22)/2, 100, (20+30)/2, 4. Seed 0: 23, 100, 30, 2.5; seed 1: 19, 100, 15, 5.
    assert rows[("LLM (text)", "-")].split("|")[4:8] == [" 21.0 ", " 100.0 ", " 25.0 ", " 4.0 "]
    own = [c.strip() for c in rows[("BLIP-2 video", "own")].strip("|").split("|")]
    assert own[2:] == ["2", "21.0 ± 2.0", "100.0 ± 0.0", "22.5 ± 7.5", "3.8 ± 1.2",
                       "1/2 / 0/2 / 1/2 / 1/2"]  # fmt: skip
    assert rows[("BLIP-2 video", "another video")].endswith("| 0/2 / 0/2 / 0/2 / 0/2 |")
    # Colour: LLM 2+3 of 18; BLIP-2 5+4+1+2 of 36, blind 2+1+3+2; text CIDEr means.
    assert "| LLM (text) | 5/18 | - | 245.0 |" in text
    assert "| BLIP-2 video (2 seeds) | 12/36 | 8/36 | 100.0 |" in text


def test_blip2_vision_caption_copies():
    """The reading LLM's counterfactual copies: one per dialogue of a known, good video; its
    title starts with a caption of a drawn colour and shape, and its context and replies name
    that colour and shape where the original named the video's, so only the title tells it."""
    import blip2_vision

    from tiktalk_jax import sample

    attrs = {
        "v1": {"colour": "red", "shape": "circle"},
        "v2": {"colour": "blue", "shape": "square"},
        "bad": {"colour": "green", "shape": "circle", "bad": True},
    }
    records = [
        dict(
            dialogue_id=f"d{i}",
            video_id=v,
            title="大家觉得怎么样",
            context=["这是什么", f"{sample.COLOURS[attrs[v]['colour']][0]}的吧"],
            responses=[
                f"一个{sample.COLOURS[attrs[v]['colour']][0]}的{sample.SHAPES[attrs[v]['shape']]}",
                "同问",
            ],
        )
        for i, v in enumerate(["v1", "v2", "bad", "v1"] * 10)
    ] + [dict(dialogue_id="u", video_id="unknown", title="t", context=["c"], responses=["r"])]
    before = json.dumps(records, ensure_ascii=False)
    copies = blip2_vision.caption_copies(records, attrs)
    assert json.dumps(records, ensure_ascii=False) == before  # the originals are untouched
    assert [c["dialogue_id"] for c in copies] == [
        r["dialogue_id"] + "#cap" for r in records if r["video_id"] in ("v1", "v2")
    ]
    colours = {w: c for c, (w, _) in sample.COLOURS.items()}
    shapes = {w: s for s, w in sample.SHAPES.items()}
    drawn = set()
    for copy in copies:
        caption, title = copy["title"].split("，")
        assert title == "大家觉得怎么样" and caption.startswith("一个") and "的" in caption
        colour, shape = caption[2:].split("的")
        assert colour in colours and shape in shapes
        drawn.add((colour, shape))
        assert copy["context"] == ["这是什么", f"{colour}的吧"]
        assert copy["responses"] == [f"一个{colour}的{shape}", "同问"]
        original = next(r for r in records if r["dialogue_id"] + "#cap" == copy["dialogue_id"])
        assert copy["video_id"] == original["video_id"]
    assert len(drawn) > 3  # drawn, not copied from the video
    # Seeded by the dialogue id: the same copies in another order.
    again = blip2_vision.caption_copies(records[::-1], attrs)
    assert sorted(again, key=lambda c: c["dialogue_id"]) == sorted(
        copies, key=lambda c: c["dialogue_id"]
    )


def test_blip2_vision_run_trains_on_the_split_plus_extra_records(monkeypatch, tmp_path):
    """`run(extra_train=)` trains on the train split then the extra records, `train_kinds`
    filters the split only, and a family with its own train source refuses both."""
    import types

    import blip2_vision

    from configs import blip2 as blip2_config
    from configs import llm_text
    from tiktalk_jax import input_pipeline
    from tiktalk_jax import main as entry

    split = [dict(dialogue_id=f"d{i}", title="t", context=["c"], responses=["r"]) for i in range(3)]
    kinds = tmp_path / "kinds.json"
    kinds.write_text(json.dumps({"d0": "vision", "d1": "text", "d2": "vision"}))
    monkeypatch.setattr(input_pipeline, "dataset_dir", lambda d: d)
    monkeypatch.setattr(input_pipeline, "open_split", lambda d, s: split if s == "train" else None)
    monkeypatch.setattr(input_pipeline, "make_datasets", lambda c, side_tables, sources: sources)
    result = lambda c, d, datasets: (types.SimpleNamespace(scores=datasets), 0, 0)  # noqa: E731
    monkeypatch.setattr(entry, "train_and_evaluate_variant", result)
    config = llm_text.get_config(f"size=small,lora=false,data_dir={tmp_path},kinds_file={kinds}")
    extra = [dict(dialogue_id="x", title="t", context=["c"], responses=["r"])]
    got = blip2_vision.run(config, str(tmp_path / "a"), extra_train=extra)
    assert [r["dialogue_id"] for r in got["train"]] == ["d0", "d1", "d2", "x"]
    got = blip2_vision.run(config, str(tmp_path / "b"), train_kinds="vision", extra_train=extra)
    assert [r["dialogue_id"] for r in got["train"]] == ["d0", "d2", "x"]
    captions = tmp_path / "captions.json"
    mixed = blip2_config.get_config(
        f"variant=video,size=tiny,data_dir={tmp_path},captions={captions},caption_mix=2"
    )
    from tiktalk_jax.models import registry

    family = registry.get(mixed.model.name)
    own_source = dict(side_tables=None, sources={"train": split})
    monkeypatch.setattr(type(family), "data_inputs", lambda self, c: own_source)
    with pytest.raises(ValueError, match="builds its own train source"):
        blip2_vision.run(mixed, str(tmp_path / "c"), extra_train=extra)
