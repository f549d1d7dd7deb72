from __future__ import annotations

from alignrl.cli import main


def test_overrides_before_and_after_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 1\n")
    for argv in (["train", "grpo", "--config", str(cfg), "model=/nonexistent"],
                 ["train", "grpo", "model=/nonexistent", "--config", str(cfg)]):
        assert main(argv) == 2
        assert "alignrl: error: model: /nonexistent does not exist" in capsys.readouterr().err


def test_stray_flag_is_rejected(capsys):
    try:
        main(["train", "grpo", "--bogus"])
    except SystemExit as e:
        assert e.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
