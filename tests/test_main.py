"""The demo entry point runs end to end on the bundled sample."""

from tiktalk_jax import main


def test_demo_builds_sample_and_prints_statistics_and_report(tmp_path, capsys):
    main.run_demo(str(tmp_path), seed=0)
    out = capsys.readouterr().out
    # Statistics per split and the bad-input report of both configs.
    assert "tiktalk/dialogues: built" in out and "tiktalk/media: built" in out
    assert "[train] videos=" in out and "dialogues=" in out
    for reason in ("video_missing", "unsafe_video_id", "reply_cycle", "too_few_references"):
        assert reason in out
    # Records read back through the pipeline reader: 5 references per test context.
    assert out.count("response:") == 15
    assert (tmp_path / "data" / "tiktalk" / "media" / "1.0.0" / "build_report.json").exists()
