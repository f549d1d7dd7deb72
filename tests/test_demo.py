"""`alignrl demo --quick` for every tiny-model demo stage: the whole path (SFT, pairs, the stage, evaluation,
report) runs end to end, sharing one SFT model."""

from __future__ import annotations

from alignrl.cli import main


def test_quick_demos_run_end_to_end(tmp_path, capsys) -> None:
    for algo in ("dpo", "rm", "ppo"):
        assert main(["demo", "--quick", "--algo", algo, "--out", str(tmp_path)]) == 0, capsys.readouterr().err
        assert (tmp_path / f"report-{algo}.html").is_file()
    out = capsys.readouterr().out
    assert "preference pairs (train)" in out and "KL(PPO" in out
