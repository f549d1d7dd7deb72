"""Multi-turn environments: what an agent acts on between its turns.

An environment is a class; every episode gets a fresh instance (its attributes are the episode's state):

    class Guess(Environment):
        def reset(self, row):                 # -> the first messages (None: the row's `prompt`)
            self.secret = row["secret"]
            return [{"role": "user", "content": "Guess my number (1-15)."}]

        def step(self, episode, message):     # after every assistant turn -> Step
            if int(message) == self.secret:
                return Step(done=True, rewards={"success": 1.0})
            return Step([{"role": "user", "content": "higher" if int(message) < self.secret else "lower"}])

`episode` holds the row, the conversation so far and the turn number. Rewards are named parts, summed over the
episode into one reward column named after the environment. A class following TRL's `environment_factory`
convention (a `reset(**row)`, public methods as tools, optional `get_reward()`) runs unchanged, as do plain
tool functions (`tools:`): see `alignrl.envs.tool_env`. Configs name a class like a reward function: a built-in
(BUILTIN_ENVS), `package.module:Class` or `path/to/file.py:Class`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from alignrl.errors import AlignRLError

Message = dict[str, Any]


@dataclass
class Step:
    """What the environment answers to one assistant turn."""

    messages: list[Message] = field(default_factory=list)  # appended to the conversation (user or tool turns)
    done: bool = False  # the episode ends here (its messages are then not appended)
    rewards: dict[str, float] = field(default_factory=dict)  # reward parts, summed over the episode
    tool_calls: int = 0  # tool calls the turn made (for metrics)
    tool_errors: int = 0  # of which failed: malformed, unknown tool, raised or timed out


@dataclass
class Episode:
    """An episode as the environment sees it in `step`."""

    row: dict[str, Any]  # the data row it started from
    messages: list[Message]  # the conversation so far: the first messages, then assistant and environment turns
    turn: int = 0  # assistant turns so far (1 in the first `step`)


class Environment:
    """Base class of multi-turn environments (one instance per episode); override `reset` and `step`."""

    tools: list[Callable[..., Any]] = []  # functions the chat template renders into the prompt, if any

    def reset(self, row: dict[str, Any]) -> list[Message] | None:
        """The episode's first messages; None: the row's `prompt` column."""
        return None

    def step(self, episode: Episode, message: str) -> Step:
        """The environment's answer to the assistant's `message` (its text, special tokens removed)."""
        raise NotImplementedError

    def finish(self, episode: Episode) -> dict[str, float]:
        """Reward parts at the end of the episode, however it ended (done, max_turns or the token budget)."""
        return {}


# built-in environments: name -> "module:Class"
BUILTIN_ENVS = {
    "calculator": "alignrl.envs.arithmetic:CalculatorEnv",
    "guess": "alignrl.envs.guess:GuessEnv",
    "code": "alignrl.envs.code:CodeFeedbackEnv",
}


def is_native(cls: Any) -> bool:
    """An environment with this library's `step(episode, message)` (else TRL's environment_factory convention)."""
    return callable(getattr(cls, "step", None))


def load_environment(spec: str, files: dict[Path, ModuleType] | None = None) -> tuple[str, Callable[[], Any]]:
    """(name, factory) of the `environment` option: a built-in name, `package.module:Class` or
    `path/to/file.py:Class` (any zero-argument callable returning an instance)."""
    from alignrl.rewards import load_named

    name, factory = load_named("environment", spec, BUILTIN_ENVS, "Class", files)
    probe = factory() if not isinstance(factory, type) else None
    cls = factory if isinstance(factory, type) else type(probe)
    if not is_native(cls) and not callable(getattr(cls, "reset", None)):
        raise AlignRLError(
            f"environment: {spec} has neither step(episode, message) nor reset(**row) (TRL's environment_factory)"
        )
    return name, factory


__all__ = ["BUILTIN_ENVS", "Environment", "Episode", "Message", "Step", "is_native", "load_environment"]
