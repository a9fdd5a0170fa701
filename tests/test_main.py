"""The demo entry point runs end to end on the bundled sample (a few training steps here)."""

import json
import os

from tiktalk_jax import main


def test_demo_runs_the_sample_end_to_end(tmp_path, capsys):
    results = main.run_demo(str(tmp_path), seed=0, steps=2, skip_meteor=True)
    out = capsys.readouterr().out
    # Statistics per split and the bad-input report of both configs.
    assert "tiktalk/dialogues: built" in out and "tiktalk/media: built" in out
    assert "[train] videos=" in out and "dialogues=" in out
    for reason in ("video_missing", "unsafe_video_id", "reply_cycle", "too_few_references"):
        assert reason in out
    # Records read back through the pipeline reader: 5 references per test context.
    assert out.count("response:") == 15
    assert (tmp_path / "data" / "tiktalk" / "media" / "1.0.0" / "build_report.json").exists()
    # Random-init features are announced as such; knowledge tables and the vocab exist.
    assert out.count("RANDOM-INIT (seed 0") == 2
    assert (tmp_path / "data" / "tiktalk" / "dialogues" / "1.0.0" / "knowledge").is_dir()

    # Both variants trained, evaluated on test, and compared; files where the demo says.
    assert sorted(results) == ["t", "tvak"]
    for variant in ("tvak", "t"):
        run = tmp_path / "runs" / variant
        scores = json.loads((run / "scores_test_step2.json").read_text("utf-8"))
        assert scores["metadata"]["variant"] == variant and scores["num_examples"] == 55
        assert set(scores["per_kind"]) == {"vision", "audio", "knowledge", "text"}
        assert (run / "generations_test_step2.jsonl").exists()
        assert os.listdir(run / "tensorboard")
        assert f"Maria {variant.upper()} (tiny): 2 steps" in out
    assert (tmp_path / "compare.md").exists() and (tmp_path / "compare_test.png").exists()
    for kind in ("vision", "audio", "knowledge", "text"):
        assert f"[{kind}] context:" in out and f"{kind:<10}cider" in out
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in out
