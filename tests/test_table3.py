"""benchmarks/table3.py: every row of the paper's Table 3 trains and evaluates on the bundled
sample, the table has the paper's rows and columns, and each row's config documents its command.

The script runs once for the module (`table` fixture) as `python benchmarks/table3.py`, in a
process of its own: compiling (XLA on CPU) is nearly all its time, and only a fresh process can
take the XLA flags that halve it (one device, the lowest backend optimisation level; sharding is
tested per family elsewhere). Tiny configs made 1-layer, 2 steps each, greedy decoding of 4
tokens, 15 retrieval negatives, no METEOR (tested in test_metrics.py).
"""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import table3
from tiktalk_jax.models import registry

STEPS = 2
FAST = (
    "decode.max_new_tokens=4",
    "decode.num_beams=1",
    "eval.num_negatives=15",
    "model.n_layer=1",  # dialogpt
    "model.num_layers=1",  # livebot
    "model.bert.num_hidden_layers=1",  # maria
    "model.qformer.num_hidden_layers=1",  # blip2
)
# configs/<name>.py -> (its model family, get_config arguments of every size it offers).
CONFIGS = {
    "dialogpt": ("gpt2", ("size=tiny", "size=base")),
    "livebot": ("livebot", ("size=tiny", "size=base")),
    "llm_text": ("llm", ("size=tiny", "size=qwen2.5-7b,lora=false")),
    "blip2": (
        "blip2",
        (
            "variant=img,size=tiny",
            "variant=video,size=qwen2.5-7b",
            "stage=caption,captions=/c.json,size=tiny",
            "captions=/c.json,caption_mix=2,qformer_run=/run,size=qwen2.5-7b",
        ),
    ),
    "maria": ("maria", tuple(f"variant={v},size=tiny" for v in ("t", "ta", "tk", "tvak"))),
}


def argv(root, *extra, overrides=FAST):
    return (
        [f"--workdir={root}", f"--steps={STEPS}", "--skip_meteor", f"--out={root}/t3.md"]
        + [f"--override={o}" for o in overrides]
        + list(extra)
    )


def xla_flags():
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return " ".join([*kept, "--xla_backend_optimization_level=0"])


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """(workdir, the script's stdout, its Result read back from the files it wrote)."""
    root = tmp_path_factory.mktemp("table3")
    proc = subprocess.run(
        [sys.executable, table3.__file__, *argv(root)],
        env=dict(os.environ, XLA_FLAGS=xla_flags()),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    scores = {
        r.key: json.loads((root / "runs" / r.key / f"scores_test_step{STEPS}.json").read_text())
        for r in table3.ROWS
    }
    out = root / "t3.md"
    return root, proc.stdout, table3.Result(out.read_text("utf-8"), scores, str(out))


def table_lines(text):
    """The Markdown table's rows (header first, separator dropped) as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_every_row_trains_and_evaluates_into_one_table(table):
    root, stdout, result = table
    header, *rows = table_lines(result.text)
    assert table_lines(stdout) == [header, *rows]  # printed as written
    assert header == ["Type", "Methods", *(title for title, _ in table3.COLUMNS)]
    # The paper's rows, in its order, each group named on its first row only.
    assert [r[1] for r in rows] == [row.name for row in table3.ROWS]
    groups = [r[0] for r in rows]
    assert [g for g in groups if g] == list(dict.fromkeys(row.group for row in table3.ROWS))
    assert groups[0] == "T baselines" and groups[2] == "V+T baselines" and groups[3] == ""
    for row, cells in zip(table3.ROWS, rows):
        for (title, _), cell in zip(table3.COLUMNS, cells[2:]):
            if title == "METEOR":
                assert cell == "-"  # skipped, and said so
                continue
            value = float(cell.strip("*"))
            assert math.isfinite(value) and value >= 0, (row.name, title, cell)
        scores = result.scores[row.key]
        assert 1 <= scores["retrieval"]["mean_rank"] <= 20  # 5 references + 15 negatives
    # Each row is its own run of its own family: final step, the sample's whole test split.
    counts = {key: s["num_examples"] for key, s in result.scores.items()}
    full = counts["maria"]
    assert {n for key, n in counts.items() if key != "livebot"} == {full}
    # Livebot leaves out dialogues of videos without frame features (configs/livebot.py).
    assert 0 < counts["livebot"] <= full
    assert f"{full} test dialogues" in result.text and "2 steps each" in result.text
    for row in table3.ROWS:
        meta = result.scores[row.key]["metadata"]
        assert meta["checkpoint_step"] == STEPS and meta["skip_meteor"] is True
        assert meta["model"] == CONFIGS[row.config][0]
        assert meta["decoding"]["max_new_tokens"] == 4
        assert (root / "runs" / row.key / f"scores_test_step{STEPS}.json").is_file()
        if row.config == "maria":
            assert "variant=" + meta["variant"] == row.arg


def test_blip2_rows_freeze_the_chatglm_runs_llm(table):
    root, _, _ = table
    for key in ("blip2_img", "blip2_video"):
        config = json.loads((root / "runs" / key / "config.json").read_text("utf-8"))
        assert config["model"]["llm_run"] == str(root / "runs" / "chatglm")
        assert config["frozen"] == "^llm/"


def test_a_rerun_reads_finished_rows_back_and_refuses_another_config(table):
    root, _, result = table
    maria = [o for o in FAST if not o.startswith(("model.n_", "model.num_", "model.q"))]
    again = table3.main(argv(root, "--rows=text,maria", overrides=maria))  # paper's order
    assert [r[1] for r in table_lines(again.text)[1:]] == ["Maria", "text"]
    for group in ("nlg_scores", "retrieval"):
        assert again.scores["maria"][group] == result.scores["maria"][group]
    assert "read back" in again.text
    with pytest.raises(ValueError, match="another config"):
        table3.main(argv(root, "--rows=text", "--override=optim.lr=0.5", overrides=maria))


def test_format_table_marks_the_best_of_each_column():
    rows = [table3.ROWS[0], table3.ROWS[5]]

    def scores(bleu2, rank):
        nlg = {k: 1.0 for _, k in table3.COLUMNS[:7]}
        nlg.update(bleu2=bleu2, meteor=None)
        retrieval = {k: 1.0 for _, k in table3.COLUMNS[7:]}
        return {"nlg_scores": nlg, "retrieval": {**retrieval, "mean_rank": rank}}

    text = table3.format_table(rows, {"dialogpt": scores(2.0, 9.0), "maria": scores(3.0, 4.0)})
    _, first, second = table_lines(text)
    titles = [t for t, _ in table3.COLUMNS]
    col = {t: 2 + i for i, t in enumerate(titles)}
    assert first[col["BLEU-2"]] == "2.00" and second[col["BLEU-2"]] == "**3.00**"
    assert first[col["MeanRank"]] == "9.00" and second[col["MeanRank"]] == "**4.00**"
    assert first[col["METEOR"]] == second[col["METEOR"]] == "-"
    assert first[col["ROUGE-L"]] == "1.00"  # a tie of every row is not marked


def test_set_and_override_reach_the_rows_they_name():
    data = table3.Data("/d", {"frames": ("/f", 64), "audio": ("/a", 8), "vit_g": ("/v", 32)})
    rows = {r.key: r for r in table3.ROWS}
    kw = dict(size="tiny", llm_size="tiny", llm_run="/runs/chatglm")
    sets = ["tokenizer=/bert"]
    maria = table3.config_arg(rows["maria_c3kg"], data, **kw, extra=sets)
    assert maria.startswith("variant=tvk,data_dir=/d,size=tiny,frames_dir=/f,frame_dim=64")
    assert maria.endswith(",tokenizer=/bert")
    assert table3._selected("@maria", rows["text"]) and not table3._selected(
        "@maria", rows["livebot"]
    )
    assert table3._selected("@llm", rows["chatglm"]) and table3._selected("@llm", rows["blip2_img"])
    config = table3.load_config(
        rows["blip2_video"], table3.config_arg(rows["blip2_video"], data, **kw), 7,
        ["decode.num_beams=2", "model.qformer.num_hidden_layers=1", "model.n_layer=1"],
    )  # fmt: skip
    assert config.model.llm_run == "/runs/chatglm" and config.input.visual_dim == 32
    assert config.total_steps == 7 and config.decode.num_beams == 2
    assert config.model.qformer.num_hidden_layers == 1 and "n_layer" not in config.model
    with pytest.raises(ValueError, match="selects no row"):
        table3._parse_sets(["nope:size=tiny"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_config_parses_and_documents_its_command(name):
    module = importlib.import_module(f"configs.{name}")
    family, args = CONFIGS[name]
    assert f"python -m tiktalk_jax.main --config=configs/{name}.py:" in module.__doc__
    for arg in args:
        config = module.get_config(f"{arg},data_dir=/data")
        assert config.model.name == family and registry.get(family).name == family
        assert config.input.data_dir == "/data" and config.eval.split == "test"
        assert config.total_steps > 0 and config.optim.lr > 0
    with pytest.raises(ValueError, match="unknown config argument"):
        module.get_config("sise=tiny")


def test_the_table_script_documents_its_commands():
    assert "python benchmarks/table3.py --workdir=" in table3.__doc__
    assert "--data_dir=DATA --size=base" in table3.__doc__
    for row in table3.ROWS:
        assert row.key in table3.__doc__ and row.name in table3.__doc__
