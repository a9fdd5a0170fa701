"""Model cards from the files an evaluation writes: config, data, steps, scores, samples."""

import json

from tiktalk_jax import evaluate, model_card


def _scores(split="test", step=40):
    nlg = dict(
        bleu2=12.345, bleu4=3.0, meteor=None, rouge_l=20.0, cider=50.0, dist2=30.0, dist3=40.0
    )
    retrieval = {"recall@1": 10.0, "recall@5": 30.0, "recall@10": 50.0, "mean_rank": 12.5}
    per_kind = {
        kind: dict(num_examples=2, **nlg, **retrieval) for kind in ("vision", "audio")
    }  # fmt: skip
    metadata = dict(
        tokenize="char", meteor="skipped (skip_meteor=True)", vocab_size=475,
        tokenizer="WordPiece vocab trained on the train split",
        decoding=dict(num_beams=5, max_new_tokens=20), retrieval=dict(num_negatives=95),
        text_lengths=dict(max_response_len=24), workdir="/runs/x",
        side_tables=dict(
            frames=dict(encoder="resnet18", weights="random-init seed=0", random_init=True,
                        normalization="per-dimension standardization"),
            audio=dict(encoder="vggish", weights="/ckpt/vggish.pth", random_init=False),
            knowledge=dict(kg="/raw/knowledge.tsv", encoder="lexical-v2-d219-x"),
        ),
    )  # fmt: skip
    return dict(split=split, step=step, num_examples=4, nlg_scores=nlg, retrieval=retrieval,
                per_kind=per_kind, metadata=metadata)  # fmt: skip


CONFIG = dict(
    seed=0, total_steps=100,
    model=dict(name="maria", variant="tvak", init_from=None, dtype="float32",
               param_dtype="float32", bert=dict(hidden_size=32, num_hidden_layers=1,
                                                 vocab_size=None)),
    input=dict(dataset="tiktalk/dialogues", data_dir="/data", train_split="train",
               batch_size=16),
    optim=dict(lr=0.01, warmup_steps=5, weight_decay=0.05),
    decode=dict(num_beams=5),
)  # fmt: skip


def _write_run(workdir, split="test", step=40):
    (workdir / "config.json").write_text(json.dumps(CONFIG))
    evaluate._write_json(evaluate.scores_path(str(workdir), split, step), _scores(split, step))
    lines = [
        dict(dialogue_id=f"v/{i}", context=[f"问{i}", "再问"],
             references=[f"答{i}", "r2", "r3", "r4"], hypothesis="" if i == 1 else f"生成{i}",
             best_reference_rank=i + 1,
             kind=["vision", "vision", "audio", "text"][i])
        for i in range(4)
    ]  # fmt: skip
    with open(evaluate.generations_path(str(workdir), split, step), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in lines)
    with open(workdir / "metrics.jsonl", "w") as f:
        for s, loss in ((10, 3.0), (30, 2.5), (40, None), (50, 1.0)):
            row = {"step": s} if loss is None else {"step": s, "train/loss": loss}
            f.write(json.dumps(row) + "\n")


def test_card_has_config_data_steps_scores_and_samples(tmp_path):
    _write_run(tmp_path)
    path = model_card.write_model_card(str(tmp_path), "test", 40)
    assert path == str(tmp_path / "model_card_test_step40.md")
    card = open(path, encoding="utf-8").read()
    assert card.startswith("# Model card: maria tvak, step 40, test split\n")
    assert "- shape: hidden_size 32, num_hidden_layers 1\n" in card  # None fields left out
    assert "- initialised from: random initialisation" in card
    assert "evaluated on `test` (4 dialogues)" in card and "(475 tokens)" in card
    assert "frames: encoder `resnet18`, weights random-init seed=0 (**RANDOM-INIT" in card
    assert "- audio: encoder `vggish`, weights /ckpt/vggish.pth\n" in card
    assert "knowledge: KG `/raw/knowledge.tsv`, retrieval encoder `lexical-v2-d219-x`" in card
    assert "checkpoint step 40 of 100 configured steps, batch size 16, seed 0" in card
    assert "lr 0.01, warmup_steps 5, weight_decay 0.05" in card
    assert "train loss 2.5000 (logged at step 30)" in card  # the last loss at or before 40
    header = "| examples | n | bleu2 | bleu4 | meteor | rouge_l | cider | dist2 | dist3 |"
    assert header in card
    assert "| all | 4 | 12.35 | 3.00 | - | 20.00 | 50.00 | 30.00 | 40.00 | 10.00 |" in card
    assert "| audio | 2 |" in card and "| vision | 2 |" in card
    assert "METEOR: skipped (skip_meteor=True)" in card
    # Samples: one of each kind first, then the rest; an empty hypothesis is shown as such.
    order = [card.index(f"**v/{i}**") for i in (0, 2, 3, 1)]
    assert order == sorted(order)
    assert "  - model: <empty>" in card and "  - references: 答0 / r2 / r3\n" in card
    assert "--workdir=/runs/x --checkpoint_step=40" in card


def test_config_can_be_passed_and_optional_files_may_be_missing(tmp_path):
    _write_run(tmp_path, split="val", step=7)
    (tmp_path / "config.json").unlink()
    (tmp_path / "metrics.jsonl").unlink()
    import ml_collections

    config = ml_collections.ConfigDict(CONFIG, type_safe=False)
    path = model_card.write_model_card(str(tmp_path), "val", 7, config=config)
    card = open(path, encoding="utf-8").read()
    assert "step 7, val split" in card and "train loss" not in card
    assert "| all | 4 |" in card
