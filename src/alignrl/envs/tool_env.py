"""Tool use as an environment: the assistant's tool calls are run and their results appended as `tool` messages;
a turn without a tool call ends the episode. Also runs TRL's `environment_factory` classes unchanged: `reset(**row)`
(a returned string is appended to the last user message), public methods as tools, optional `get_reward()`."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from alignrl.envs import Environment, Episode, Message, Step
from alignrl.envs.tools import call_tool, parse_tool_calls

TOOL_TIMEOUT = 10.0  # seconds one tool call may take before it becomes a tool error


def prompt_messages(prompt: Any) -> list[Message]:
    """A row's prompt as messages (a plain string becomes one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def instance_tools(instance: Any) -> list[Callable[..., Any]]:
    """The public methods of a TRL-style environment instance, as tools (reset and get_reward aside)."""
    return [
        getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


class ToolEnvironment(Environment):
    """Tools (plain functions, and the methods of a TRL-style environment `instance`) run on the assistant's calls.
    Subclasses reward the final answer with `answer_rewards`."""

    def __init__(self, tools: Sequence[Callable[..., Any]] = (), instance: Any = None, timeout: float = TOOL_TIMEOUT):
        self.instance = instance
        self.tools = [*tools, *(instance_tools(instance) if instance is not None else [])]
        self.timeout = timeout

    def reset(self, row: dict[str, Any]) -> list[Message] | None:
        messages = prompt_messages(row["prompt"]) if "prompt" in row else [{"role": "user", "content": ""}]
        if self.instance is not None:
            observation = self.instance.reset(**row)
            if isinstance(observation, str) and messages:
                messages[-1] = {**messages[-1], "content": str(messages[-1]["content"]) + observation}
        return messages

    def step(self, episode: Episode, message: str) -> Step:
        calls, errors = parse_tool_calls(message)
        if not calls and not errors:
            return Step(done=True, rewards=self.answer_rewards(episode, message))
        by_name = {getattr(f, "__name__", ""): f for f in self.tools}
        out: list[Message] = []
        failed = len(errors)
        for call in calls:
            fn = by_name.get(call.name)
            if fn is None:
                content, ok = json.dumps({"error": f"Tool {call.name} not found."}), False
            else:
                content, ok = call_tool(fn, call.arguments, self.timeout)
            failed += not ok
            out.append({"role": "tool", "name": call.name, "content": content})
        out += [{"role": "tool", "name": "unknown", "content": json.dumps({"error": e})} for e in errors]
        return Step(out, tool_calls=len(calls) + len(errors), tool_errors=failed)

    def answer_rewards(self, episode: Episode, message: str) -> dict[str, float]:
        """Reward parts for the final answer (a turn without tool calls)."""
        return {}

    def finish(self, episode: Episode) -> dict[str, float]:
        get_reward = getattr(self.instance, "get_reward", None)
        return {type(self.instance).__name__: float(get_reward())} if callable(get_reward) else {}
