"""Code with feedback: write a one-line function, see the first failing test, try again.

Protocol:

    user: Write f(x) that returns x plus 23.
    assistant: def f(x): return x+24
    user: failed: assert f(3) == 26
    assistant: def f(x): return x+23     <- all tests pass: the episode ends

The code is the assistant's message (or its last fenced block: `alignrl.rewards.code.extract_code`), run against the
row's `tests` (3 asserts such as "assert f(3) == 26") in the code sandbox of `alignrl.rewards.code`: one sandbox run
per new attempt, about 50 ms on Linux (an attempt repeated within the episode gets its earlier reply). When a test
fails the reply names the first one, "failed: assert f(3) == 26"; code that does not compile gets "failed: syntax
error", an empty message "failed: no code", a run past the time limit "failed: timed out". Rows: `prompt` (the
user message), `tests`, and the task as `op` ("+", "-", "*") and `k`.
The sandbox needs a POSIX system (Linux recommended); elsewhere `step` raises AlignRLError.

Reward part ``success``: 1.0 when every test passes, else 0.0; reported once per episode (in the step that passes,
else by `finish` as 0.0).

Data: `make_rows(n, seed)`, `sft_rows(n, seed)`: conversations of a scripted policy that writes the right code at
once (`perfect_policy`) in 35% of episodes and otherwise makes a characteristic mistake, the constant one too large
("x+24" for "x plus 23"), then after each failure reads it and fixes the code with probability 0.25, else repeats
its wrong code. Success within 3 turns: the mixture 0.35 + 0.65 * (1 - 0.75^2) = 63% (58% measured on 200 rows; the
test allows 52-74%), the mistake alone (`mistake_policy`, never fixed) 0% (0% measured on 100 rows). Greedy
imitation of the more frequent move at each point writes the wrong constant and repeats it; writing the right one,
and fixing it after a failure, is what reinforcement has to find. A full 3-turn conversation is at most about 225
characters in `alignrl.models.CHAT_TEMPLATE` (no system message: the environment has no tools).
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from alignrl.envs import Environment, Episode, Message, Step
from alignrl.envs.guess import play_episode
from alignrl.rewards.code import SandboxResult, extract_code, run_tests_detailed

WORDS = {"+": "plus", "-": "minus", "*": "times"}
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
RIGHT_P = 0.35  # probability that the scripted SFT policy writes the right code at once for a whole episode
FIX_P = 0.25  # ... else, that a retry after a failure fixes the code (else it repeats the wrong code)

_FAILED_RE = re.compile(r"^\[sandbox\] test (\d+) failed", re.MULTILINE)

Policy = Callable[[list[Message]], str]


def solution(op: str, k: int) -> str:
    """The one-line solution of task (op, k), as the scripted policies write it."""
    return f"def f(x): return x{op}{k}"


def feedback(result: SandboxResult, tests: list[str]) -> str:
    """The reply to a failed attempt: the first failing test, or why nothing could be tested."""
    if result.timed_out:
        return "failed: timed out"
    if "[sandbox] the solution does not compile" in result.stderr:
        return "failed: syntax error"
    match = _FAILED_RE.search(result.stderr)
    return f"failed: {tests[int(match.group(1)) if match else 0]}"


class CodeFeedbackEnv(Environment):
    """Write the function of the prompt; failing tests are reported back; see the module docstring."""

    max_turns = 3  # a first attempt and two retries
    timeout = 5.0  # seconds per sandbox run

    def __init__(self) -> None:
        self.passed = False
        self.replies: dict[str, str] = {}  # code -> its failure reply: a repeated attempt is not run again

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.passed, self.replies = False, {}
        return [dict(m) for m in row["prompt"]]

    def step(self, episode: Episode, message: str) -> Step:
        tests = list(episode.row["tests"])
        code = extract_code(message).strip()
        if not code:  # nothing to run: spare the sandbox
            return Step([{"role": "user", "content": "failed: no code"}])
        if code not in self.replies:
            result = run_tests_detailed(code + "\n", tests, timeout=self.timeout)
            if result.passed == result.total and not result.timed_out:
                self.passed = True
                return Step(done=True, rewards={"success": 1.0})
            self.replies[code] = feedback(result, tests)
        return Step([{"role": "user", "content": self.replies[code]}])

    def finish(self, episode: Episode) -> dict[str, float]:
        # Every episode reports `success` once, so its mean over episodes is the success rate.
        return {} if self.passed else {"success": 0.0}


def make_task(rng: random.Random) -> dict[str, Any]:
    """One task row: f(x) = x + k, x - k or x * k (k in 2..999), with 3 tests on distinct x in 0..9."""
    op, k = rng.choice("+-*"), rng.randint(2, 999)
    xs = rng.sample(range(10), 3)
    return {
        "prompt": [{"role": "user", "content": f"Write f(x) that returns x {WORDS[op]} {k}."}],
        "tests": [f"assert f({x}) == {OPS[op](x, k)}" for x in xs],
        "op": op,
        "k": k,
    }


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` task rows: 2994 functions (1000 rows of one seed hold about 28% of another seed's prompts)."""
    rng = random.Random(seed)
    return [make_task(rng) for _ in range(n)]


def perfect_policy(row: dict[str, Any]) -> Policy:
    """The correct strategy: always the right one-liner."""
    return lambda messages: solution(row["op"], int(row["k"]))


def wrong_solution(row: dict[str, Any]) -> str:
    """The characteristic mistake: the one-liner with the constant one too large ("x+24" for "x plus 23")."""
    return solution(row["op"], int(row["k"]) + 1)


def mistake_policy(row: dict[str, Any], fixes: Sequence[bool] = ()) -> Policy:
    """The characteristic mistake (`wrong_solution`) at once; the retry after the i-th failure fixes the code when
    `fixes[i]` is true, else repeats the wrong code (never fixed by default: success 0%)."""
    right, wrong = solution(row["op"], int(row["k"])), wrong_solution(row)

    def act(messages: list[Message]) -> str:
        retry = sum(m["role"] == "assistant" for m in messages) - 1  # -1: the first attempt
        return right if 0 <= retry < len(fixes) and fixes[retry] else wrong

    return act


def scripted_policy(row: dict[str, Any], rng: random.Random, right_p: float = RIGHT_P, fix_p: float = FIX_P) -> Policy:
    """The imperfect SFT policy of one episode: with probability `right_p` the right code at once (`perfect_policy`),
    otherwise the mistake (`wrong_solution`), and after each failure the right code with probability `fix_p`, else
    the same wrong code again. Success within 3 turns: 0.35 + 0.65 * (1 - 0.75^2) = 63%. Its choices are drawn
    here, so a policy's play does not depend on when other episodes are played."""
    if rng.random() < right_p:
        return perfect_policy(row)
    return mistake_policy(row, [rng.random() < fix_p for _ in range(CodeFeedbackEnv.max_turns - 1)])


def sft_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` SFT conversations `{"messages": [...]}` of the scripted policy playing rows of `make_rows(n, seed)`
    (one sandbox run per assistant turn)."""
    rng = random.Random(seed + 1)  # not the rows' stream
    return [
        {"messages": play_episode(CodeFeedbackEnv(), row, scripted_policy(row, rng), CodeFeedbackEnv.max_turns)[0]}
        for row in make_rows(n, seed)
    ]


__all__ = [
    "CodeFeedbackEnv",
    "feedback",
    "make_rows",
    "mistake_policy",
    "perfect_policy",
    "scripted_policy",
    "sft_rows",
    "solution",
    "wrong_solution",
]
