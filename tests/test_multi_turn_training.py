"""Multi-turn training end to end: GRPO learns through an environment, PPO runs on multi-turn episodes (GAE over
the model's tokens), `alignrl eval --environment` and `alignrl demo --env` run, and bad options are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignrl.cli import main
from alignrl.data import write_jsonl
from alignrl.envs import guess

TALK = """
from alignrl.envs import Environment, Step

class Talk(Environment):
    max_turns = 3

    def reset(self, row):
        return [{"role": "user", "content": f"hi {row['secret']}"}]

    def step(self, episode, message):
        fives = {"fives": float(message.count("5"))}
        if episode.turn == 3:
            return Step(done=True, rewards=fives)
        return Step([{"role": "user", "content": "go on"}], rewards=fives)
"""


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _setup(tmp_path: Path) -> list[str]:
    (tmp_path / "talk.py").write_text(TALK)
    write_jsonl(tmp_path / "rows.jsonl", guess.make_rows(40, 0))
    return [f"train_file={tmp_path / 'rows.jsonl'}", f"environment={tmp_path / 'talk.py'}:Talk", "progress_bar=false",
            "max_completion_length=4", "max_prompt_length=16", "max_episode_tokens=64", "logging_steps=1"]  # fmt: skip


def test_grpo_learns_through_an_environment(turn_taker, tmp_path):
    """The environment rewards the digit 5 on every turn: the share of fives rises over 24 steps."""
    out = tmp_path / "grpo"
    assert main(["train", "grpo", f"model={turn_taker}", *_setup(tmp_path), f"output_dir={out}",
                 "prompts_per_step=4", "num_generations=6", "learning_rate=3e-3", "max_steps=24"]) == 0  # fmt: skip
    rows = _metrics(out)
    first = sum(r["env/fives"] for r in rows[:5]) / 5
    last = sum(r["env/fives"] for r in rows[-5:]) / 5
    assert rows[0]["episode/turns"] > 2  # several turns per episode
    assert last > first + 0.5, (first, last)
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in sample["completion"]][:3] == ["assistant", "user", "assistant"]  # whole episodes


def test_ppo_runs_on_multi_turn_episodes(turn_taker, tmp_path):
    out = tmp_path / "ppo"
    assert main(["train", "ppo", f"model={turn_taker}", *_setup(tmp_path), f"output_dir={out}",
                 "prompts_per_step=4", "num_generations=2", "max_steps=2", "num_ppo_epochs=2"]) == 0  # fmt: skip
    last = _metrics(out)[-1]
    assert last["episode/turns"] > 1 and last["loss"] == last["loss"]  # several turns, a finite loss


def test_eval_with_an_environment(turn_taker, tmp_path, capsys):
    write_jsonl(tmp_path / "test.jsonl", guess.make_rows(12, 1))
    assert main(["eval", "--model", turn_taker, "--data", str(tmp_path / "test.jsonl"), "--environment", "guess",
                 "--max-new-tokens", "4", "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["reward_funcs"] == ["guess"] and result["prompts"] == 12
    assert set(result["episodes"]) >= {"env/success", "episode/turns", "episode/hit_max_turns"}
    assert result["accuracy"] == pytest.approx(result["episodes"]["env/success"])  # success: a reward ≥ 1
    assert "env/success (mean per episode)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("environment=nope", "environment: 'nope' is not a built-in (calculator, guess, code)"),
        ("environment={tmp}/talk.py:Missing", "environment: {tmp}/talk.py has no class 'Missing'"),
        ("tools=[nope]", "tools: 'nope' is not a built-in (python, calculator)"),
        ("tool_timeout=0", "tool_timeout: must be > 0 seconds"),
        ("max_turns=-1", "max_turns: must be ≥ 0"),
        ("max_episode_tokens=-1", "max_episode_tokens: must be ≥ 0"),
    ],
)
def test_bad_multi_turn_options_are_one_line(option, message, tiny_model, tmp_path, capsys):
    args = _setup(tmp_path)
    assert main(["train", "grpo", f"model={tiny_model}", *args, f"output_dir={tmp_path / 'o'}", "max_steps=1",
                 option.format(tmp=tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"alignrl: error: {message.format(tmp=tmp_path)}") and "\n" not in err, err


def test_env_demo_quick(tmp_path, capsys):
    """`alignrl demo --env guess --quick` runs end to end: data, SFT, GRPO through the environment, the table."""
    assert main(["demo", "--env", "guess", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out success" in out and "a held-out episode, SFT" in out
    assert (tmp_path / "env-guess" / "report.html").is_file()


def test_env_demo_names_the_environments_with_a_demo(tmp_path, capsys):
    assert main(["demo", "--env", "code", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "alignrl: error: --env: 'code' has no demo (choose from guess)"
