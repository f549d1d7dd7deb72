"""Guess the number: a hidden integer in 1..15, found by acting on "higher" / "lower" feedback.

Protocol (one user message, then one assistant turn and one environment turn at a time):

    user: Guess my number (1-15).
    assistant: 8
    user: lower
    assistant: 4
    user: higher
    assistant: 6                      <- right: the episode ends (no further message)

The assistant's message is read leniently: the first integer in it is the guess (surrounding text and whitespace are
ignored). A message without an integer gets "say a number" and uses up its turn; a guess out of range still gets
"higher" / "lower". The row's `secret` column holds the number.

Reward parts (each reported once per episode: in the step that wins, else by `finish` as 0.0):

- ``success``: 1.0 when the episode's guess is right, else 0.0.
- ``fewer_turns``: on success at assistant turn t, 0.5 * (1 - (t - 1) / max_turns), with max_turns = 5:
  0.5, 0.4, 0.3, 0.2, 0.1 for a win at turn 1..5; 0.0 otherwise. The total is at most 1.5.

Binary search always wins within 4 turns; guessing without the feedback wins within 5 turns at most 5/15 = 33% of the
time (distinct guesses), 29% with uniform guesses: acting on the feedback is the only reliable way to win.

Data: `make_rows(n, seed)` (column `secret`), `sft_rows(n, seed)`: conversations of a scripted policy that bisects
for a whole episode with probability 0.35 and otherwise steps by one from the middle (74% success; greedy imitation
of its more frequent move wins 60%). A full 5-turn conversation is about 170 characters in the init-model template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from alignrl.envs import Environment, Episode, Message, Step

HIGH = 15  # secrets are 1..HIGH
PROMPT = f"Guess my number (1-{HIGH})."
INVALID = "say a number"
BISECT_P = 0.35  # probability that the scripted SFT policy bisects for a whole episode

_INT_RE = re.compile(r"-?\d+")

Policy = Callable[[list[Message]], str]


def parse_guess(message: str) -> int | None:
    """The first integer in `message`, or None."""
    match = _INT_RE.search(message)
    try:
        return int(match.group()) if match else None
    except ValueError:  # more digits than int() converts: not a guess
        return None


class GuessEnv(Environment):
    """Find the row's `secret` in 1..15 from "higher" / "lower" answers; see the module docstring."""

    max_turns = 5  # the turn limit the task and its reward are designed for (the runner's default)

    def __init__(self) -> None:
        self.secret = 0
        self.won = False

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.secret = int(row["secret"])
        self.won = False
        return [{"role": "user", "content": PROMPT}]

    def step(self, episode: Episode, message: str) -> Step:
        guess = parse_guess(message)
        if guess is None:
            return Step([{"role": "user", "content": INVALID}])
        if guess != self.secret:
            return Step([{"role": "user", "content": "higher" if guess < self.secret else "lower"}])
        self.won = True
        bonus = 0.5 * max(0.0, 1.0 - (episode.turn - 1) / self.max_turns)
        return Step(done=True, rewards={"success": 1.0, "fewer_turns": bonus})

    def finish(self, episode: Episode) -> dict[str, float]:
        # Every episode reports `success` once, so its mean over episodes is the success rate.
        return {} if self.won else {"success": 0.0, "fewer_turns": 0.0}


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` task rows: `secret` uniform in 1..15 and the first message as `prompt`."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": PROMPT}], "secret": rng.randint(1, HIGH)} for _ in range(n)]


def play_episode(
    env: Environment, row: dict[str, Any], policy: Policy, max_turns: int
) -> tuple[list[Message], dict[str, float]]:
    """Play `policy` through `env` on `row` for at most `max_turns` assistant turns, as the runner does: the
    conversation (ending with the last assistant turn) and the summed reward parts."""
    first = env.reset(row)
    messages: list[Message] = list(first) if first is not None else list(row["prompt"])
    episode = Episode(row=row, messages=messages)
    totals: dict[str, float] = {}
    for turn in range(1, max_turns + 1):
        text = policy(messages)
        messages.append({"role": "assistant", "content": text})
        episode.turn = turn
        step = env.step(episode, text)
        for name, value in step.rewards.items():
            totals[name] = totals.get(name, 0.0) + value
        if step.done:
            break
        if turn < max_turns:  # the reply to the last allowed turn is never seen by the model
            messages.extend(step.messages)
    for name, value in env.finish(episode).items():
        totals[name] = totals.get(name, 0.0) + value
    return messages, totals


def bounds(messages: list[Message]) -> tuple[int, int]:
    """The interval of secrets consistent with the feedback in `messages`."""
    lo, hi = 1, HIGH
    last: int | None = None
    for m in messages:
        if m["role"] == "assistant":
            last = parse_guess(str(m["content"]))
        elif last is not None and m["content"] == "higher":
            lo = max(lo, last + 1)
        elif last is not None and m["content"] == "lower":
            hi = min(hi, last - 1)
    return lo, hi


def bisect_policy(messages: list[Message]) -> str:
    """The perfect policy: the midpoint of the interval left (always wins within 4 turns)."""
    lo, hi = bounds(messages)
    return str((lo + hi + 1) // 2)


def step_policy(messages: list[Message]) -> str:
    """The characteristic mistake: start in the middle, then step by one towards the feedback (wins only when the
    secret is within 4 of 8, 60% of secrets)."""
    last = next((parse_guess(str(m["content"])) for m in reversed(messages) if m["role"] == "assistant"), None)
    if last is None:
        return str((1 + HIGH + 1) // 2)
    return str(last + 1 if messages[-1]["content"] == "higher" else last - 1)


def scripted_policy(rng: random.Random, bisect_p: float = BISECT_P) -> Policy:
    """The imperfect SFT policy of one episode: with probability `bisect_p` it bisects the whole episode, otherwise
    it steps by one from the middle (`step_policy`). Success within 5 turns: 0.35 + 0.65 * 9/15 = 74%. Both start
    at 8, and after that the step is the more frequent move in the data: a model that imitates it and decodes
    greedily steps (60%); bisecting (100%) is what reinforcement has to find."""
    return bisect_policy if rng.random() < bisect_p else step_policy


def sft_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` SFT conversations `{"messages": [...]}` of the scripted policy playing rows of `make_rows(n, seed)`."""
    rng = random.Random(seed + 1)  # not the rows' stream: the policy's choices are independent of the secrets
    return [
        {"messages": play_episode(GuessEnv(), row, scripted_policy(rng), GuessEnv.max_turns)[0]}
        for row in make_rows(n, seed)
    ]


__all__ = ["GuessEnv", "bisect_policy", "make_rows", "play_episode", "scripted_policy", "sft_rows", "step_policy"]
