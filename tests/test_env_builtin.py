"""Built-in environments (guess, calculator, code): protocol, feedback, reward parts, data and scripted policies."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from alignrl.envs import BUILTIN_ENVS, Environment, Episode, arithmetic, code, guess, load_environment
from alignrl.envs.guess import play_episode
from alignrl.envs.tools import render_conversation, tools_system_prompt

needs_sandbox = pytest.mark.skipif(os.name != "posix", reason="the code sandbox needs a POSIX system")
ALLOWED = {chr(i) for i in range(32, 127)} | {"\n"}  # the char tokenizer's vocabulary


@dataclass
class Spec:
    """One built-in environment under test: its module, policies and the scripted policy's expected success."""

    module: ModuleType
    env: type[Environment]
    scripted: Callable[[dict[str, Any], random.Random], Callable[..., str]]
    perfect: Callable[[dict[str, Any]], Callable[..., str]]
    rows: int  # rows the scripted success rate is measured on
    success: tuple[float, float]  # its expected range there
    max_chars: int = 400  # of an SFT conversation rendered in the char template
    system: bool = False  # SFT conversations start with the tool description's system message


SPECS = {
    "guess": Spec(guess, guess.GuessEnv, lambda row, rng: guess.scripted_policy(rng),
                  lambda row: guess.bisect_policy, 500, (0.66, 0.82)),
    "calculator": Spec(arithmetic, arithmetic.CalculatorEnv, arithmetic.scripted_policy, arithmetic.perfect_policy,
                       500, (0.40, 0.54), max_chars=640, system=True),
    # one sandbox run (~50 ms) per new attempt: fewer rows, a wider range
    "code": Spec(code, code.CodeFeedbackEnv, code.scripted_policy, code.perfect_policy, 200, (0.52, 0.74)),
}  # fmt: skip
PARAMS = [pytest.param(name, marks=[needs_sandbox] if name == "code" else []) for name in SPECS]


def _episode(env: Environment, row: dict[str, Any]) -> Episode:
    """A fresh episode of `env` on `row` (reset called)."""
    first = env.reset(row)
    return Episode(row=row, messages=list(first if first is not None else row["prompt"]))


def _turn(env: Environment, episode: Episode, text: str) -> Any:
    """One assistant turn as the runner plays it."""
    episode.messages.append({"role": "assistant", "content": text})
    episode.turn += 1
    return env.step(episode, text)


def _play_all(spec: Spec, rows: list[dict[str, Any]], make_policy: Callable[..., Any]) -> list[dict[str, float]]:
    """Reward totals of `make_policy(row)` played on every row (two at a time: the sandbox waits on processes)."""

    def one(row: dict[str, Any]) -> dict[str, float]:
        return play_episode(spec.env(), row, make_policy(row), spec.env.max_turns)[1]

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, rows))


@pytest.mark.parametrize("name", list(SPECS))
def test_builtin_names_load_and_max_turns(name: str) -> None:
    spec = SPECS[name]
    assert load_environment(name)[0] == name
    assert BUILTIN_ENVS[name].endswith(":" + spec.env.__name__)
    assert spec.env.max_turns == (5 if name == "guess" else 3)


@pytest.mark.parametrize("name", list(SPECS))
def test_rows_deterministic_json_and_ascii(name: str) -> None:
    spec = SPECS[name]
    rows = spec.module.make_rows(50, 0)
    assert rows == spec.module.make_rows(50, 0) and rows != spec.module.make_rows(50, 1)
    assert json.loads(json.dumps(rows)) == rows
    for row in rows:
        messages = spec.env().reset(row)
        assert messages and messages == row["prompt"]
        assert all(set(m["content"]) <= ALLOWED and len(m["content"]) < 80 for m in messages)


@pytest.mark.parametrize("name", ["calculator", "code"])
def test_held_out_rows_are_mostly_new(name: str) -> None:
    module = SPECS[name].module
    train = {json.dumps(r["prompt"]) for r in module.make_rows(1000, 0)}
    test = [json.dumps(r["prompt"]) for r in module.make_rows(200, 1)]
    assert sum(p in train for p in test) < 0.5 * len(test)


def test_guess_rows_cover_every_secret() -> None:
    assert {r["secret"] for r in guess.make_rows(500, 1)} == set(range(1, 16))


@pytest.mark.parametrize("name", PARAMS)
def test_perfect_policy_always_succeeds(name: str) -> None:
    spec = SPECS[name]
    rows = spec.module.make_rows(30 if name == "code" else 300, 2)
    if name == "guess":
        rows += [{"secret": s} for s in range(1, 16)]
    for totals in _play_all(spec, rows, spec.perfect):
        assert totals["success"] == 1.0


@pytest.mark.parametrize("name", PARAMS)
def test_scripted_policy_success_rate(name: str) -> None:
    spec = SPECS[name]
    rng = random.Random(0)
    rows = spec.module.make_rows(spec.rows, 3)
    policies = {id(row): spec.scripted(row, rng) for row in rows}  # drawn in order: deterministic
    rate = sum(t["success"] for t in _play_all(spec, rows, lambda row: policies[id(row)])) / len(rows)
    assert spec.success[0] <= rate <= spec.success[1], rate


@pytest.mark.parametrize("name", PARAMS)
def test_sft_rows_render_with_the_char_template(name: str) -> None:
    from alignrl.models import build_char_tokenizer

    tok = build_char_tokenizer()
    module = SPECS[name].module
    rows = module.sft_rows(20, 4)
    assert rows == module.sft_rows(20, 4)
    assert json.loads(json.dumps(rows)) == rows
    for row in rows:
        messages = row["messages"]
        if SPECS[name].system:
            assert messages[0]["role"] == "system"
            messages = messages[1:]
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        assert {m["role"] for m in messages} <= {"user", "assistant", "tool"}
        assert all(set(m["content"]) <= ALLOWED for m in row["messages"])
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        ids = tok.apply_chat_template(row["messages"], tokenize=True)
        assert tok.unk_token_id not in ids
        assert len(text) < SPECS[name].max_chars


# ---------------------------------------------------------------- guess


def test_guess_feedback_and_rewards() -> None:
    env = guess.GuessEnv()
    episode = _episode(env, {"secret": 9})
    assert episode.messages == [{"role": "user", "content": "Guess my number (1-15)."}]
    assert _turn(env, episode, "3").messages == [{"role": "user", "content": "higher"}]
    assert _turn(env, episode, " 12\n").messages == [{"role": "user", "content": "lower"}]
    for text in ("", "abc", "nine", "9" * 5000):  # invalid: a short error, the turn counts
        step = _turn(env, episode, text)
        assert step.messages == [{"role": "user", "content": "say a number"}] and not step.done
    assert _turn(env, episode, "99").messages[0]["content"] == "lower"  # out of range: still feedback
    step = _turn(env, episode, "I say 9")
    assert step.done and step.rewards == {"success": 1.0, "fewer_turns": pytest.approx(0.0)}  # turn 8 > 5
    assert env.finish(episode) == {}


@pytest.mark.parametrize(("turn", "bonus"), [(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2), (5, 0.1)])
def test_guess_fewer_turns_bonus(turn: int, bonus: float) -> None:
    env = guess.GuessEnv()
    episode = _episode(env, {"secret": 15})
    for _ in range(turn - 1):
        assert not _turn(env, episode, "1").done
    step = _turn(env, episode, "15")
    assert step.rewards["success"] == 1.0 and step.rewards["fewer_turns"] == pytest.approx(bonus)
    assert 0 <= sum(step.rewards.values()) <= 1.5


def test_guess_loss_reports_success_zero_once() -> None:
    messages, totals = play_episode(guess.GuessEnv(), {"secret": 4}, lambda m: "10", guess.GuessEnv.max_turns)
    assert totals == {"success": 0.0, "fewer_turns": 0.0}
    assert [m["role"] for m in messages] == ["user", *["assistant", "user"] * 4, "assistant"]  # ends on a turn


# ---------------------------------------------------------------- calculator

ROW = {"prompt": [{"role": "user", "content": "Ann has 37 pens and gets 48 more. How many now?"}],
       "expression": "37+48", "answer": 85}  # fmt: skip


def test_calculator_tool_call_then_answer() -> None:
    env = arithmetic.CalculatorEnv()
    episode = _episode(env, ROW)
    step = _turn(env, episode, arithmetic.tool_call("37+48"))
    assert step.messages == [{"role": "tool", "name": "calculator", "content": "85"}] and not step.done
    assert step.tool_calls == 1 and step.tool_errors == 0
    episode.messages += step.messages
    step = _turn(env, episode, " 85 \n")
    assert step.done and step.rewards == {"success": 1.0}
    assert env.finish(episode) == {}


@pytest.mark.parametrize(("answer", "success"), [("84", 0.0), ("37+48=85", 1.0), ("", 0.0), ("eighty", 0.0)])
def test_calculator_final_answer(answer: str, success: float) -> None:
    env = arithmetic.CalculatorEnv()
    step = _turn(env, _episode(env, ROW), answer)
    assert step.done and step.rewards == {"success": success}


def test_calculator_bad_calls_do_not_crash() -> None:
    env = arithmetic.CalculatorEnv()
    episode = _episode(env, ROW)
    for text in ("<tool_call>{bad", arithmetic.tool_call("37+"), '<tool_call>{"name": "nope"}</tool_call>'):
        step = _turn(env, episode, text)
        assert not step.done and step.tool_errors == 1 and "error" in step.messages[0]["content"]
    assert env.finish(episode) == {"success": 0.0}  # the turns ran out before an answer


@pytest.mark.parametrize(("expression", "mental"), [("37+48", 75), ("52-17", 45), ("23*4", 82), ("123+456", 579),
                                                    ("100-99", 111), ("55+945", 990), ("12*3", 36)])  # fmt: skip
def test_calculator_mental_arithmetic_drops_carries(expression: str, mental: int) -> None:
    assert arithmetic.mental_arithmetic(expression) == mental


def test_calculator_mistake_alone_fails_mostly() -> None:
    # Answering at once by carry-free column arithmetic: right only without carries or borrows (19%).
    rows = arithmetic.make_rows(500, 3)
    results = [play_episode(arithmetic.CalculatorEnv(), r, arithmetic.mental_policy(r), 3) for r in rows]
    assert all(len(messages) == 2 for messages, _ in results)  # one turn, no tool call
    rate = sum(totals["success"] for _, totals in results) / len(rows)
    assert 0.14 <= rate <= 0.25, rate


def test_calculator_sft_moves_greedy_mode_is_the_mistake() -> None:
    # Both strategies diverge at the first turn; the mistake is the more frequent move there.
    rows = arithmetic.make_rows(500, 5)
    tool = 0
    for sft, row in zip(arithmetic.sft_rows(500, 5), rows):
        turns = [m["content"] for m in sft["messages"] if m["role"] == "assistant"]
        if turns[0] == arithmetic.tool_call(row["expression"]):
            tool += 1
            assert turns[1:] == [f"Answer: {row['answer']}"]
        else:
            assert turns == [f"Answer: {arithmetic.mental_arithmetic(row['expression'])}"]
    assert 0.29 <= tool / len(rows) <= 0.42, tool


def test_calculator_sft_prompts_are_the_rl_prompts() -> None:
    # SFT conversations start with the tool description the runner prepends for the char template, so the model
    # is trained on exactly the token sequences it then sees and samples in RL.
    from alignrl.data import encode, tokenize_sft
    from alignrl.episodes import appended_ids
    from alignrl.models import build_char_tokenizer

    tok = build_char_tokenizer()
    for sft, row in zip(arithmetic.sft_rows(20, 4), arithmetic.make_rows(20, 4)):
        env = arithmetic.CalculatorEnv()
        messages = sft["messages"]
        assert messages[0] == {"role": "system", "content": tools_system_prompt(env.tools)}
        k = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = render_conversation(tok, env.reset(row), env.tools)
        assert tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) == prompt
        rl = encode(tok, prompt)  # then the turns as the runner appends them
        i = k
        while i < len(messages):
            if messages[i]["role"] == "assistant":
                rl += encode(tok, messages[i]["content"]) + [tok.eos_token_id]
                i += 1
            else:
                j = next((j for j in range(i, len(messages)) if messages[j]["role"] == "assistant"), len(messages))
                rl += appended_ids(tok, messages[i:j])
                i = j
        ids = tokenize_sft(sft, tok, "sft").input_ids
        assert ids[: len(rl)] == rl and len(ids) - len(rl) <= 1  # the template's "\n" after the last turn


# ---------------------------------------------------------------- code

TASK = {"prompt": [{"role": "user", "content": "Write f(x) that returns x plus 23."}],
        "tests": ["assert f(3) == 26", "assert f(0) == 23", "assert f(7) == 30"], "op": "+", "k": 23}  # fmt: skip


@needs_sandbox
def test_code_feedback_names_the_first_failing_test() -> None:
    env = code.CodeFeedbackEnv()
    episode = _episode(env, TASK)
    replies = {
        "def f(x): return x+24": "failed: assert f(3) == 26",
        "def f(x): return 26 if x == 3 else x": "failed: assert f(0) == 23",  # the first that fails
        "def f(x) return x": "failed: syntax error",
        "hello": "failed: assert f(3) == 26",  # runs, defines no f
        "  \n": "failed: no code",
        "def f(x): return x+24 ": "failed: assert f(3) == 26",  # a repeat: the earlier reply
    }
    for text, reply in replies.items():
        step = _turn(env, episode, text)
        assert step.messages == [{"role": "user", "content": reply}] and not step.done and not step.rewards
    step = _turn(env, episode, "```python\ndef f(x):\n    return x + 23\n```")
    assert step.done and step.rewards == {"success": 1.0}
    assert env.finish(episode) == {}


@needs_sandbox
def test_code_loss_reports_success_zero_once() -> None:
    policy = lambda messages: "def f(x): return x"  # noqa: E731
    messages, totals = play_episode(code.CodeFeedbackEnv(), TASK, policy, code.CodeFeedbackEnv.max_turns)
    assert totals == {"success": 0.0}
    assert messages[2] == {"role": "user", "content": "failed: assert f(3) == 26"}


def test_code_wrong_solution_is_off_by_one() -> None:
    assert code.wrong_solution(TASK) == "def f(x): return x+24"
    assert code.wrong_solution({"op": "*", "k": 999}) == "def f(x): return x*1000"


@needs_sandbox
def test_code_mistake_repeats_and_fixes_on_cue() -> None:
    wrong, right = code.wrong_solution(TASK), code.solution("+", 23)
    messages, totals = play_episode(code.CodeFeedbackEnv(), TASK, code.mistake_policy(TASK), 3)
    assert totals == {"success": 0.0}
    assert [m["content"] for m in messages if m["role"] == "assistant"] == [wrong] * 3
    messages, totals = play_episode(code.CodeFeedbackEnv(), TASK, code.mistake_policy(TASK, [False, True]), 3)
    assert totals == {"success": 1.0}
    assert [m["content"] for m in messages if m["role"] == "assistant"] == [wrong, wrong, right]


@needs_sandbox
def test_code_mistake_alone_always_fails() -> None:
    spec = SPECS["code"]
    rows = code.make_rows(100, 3)
    assert all(t["success"] == 0.0 for t in _play_all(spec, rows, code.mistake_policy))


@needs_sandbox
def test_code_sft_moves_greedy_mode_is_the_mistake() -> None:
    # At the first attempt and at each retry, the mistake (the wrong constant, repeated) is the more frequent move.
    rows = code.make_rows(150, 5)
    first_right, retries, fixes = 0, 0, 0
    for sft, row in zip(code.sft_rows(150, 5), rows):
        right, wrong = code.solution(row["op"], row["k"]), code.wrong_solution(row)
        turns = [m["content"] for m in sft["messages"] if m["role"] == "assistant"]
        assert set(turns) <= {right, wrong} and right not in turns[:-1]  # the episode ends when it is right
        first_right += turns[0] == right
        retries += len(turns) - 1
        fixes += turns[-1] == right and len(turns) > 1
    assert 0.25 <= first_right / len(rows) <= 0.46, first_right
    assert 0.14 <= fixes / retries <= 0.37, (fixes, retries)
