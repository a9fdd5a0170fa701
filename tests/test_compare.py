"""compare: tables, best marking, comparability warnings, CSV/markdown/PNG, the CLI mode."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiktalk_jax import compare

REPO = Path(__file__).resolve().parents[1]
NLG = ("bleu2", "bleu4", "meteor", "rouge_l", "cider", "dist2", "dist3")
# The fields evaluate.py's metadata block has (values shortened).
METADATA = {
    "tokenize": "char",
    "segmenter": "char: every non-whitespace character is a token",
    "segmenter_version": None,
    "pycocoevalcap_version": "1.2",
    "meteor": "pycocoevalcap meteor-1.5.jar - - -stdio -l en -norm, JVM locale en_US UTF-8",
    "java_version": "17.0.2",
    "aggregation": "per-reference average over K",
    "skip_meteor": False,
    "model": "maria",
    "init_from": None,
    "decoding": {"method": "beam", "beam_size": 5, "max_len": 20},
    "retrieval": {"num_positives": 5, "num_negatives": 95, "seed": 0},
    "tokenizer": "WordPiece vocab trained on the train split",
    "vocab_size": 500,
    "text_lengths": {"max_response_len": 24, "max_context_len": 64},
    "kinds_file": "/data/raw/sample_kinds.json",
    "data_dir": "/data",
    "created": "2026-11-25T09:00:00",
}
TVAK_TABLES = {
    "vision": {"encoder": "resnet101", "frames": 10, "random_init": False},
    "audio": {"encoder": "vggish", "random_init": False},
    "knowledge": {"kg_sha256": "abc", "dir": "/data/knowledge"},
}


def write_scores(
    workdir, split, step, base, *, metadata=None, meteor=True, variant="t", side_tables=None
):
    """A scores file shaped as evaluate.py writes it; every metric is `base` plus an offset."""
    os.makedirs(workdir, exist_ok=True)
    nlg = {key: base + i for i, key in enumerate(NLG)}
    if not meteor:
        nlg["meteor"] = None
    retrieval = {"recall@1": base, "recall@5": 2 * base, "recall@10": 3 * base}
    record = {
        "split": split,
        "step": step,
        "num_examples": 12,
        "nlg_scores": nlg,
        "retrieval": {**retrieval, "mean_rank": 50.0 - base},
        "per_kind": {
            "vision": {"num_examples": 3, "bleu4": base / 2, "recall@1": base / 4},
            "audio": {"num_examples": 1, "bleu4": float("nan")},
        },
        "metadata": {
            **(METADATA if metadata is None else metadata),
            "split": split,
            "checkpoint_step": step,
            "variant": variant,
            "side_tables": side_tables or {},
            "workdir": os.path.abspath(workdir),
        },
    }
    path = os.path.join(workdir, f"scores_{split}_step{step}.json")
    with open(path, "w") as f:
        json.dump(record, f)
    return path


@pytest.fixture
def two_runs(tmp_path):
    t, tvak = str(tmp_path / "t"), str(tmp_path / "tvak")
    for step, base in ((10, 1.0), (20, 3.0), (30, 2.5)):
        write_scores(t, "test", step, base)
    for step, base in ((10, 2.0), (20, 4.0)):
        write_scores(tvak, "test", step, base, variant="tvak")
    return t, tvak


def table_rows(text, title_prefix):
    """{(run, step): [cells]} of the text table whose title starts with `title_prefix`."""
    block = text.split(title_prefix, 1)[1].split("\n\n", 1)[0].splitlines()
    header = block[1].split()
    rows = {(cells[0], int(cells[1])): cells[2:] for cells in map(str.split, block[2:])}
    return header, rows


def test_collect_reads_every_scores_file_and_flattens_metrics(two_runs):
    t, tvak = two_runs
    entries, skipped = compare.collect([t, tvak, t + "/"])  # the same run twice counts once
    assert skipped == []
    assert [(e.run, e.split, e.step) for e in entries] == [
        ("t", "test", 10),
        ("t", "test", 20),
        ("t", "test", 30),
        ("tvak", "test", 10),
        ("tvak", "test", 20),
    ]
    scores = entries[1].scores
    assert scores["bleu4"] == 4.0 and scores["recall@10"] == 9.0 and scores["mean_rank"] == 47.0
    assert scores["per_kind/vision/bleu4"] == 1.5
    # Counts are not metrics; a NaN score (empty kind) is shown as missing.
    assert "per_kind/vision/num_examples" not in scores
    assert scores["per_kind/audio/bleu4"] is None
    assert entries[0].metadata["decoding.beam_size"] == 5


def test_table_marks_the_best_value_of_each_column(two_runs, tmp_path):
    result = compare.compare(list(two_runs), out=str(tmp_path / "out"))
    header, rows = table_rows(result.text, "[test] scores")
    assert header == ["run", "step", *NLG, "recall@1", "recall@5", "recall@10", "mean_rank"]
    assert set(rows) == {("t", 10), ("t", 20), ("t", 30), ("tvak", 10), ("tvak", 20)}
    assert rows[("t", 20)][:2] == ["3.00", "4.00"]
    # tvak@20 has the highest of every score and the lowest mean_rank: every column marked there.
    assert all(cell.endswith("*") for cell in rows[("tvak", 20)])
    assert rows[("tvak", 20)][-1] == "46.00*"
    others = [cell for key, cells in rows.items() if key != ("tvak", 20) for cell in cells]
    assert not any(cell.endswith("*") for cell in others)
    # The per-kind scores get their own table.
    _, kind_rows = table_rows(result.text, "[test] per_kind/vision")
    assert kind_rows[("tvak", 20)] == ["2.00*", "1.00*"] and kind_rows[("t", 30)] == [
        "1.25",
        "0.62",
    ]
    assert result.warnings == []


def test_lower_is_better_and_missing_values_never_win(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_scores(a, "val", 5, 9.0, meteor=False)  # best everywhere, but METEOR skipped
    write_scores(b, "val", 5, 1.0)
    result = compare.compare([a, b], out=str(tmp_path))
    header, rows = table_rows(result.text, "[val] scores")
    meteor = header.index("meteor") - 2
    assert rows[("a", 5)][meteor] == "-"
    assert rows[("b", 5)][meteor] == "3.00"  # the only value: compared with nothing
    assert rows[("a", 5)][header.index("mean_rank") - 2] == "41.00*"  # 50 - 9: lowest rank
    assert rows[("b", 5)][header.index("mean_rank") - 2] == "49.00"
    assert compare.lower_is_better("mean_rank") and compare.lower_is_better("val/loss")
    assert not compare.lower_is_better("recall@1")


def test_best_is_chosen_among_the_printed_numbers():
    def entry(step, x, y):
        return compare.Entry("r", "r", "test", step, {"x": x, "y": y}, {}, "")

    entries = [entry(1, 1.001, 0.0), entry(2, 1.004, 1e-9), entry(3, 0.5, 0.0)]
    assert compare.best_values(entries, ["x", "y"]) == {"x": 1.0}
    text = compare.format_table(entries, ["x", "y"])
    assert text.splitlines() == [
        "run  step     x      y",
        "r       1  1.00*  0.00",
        "r       2  1.00*  0.00",
        "r       3  0.50   0.00",
    ]


def test_warns_when_metadata_differs_and_names_the_fields(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    other = {
        **METADATA,
        "segmenter": "jieba: default dictionary, HMM=True",
        "decoding": {**METADATA["decoding"], "beam_size": 1},
    }
    write_scores(a, "test", 10, 1.0)
    write_scores(a, "test", 20, 2.0)
    write_scores(b, "test", 10, 1.5, metadata=other)
    write_scores(b, "test", 20, 2.5)  # b changed its decoding between checkpoints
    result = compare.compare([a, b], out=str(tmp_path))
    assert len(result.warnings) == 2, result.warnings
    beam, segmenter = result.warnings  # in field-name order
    assert segmenter.startswith("[test] not comparable: segmenter differs")
    assert "jieba" in segmenter and "(b@10)" in segmenter and "(a, b@20)" in segmenter
    assert beam == "[test] not comparable: decoding.beam_size differs: 5 (a, b@20); 1 (b@10)"
    # Aggregation, features and the per-checkpoint fields (step, variant) are not reported.
    assert not any("aggregation" in w or "checkpoint_step" in w for w in result.warnings)
    assert "WARNING: [test] not comparable: segmenter differs" in result.text
    with open(result.files["markdown"]) as f:
        assert "decoding.beam_size differs" in f.read()


def test_side_tables_are_compared_only_where_joined(tmp_path):
    t, tvak, vit = (str(tmp_path / name) for name in ("t", "tvak", "tvak_vit"))
    # As configs/maria.py sets them: a segment the variant does not use has length 0.
    t_lengths = {**METADATA["text_lengths"], "max_frames": 0, "max_knowledge_len": 0}
    tvak_lengths = {**METADATA["text_lengths"], "max_frames": 4, "max_knowledge_len": 16}
    write_scores(t, "test", 1, 1.0, metadata={**METADATA, "text_lengths": t_lengths})
    tvak_metadata = {**METADATA, "text_lengths": tvak_lengths}
    write_scores(
        tvak, "test", 1, 2.0, metadata=tvak_metadata, variant="tvak", side_tables=TVAK_TABLES
    )
    # The T-vs-TVAK ablation: which side tables a run joins is what is compared, not a warning.
    result = compare.compare([t, tvak], out=str(tmp_path / "out"))
    assert result.warnings == []
    assert f"  t: {t} (1 scores files; model maria, variant t; side tables: none)" in result.text
    assert "variant tvak; side tables: audio, knowledge, vision)" in result.text
    # Two runs joining the vision table with different encoders are not comparable.
    vision = {**TVAK_TABLES["vision"], "encoder": "vit_g", "random_init": True}
    vit_tables = {**TVAK_TABLES, "vision": vision}
    vit_tables["knowledge"] = {**TVAK_TABLES["knowledge"], "dir": "/elsewhere"}  # a path: ignored
    vit_metadata = {**METADATA, "text_lengths": {**tvak_lengths, "max_frames": 8}}
    write_scores(vit, "test", 1, 3.0, metadata=vit_metadata, variant="tvak", side_tables=vit_tables)
    assert compare.compare([t, tvak, vit], out=str(tmp_path / "out")).warnings == [
        '[test] not comparable: side_tables.vision.encoder differs: "resnet101" (tvak); '
        '"vit_g" (tvak_vit)',
        "[test] not comparable: side_tables.vision.random_init differs: false (tvak); "
        "true (tvak_vit)",
        "[test] not comparable: text_lengths.max_frames differs: 4 (tvak); 8 (tvak_vit)",
    ]


def test_a_missing_field_and_a_different_test_set_are_reported(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_scores(a, "test", 1, 1.0)
    other = {k: v for k, v in METADATA.items() if k != "java_version"}
    path = write_scores(b, "test", 1, 1.0, metadata={**other, "model": "gpt2", "vocab_size": 9})
    record = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps({**record, "num_examples": 11}))
    warnings = compare.compare([a, b], out=str(tmp_path)).warnings
    # The model's own fields (model, vocab) differ by design and are not reported.
    assert warnings == [
        '[test] not comparable: java_version differs: "17.0.2" (a); <absent> (b)',
        "[test] not comparable: num_examples differs: 12 (a); 11 (b)",
    ]


def test_splits_are_tabulated_apart_and_a_missing_split_is_reported(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_scores(a, "val", 10, 1.0)
    write_scores(a, "test", 10, 2.0)
    write_scores(b, "test", 10, 3.0)
    result = compare.compare([a, b], out=str(tmp_path / "out"))
    assert result.warnings == [
        "split differs between runs (a: test, val; b: test); each split is tabulated on its "
        "own, so the runs missing one are absent from its table"
    ]
    _, val_rows = table_rows(result.text, "[val] scores")
    _, test_rows = table_rows(result.text, "[test] scores")
    assert set(val_rows) == {("a", 10)} and set(test_rows) == {("a", 10), ("b", 10)}
    # Alone in its table, a's val row is compared with nothing: no marks.
    assert not any(cell.endswith("*") for cell in val_rows[("a", 10)])
    assert set(result.files) == {"markdown", "csv", "plot:test", "plot:val"}


def test_unreadable_files_are_skipped_with_a_message(two_runs, tmp_path):
    t, tvak = two_runs
    Path(tvak, "scores_test_step30.json").write_text('{"nlg_scores": {"bleu')  # being written
    Path(tvak, "scores_test_step40.json").write_text("[1, 2]")
    Path(tvak, "scores_test_step50.json").write_text('{"metadata": {"segmenter": "char"}}')
    Path(tvak, "scores_test.json").write_text("{}")  # not a per-checkpoint name: ignored
    result = compare.compare([t, tvak, str(tmp_path / "missing")], out=str(tmp_path / "out"))
    assert [(e.run, e.step) for e in result.entries if e.run == "tvak"] == [
        ("tvak", 10),
        ("tvak", 20),
    ]
    assert len(result.skipped) == 4
    assert "scores_test_step30.json: not valid JSON" in result.skipped[0]
    assert "scores_test_step40.json: expected a JSON object, got list" in result.skipped[1]
    assert "scores_test_step50.json: no metric in it" in result.skipped[2]
    assert result.skipped[3] == f"{tmp_path / 'missing'}: not a directory"
    assert "skipped " in result.text


def test_no_scores_at_all_is_an_error_that_says_what_to_do(tmp_path):
    with pytest.raises(compare.NoScoresError, match="--mode=eval"):
        compare.compare([str(tmp_path)])


def test_csv_markdown_and_png_are_written(two_runs, tmp_path):
    out = tmp_path / "out"
    result = compare.compare(list(two_runs), out=str(out))
    assert result.files == {
        "markdown": str(out / "compare.md"),
        "csv": str(out / "compare.csv"),
        "plot:test": str(out / "compare_test.png"),
    }
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["step"]) for r in rows] == [
        ("t", "10"),
        ("t", "20"),
        ("t", "30"),
        ("tvak", "10"),
        ("tvak", "20"),
    ]
    assert float(rows[4]["cider"]) == 8.0 and rows[0]["per_kind/audio/bleu4"] == ""
    assert float(rows[2]["per_kind/vision/bleu4"]) == 1.25
    markdown = (out / "compare.md").read_text()
    assert "| tvak | 20 | **4.00** | **5.00** |" in markdown
    assert "| t | 30 | 2.50 | 3.50 |" in markdown

    png = out / "compare_test.png"
    assert png.stat().st_size > 10_000
    with Image.open(png) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800
    # Both runs' lines are drawn: the first two default colours (C0 blue, C1 orange) appear.
    for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(pixels.astype(int) - color).sum(-1) < 30).sum() > 50


def test_panel_layout_wraps_top_level_metrics_and_gives_each_group_a_row():
    assert compare.panel_layout(["a", "b", "c", "d", "e"]) == (
        2,
        4,
        [(0, 0, "a"), (0, 1, "b"), (0, 2, "c"), (0, 3, "d"), (1, 0, "e")],
    )
    columns = ["bleu4", "mean_rank", "per_kind/audio/mean_rank", "per_kind/vision/bleu4"]
    assert compare.panel_layout(columns) == (
        3,
        2,
        [(0, 0, "bleu4"), (0, 1, "mean_rank"), (1, 1, columns[2]), (2, 0, columns[3])],
    )


def test_out_defaults_to_the_first_workdir(two_runs):
    result = compare.compare(list(two_runs))
    assert os.path.dirname(result.files["csv"]) == two_runs[0]
    assert os.path.exists(os.path.join(two_runs[0], "compare_test.png"))


def test_labels_are_names_then_variants_then_paths(tmp_path):
    for parent, variant in (("x", "t"), ("y", "tvak"), ("z", "tvak")):
        os.makedirs(tmp_path / parent / "run")
        (tmp_path / parent / "run" / "config.json").write_text(
            json.dumps({"model": {"name": "maria", "variant": variant}})
        )
    x, y, z = (str(tmp_path / p / "run") for p in "xyz")
    assert compare.config_variant(x) == "t"
    labels = compare.run_labels([x, y, z], {w: compare.config_variant(w) for w in (x, y, z)})
    assert labels == {x: "run[t]", y: "y/run", z: "z/run"}
    assert compare.run_labels([x, str(tmp_path / "other")]) == {
        x: "run",
        str(tmp_path / "other"): "other",
    }


def _main(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "tiktalk_jax.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_cli_compare_mode(two_runs, tmp_path):
    t, tvak = two_runs
    out = tmp_path / "cli_out"
    proc = _main(
        "--mode=compare", f"--workdir={t}", f"--workdir={tvak}", f"--out={out}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, rows = table_rows(proc.stdout, "[test] scores")
    assert rows[("tvak", 20)][0] == "4.00*"
    assert sorted(os.listdir(out)) == ["compare.csv", "compare.md", "compare_test.png"]

    proc = _main("--mode=compare", f"--workdir={tmp_path / 'empty'}", cwd=tmp_path)
    assert proc.returncode == 1 and "no readable scores_<split>_step<N>.json" in proc.stderr
    # Other modes take one workdir and say so before doing anything.
    proc = _main("--mode=demo", "--workdir=a", "--workdir=b", cwd=tmp_path)
    assert proc.returncode != 0 and "--mode=demo takes one --workdir, got 2" in proc.stderr
    assert not (tmp_path / "a").exists()


def test_reads_the_scores_that_evaluate_computes(tmp_path):
    """The contract with evaluate.py: its scores dict, written at its path, is read in full."""
    import ml_collections

    from tiktalk_jax import evaluate, metrics

    refs = [
        ["红色的圆", "红色", "圆", "红圆", "是红色"],
        ["哔哔声", "哔哔", "声音", "响声", "哔"],
    ] * 2
    records = [
        {"dialogue_id": f"v/{i}", "responses": r, "context": ["问"]} for i, r in enumerate(refs)
    ]
    kinds = {"v/0": "vision", "v/1": "audio", "v/2": "vision", "v/3": "audio"}
    settings = ml_collections.ConfigDict(dict(tokenize="char", skip_meteor=True))
    candidates = np.random.default_rng(0).normal(size=(4, 20))
    workdirs = {"good": ["红色的圆", "哔哔声", "红色", "哔哔"], "bad": ["好", "好", "好", "好"]}
    for name, hyps in workdirs.items():
        scores = evaluate.compute_scores(records, hyps, candidates, kinds, settings)
        scores.update(split="test", step=100)
        scores["metadata"] = {**metrics.scores_metadata("char", skip_meteor=True), "variant": name}
        os.makedirs(tmp_path / name)
        with open(evaluate.scores_path(str(tmp_path / name), "test", 100), "w") as f:
            json.dump(scores, f, ensure_ascii=False)

    result = compare.compare([str(tmp_path / "good"), str(tmp_path / "bad")], out=str(tmp_path))
    assert result.warnings == [] and result.skipped == []
    header, rows = table_rows(result.text, "[test] scores")
    assert header[2:] == [*NLG, "recall@1", "recall@5", "recall@10", "mean_rank"]
    good, bad = rows[("good", 100)], rows[("bad", 100)]
    assert good[header.index("meteor") - 2] == "-"  # skipped METEOR is recorded as null
    assert good[header.index("bleu2") - 2].endswith("*") and not bad[0].endswith("*")
    kind_header, kind_rows = table_rows(result.text, "[test] per_kind/vision")
    assert kind_header[2:] == header[2:]  # every metric per kind, the example count left out
    assert set(kind_rows) == {("good", 100), ("bad", 100)}
