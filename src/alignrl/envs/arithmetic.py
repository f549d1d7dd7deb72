"""Calculator use: short arithmetic word problems (+, - of 2-3 digit numbers, * by a digit) and a `calculator` tool.

Protocol (the runner adds the tool's description to the prompt when it renders it: a system message for chat
templates that do not render tools themselves):

    user: Ann has 37 pens and gets 48 more. How many now?
    assistant: <tool_call>{"name": "calculator", "arguments": {"expression": "37+48"}}</tool_call>
    tool: 85
    assistant: Answer: 85             <- no tool call: the final answer, the episode ends

A turn with tool calls gets one `tool` message per call (`calculator` from `alignrl.envs.tools`: the value, or
`{"error": ...}`); the first turn without a tool call is the final answer. Its last integer is the answer (the rest
of the text and whitespace are ignored). Rows: `prompt` (the user message), `answer` (int), `expression` (e.g.
"37+48": what the scripted policy types).

Reward part ``success``: 1.0 when the final answer equals the row's `answer`, else 0.0; reported once per episode
(with the final answer, else by `finish` as 0.0 when the turns run out before one).

Data: `make_rows(n, seed)`, `sft_rows(n, seed)`: conversations of a scripted policy that plays the correct strategy
(`perfect_policy`: call the calculator, answer "Answer: " + its result) in 35% of episodes and otherwise a
characteristic mistake (`mental_policy`: answer at once, without the tool, "Answer: " + column arithmetic with the
carries and borrows dropped). Success: the mixture 0.35 + 0.65 * 0.19 = 47% (44% measured on 500 rows; the test
allows 40-54%), the mistake alone 19% (19% measured on 500 rows; 14-25% allowed). The two differ at the first
character of the first turn, where answering at once is the more frequent move: greedy imitation answers in its
head. Each conversation starts with the system message the runner adds for `alignrl.models.CHAT_TEMPLATE` (the tool
description, `alignrl.envs.tools.tools_system_prompt`: 414 characters), so SFT and RL prompts are the same text.
Rendered in that template, a conversation is at most about 510 characters answering at once, 620 with the calculator
(the prompt, up to the first "assistant: ", at most about 495); a tool call is at most 85 characters (86 tokens with
its end-of-turn token).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

from alignrl.envs import Episode, Message
from alignrl.envs.guess import play_episode
from alignrl.envs.tool_env import ToolEnvironment
from alignrl.envs.tools import calculator, tools_system_prompt

NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Max")
ITEMS = ("pens", "cards", "eggs", "coins", "stamps", "books")
TOOL_P = 0.35  # probability that the scripted SFT policy uses the calculator for a whole episode
ANSWER = "Answer: "  # how every final answer of the scripted policies starts

_INT_RE = re.compile(r"-?\d+")

Policy = Callable[[list[Message]], str]


def parse_answer(message: str) -> int | None:
    """The last integer in `message`, or None."""
    found = _INT_RE.findall(message)
    try:
        return int(found[-1]) if found else None
    except ValueError:  # more digits than int() converts: not an answer
        return None


class CalculatorEnv(ToolEnvironment):
    """Arithmetic word problems with a `calculator` tool; see the module docstring."""

    max_turns = 3  # a call, its result, the answer: one turn to spare

    def __init__(self) -> None:
        super().__init__(tools=[calculator])
        self.answered = False

    def answer_rewards(self, episode: Episode, message: str) -> dict[str, float]:
        self.answered = True
        right = parse_answer(message) == int(episode.row["answer"])
        return {"success": 1.0 if right else 0.0}

    def finish(self, episode: Episode) -> dict[str, float]:
        # Every episode reports `success` once, so its mean over episodes is the success rate.
        return {} if self.answered else {"success": 0.0}


def make_problem(rng: random.Random) -> dict[str, Any]:
    """One problem row: a + b, a - b (a > b) or a * b (b a digit), with its text, expression and answer."""
    name, item, op = rng.choice(NAMES), rng.choice(ITEMS), rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        text = f"{name} has {a} {item} and gets {b} more. How many now?"
    elif op == "-":
        a = rng.randint(20, 999)
        b = rng.randint(10, a - 1)
        text = f"{name} has {a} {item} and gives away {b}. How many left?"
    else:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        text = f"{name} buys {a} bags of {b} {item}. How many {item}?"
    expression = f"{a}{op}{b}"
    return {
        "prompt": [{"role": "user", "content": text}],
        "expression": expression,
        "answer": int(calculator(expression)),
    }


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` problem rows (about 1.5 million distinct problems: rows of different seeds rarely coincide)."""
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def tool_call(expression: str) -> str:
    """The assistant's text of one calculator call."""
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + "</tool_call>"


def system_message(env: CalculatorEnv | None = None) -> Message:
    """The system message the runner prepends for chat templates that ignore `tools` (such as
    `alignrl.models.CHAT_TEMPLATE`): the description of the environment's tools."""
    return {"role": "system", "content": tools_system_prompt((env or CalculatorEnv()).tools)}


def mental_arithmetic(expression: str) -> int:
    """The characteristic mistake: column arithmetic with every carry and borrow dropped (37+48 -> 75, 52-17 -> 45,
    23*4 -> 82). Right exactly when the problem needs no carry or borrow."""
    match = re.fullmatch(r"(\d+)([-+*])(\d+)", expression)
    if match is None:
        raise ValueError(f"not a problem's expression: {expression!r}")
    left, op, right = match.groups()
    if op == "*":  # b is one digit: each digit of a times b, keeping the last digit of each product
        digits = [int(d) * int(right) % 10 for d in left]
    else:
        width = max(len(left), len(right))
        pairs = zip(left.zfill(width), right.zfill(width))
        digits = [(int(x) + int(y) if op == "+" else int(x) - int(y)) % 10 for x, y in pairs]
    return int("".join(map(str, digits)))


def perfect_policy(row: dict[str, Any]) -> Policy:
    """The correct strategy: call the calculator on the row's expression, then answer with its result."""

    def act(messages: list[Message]) -> str:
        return tool_call(row["expression"]) if messages[-1]["role"] != "tool" else ANSWER + str(messages[-1]["content"])

    return act


def mental_policy(row: dict[str, Any]) -> Policy:
    """The characteristic mistake: answer at once, without the calculator, by `mental_arithmetic` (right only for
    the problems without a carry or borrow: 19% of rows)."""
    guess = mental_arithmetic(row["expression"])
    return lambda messages: ANSWER + str(guess)


def scripted_policy(row: dict[str, Any], rng: random.Random, tool_p: float = TOOL_P) -> Policy:
    """The imperfect SFT policy of one episode: with probability `tool_p` the correct strategy (`perfect_policy`),
    otherwise the mistake (`mental_policy`). Success: 0.35 + 0.65 * 0.19 = 47%. The two differ from the first
    character of the first turn on ("<tool_call>" or "Answer: "), and answering at once is the more frequent move
    in the data: a model that imitates it and decodes greedily answers in its head (19% at best, less as a tiny model
    does the column arithmetic imperfectly); calling the calculator (100%) is what reinforcement has to find."""
    return perfect_policy(row) if rng.random() < tool_p else mental_policy(row)


def sft_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` SFT conversations `{"messages": [...]}` of the scripted policy playing rows of `make_rows(n, seed)`, each
    starting with `system_message()`: the prompt the runner renders in RL, for templates that ignore `tools`."""
    rng = random.Random(seed + 1)  # not the rows' stream: the policy's choices are independent of the problems
    rows: list[dict[str, Any]] = []
    for row in make_rows(n, seed):
        env = CalculatorEnv()
        messages = play_episode(env, row, scripted_policy(row, rng), env.max_turns)[0]
        rows.append({"messages": [system_message(env), *messages]})
    return rows


__all__ = [
    "CalculatorEnv",
    "make_rows",
    "mental_arithmetic",
    "mental_policy",
    "perfect_policy",
    "scripted_policy",
    "sft_rows",
    "system_message",
    "tool_call",
]
