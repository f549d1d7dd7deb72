"""Tiny runs through the benchmark harnesses (bench.compare, bench.grid); TRL halves only if trl is installed."""

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


def test_bench_grid_smoke(tmp_path):
    """`python -m bench.grid --smoke`: every algorithm once on the tiny model, both libraries, in seconds."""
    from bench.grid import ALGOS, main

    results = tmp_path / "grid.json"
    res = main(["--smoke", "--out", str(tmp_path / "out"), "--results", str(results),
                "--libs", "alignrl,trl" if HAS_TRL else "alignrl"])  # fmt: skip
    assert [c["algo"] for c in res["cells"]] == list(ALGOS)
    assert res["copy_bandwidth"] > 0 and res["matmul_flops"]["fp32"] > 0
    assert res["machine"]["cpus"] and res["command"].endswith("--libs " + ("alignrl,trl" if HAS_TRL else "alignrl"))
    for cell in res["cells"]:
        assert cell["alignrl"]["step_s"] > 0 and cell["alignrl"]["steps"] == 1, cell
        if HAS_TRL and cell["algo"] != "ppo":
            assert cell["trl"]["step_s"] > 0 and "ratio_step" in cell and "ratio_peak_rss" in cell
    online = {c["algo"]: c for c in res["cells"] if c["eos"] == "forced"}
    assert online["grpo"]["alignrl"]["completion_length"] == 4 and "roofline_tok_s" in online["grpo"]["decode"]
    if HAS_TRL:
        assert "no PPO trainer" in online["ppo"]["note"]
        assert online["grpo"]["trl"]["completion_length"] == 4
    md = results.with_suffix(".md").read_text()
    assert md.count("| tiny |") == len(ALGOS) and "Command:" in md


def test_decode_matmul_times_every_projection_of_a_token_step():
    """`python -m bench.decode_matmul`: the fused decoder's products of one token step (its FLOPs are 2·rows·every
    linear weight, asserted inside), streamed and hot."""
    from bench.decode_matmul import main

    out = main(["--model", "tiny", "--rows", "4", "--reps", "2"])
    assert out["gflop_per_step"] > 0 and out["streamed_ms"] > 0 and out["hot_ms"] > 0


def test_decode_step_times_a_forced_length_rollout():
    """`python -m bench.decode_step`: every row runs to the asked length, in fp32 and under bf16 autocast."""
    from bench.decode_step import main

    for precision in ("fp32", "bf16"):
        out = main(["--model", "tiny", "--rows", "4", "--tokens", "6", "--reps", "2", "--precision", precision])
        assert out["ms_per_token_step"] > 0 and len(out["rollout_s"]) == 2


def test_grid_only_filter():
    import argparse

    import pytest

    from bench.grid import grid_cells, only_filter, parse_args

    assert only_filter("algo=grpo,size=4m,algo=dpo") == {"algo": {"grpo", "dpo"}, "model": {"4m"}}
    for bad in ("algo", "colour=red", "algo="):
        with pytest.raises(argparse.ArgumentTypeError):
            only_filter(bad)
    cells = grid_cells(parse_args(["--only", "algo=grpo,size=4m,len=128", "--natural"]))
    assert [(c["model"], c["algo"], c["length"], c["precision"], c["eos"]) for c in cells] == [
        ("4m", "grpo", 128, p, e) for p in ("fp32", "bf16") for e in ("forced", "natural")
    ]
    assert {c["eos"] for c in grid_cells(parse_args(["--only", "algo=sft"]))} == {"-"}
    assert len(grid_cells(parse_args([]))) == 5 * 5 * 4 * 2


def test_natural_cells_of_a_pretrained_model_ask_in_its_chat_format(tmp_path):
    """Natural lengths on a trained task: SmolLM2-Instruct's natural GRPO/PPO cells get the arithmetic questions as
    conversations (it answers and ends its turn); forced cells and the random bench models keep plain prompts."""
    import json

    from bench.grid import Grid, grid_cells, parse_args

    a = parse_args(["--natural", "--only", "algo=grpo,length=128,precision=fp32"])
    grid = Grid(a, tmp_path, ["alignrl"], {"shapes": {}})
    data = {(c["model"], c["eos"]): grid.data(c) for c in grid_cells(a)}
    assert data[("smollm2", "natural")] == data[("smollm2-lora", "natural")] == grid.chat_prompts
    assert {data[k] for k in data if k[0].endswith("m") or k[1] == "forced"} == {grid.prompts}
    row = json.loads(grid.chat_prompts.read_text().splitlines()[0])
    assert row["prompt"][0]["role"] == "user" and "+" in row["prompt"][0]["content"]
