"""One tiny step through the benchmark harness (bench.compare); the TRL half runs only if trl is installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives at the repo root, outside src/
HAS_TRL = importlib.util.find_spec("trl") is not None


def test_bench_harness_one_tiny_step(tmp_path):
    from bench.compare import main

    libs = "alignrl,trl" if HAS_TRL else "alignrl"
    res = main(
        ["--out", str(tmp_path), "--sizes", "tiny", "--lengths", "4", "--precisions", "fp32", "--algos", "grpo",
         "--reps", "1", "--steps", "1", "--warmup", "0", "--prompts", "1", "--G", "2", "--libs", libs]
    )  # fmt: skip
    (row,) = res["rows"]
    assert row["alignrl"]["step_s"] > 0 and row["alignrl"]["peak_rss_mib"] > 0
    assert (tmp_path / "results.md").read_text().count("| tiny | grpo |") == 1
    if HAS_TRL:
        assert row["trl"]["step_s"] > 0 and "ratio_step" in row
        assert res["equivalence"]["grpo"]["abs_diff"] <= 1e-4
    assert row["alignrl_micro_batch"] == 0  # the trainer's default: micro-batches by micro_batch_tokens


def test_per_size_settings(capsys):
    import pytest

    from bench.compare import main, per_size, size_setting

    assert per_size(size_setting("2"), "30m", 4) == 2
    assert per_size(size_setting("4m=4,30m=2"), "30m", 4) == 2
    assert per_size(size_setting("4m=4,30m=2"), "tiny", 8) == 8
    for bad in ("30m=x", "4m"):
        with pytest.raises(SystemExit):
            main(["--micro-batch", bad])
        assert "SIZE=N" in capsys.readouterr().err
