"""Multi-turn episodes: sample a turn, let the environment answer, sample the next turn, on the token ids.

Token in, token out: an episode is the ids of its first prompt, then every sampled turn's ids exactly as sampled
and the ids of what the environment appended (the chat template's rendering of only the new messages, after the
turn's end-of-turn token). Earlier turns are never re-tokenised, so a template that renders history differently
(e.g. dropping `<think>` blocks) cannot shift what the loss sees. `action_mask` marks the sampled tokens: the
log-probs, KL, advantages and losses use those; environment tokens are context only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from alignrl.data import encode, pad_batch
from alignrl.envs import Environment, Episode, Message, is_native, load_environment
from alignrl.envs.tool_env import ToolEnvironment
from alignrl.envs.tools import load_tools, render_conversation
from alignrl.errors import AlignRLError
from alignrl.generation import Rollout, SamplingParams
from alignrl.rewards import RewardFunctions

DEFAULT_MAX_TURNS = 4
# what reward functions get besides the dataset columns in a run with an environment
ENV_COLUMNS = ("environments", "environment_reward")


@dataclass
class Interaction:
    """How episodes run: the environment (a zero-argument factory), extra tools and the limits."""

    name: str
    factory: Callable[[], Any]
    tools: list[Callable[..., Any]] = field(default_factory=list)
    max_turns: int = DEFAULT_MAX_TURNS  # assistant turns per episode
    max_episode_tokens: int = 1024  # tokens after the first prompt (sampled and appended)
    tool_timeout: float = 10.0

    def make(self) -> Environment:
        """A fresh environment for one episode (TRL-style instances run inside a ToolEnvironment)."""
        try:
            env = self.factory()
        except Exception as e:  # noqa: BLE001 - user code: one line naming it
            raise AlignRLError(f"environment: creating {self.name} failed: {type(e).__name__}: {e}") from None
        if not is_native(type(env)):
            return ToolEnvironment(self.tools, env, self.tool_timeout)
        if self.tools:
            env.tools = [*getattr(env, "tools", []), *self.tools]
        if isinstance(env, ToolEnvironment):
            env.timeout = self.tool_timeout
        return env


def build_interaction(cfg: Any) -> Interaction | None:
    """The run's Interaction from its `environment`, `tools`, `max_turns` and `max_episode_tokens` options (None:
    single-turn). max_turns 0 takes the environment's own `max_turns` attribute, else DEFAULT_MAX_TURNS;
    max_episode_tokens 0 means 2 × max_turns × max_completion_length (as much room for
    the environment's messages as for the model's turns)."""
    tools = load_tools(cfg.tools) if cfg.tools else []
    if not cfg.environment and not tools:
        return None
    if cfg.environment:
        name, factory = load_environment(cfg.environment)
    else:
        name, factory = "tools", lambda: ToolEnvironment()
    turns = cfg.max_turns or int(getattr(factory, "max_turns", 0) or DEFAULT_MAX_TURNS)
    return Interaction(name, factory, tools, turns, episode_budget(cfg, turns), cfg.tool_timeout)


def episode_budget(cfg: Any, turns: int) -> int:
    """max_episode_tokens, or by default 2 × turns × max_completion_length (as much room for the environment's
    messages as for the model's turns)."""
    return cfg.max_episode_tokens or 2 * turns * cfg.max_completion_length


def environment_reward(environment_reward: list[float | None], **kwargs: Any) -> list[float | None]:
    """The reward column of the environment: its reward parts summed over each episode (None: it gave none)."""
    return environment_reward


def reward_functions(
    specs: Sequence[str],
    weights: Sequence[float] | None,
    columns: set[str],
    data_name: str,
    env_name: str | None,
    *,
    timeout: float = 0.0,
    max_steps: int = 0,
    required: bool = True,
) -> RewardFunctions:
    """The reward functions of a run or an evaluation; with an environment (`env_name`), its reward column last
    and the environment's columns passed to the others (none of them required then)."""
    env_columns = set(ENV_COLUMNS) if env_name else set()
    fns = RewardFunctions(specs, weights, columns | env_columns, data_name, timeout, max_steps,
                          required=required and not env_name)  # fmt: skip
    if env_name:
        fns.add(env_name, environment_reward)
    return fns


def appended_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """The ids the chat template renders for environment `messages` after an assistant turn's end-of-turn token,
    through the next assistant header: the template on a fixed two-turn conversation with and without them."""
    first = messages[0]
    call = {"type": "function", "function": {"name": first.get("name", "tool"), "arguments": {}}}
    assistant = {"role": "assistant", "content": "", **({"tool_calls": [call]} if first["role"] == "tool" else {})}
    base = [{"role": "user", "content": "x"}, assistant]
    try:
        prefix = encode(tokenizer, tokenizer.apply_chat_template(base, tokenize=False))
        full = encode(tokenizer, tokenizer.apply_chat_template(base + messages, tokenize=False,
                                                               add_generation_prompt=True))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, exceptions they raise)
        raise AlignRLError(f"environment: the chat template cannot render {first['role']} messages: {e}") from None
    eos = tokenizer.eos_token_id
    ends = [i for i, t in enumerate(prefix) if t == eos]
    if ends:  # the turn's sampled ids end at its end-of-turn token; what the template adds after it is appended
        prefix = prefix[: ends[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise AlignRLError("environment: the chat template renders earlier turns differently once a message follows")
    return full[len(prefix) :]


@dataclass
class _Run:
    """One episode in progress."""

    env: Environment
    episode: Episode
    prompt_ids: list[int]
    seed: int | None
    ids: list[int] = field(default_factory=list)  # after the prompt
    action: list[int] = field(default_factory=list)  # 1 on sampled ids
    logprobs: list[float] = field(default_factory=list)
    rewards: dict[str, float] = field(default_factory=dict)
    tool_calls: int = 0
    tool_errors: int = 0
    ended: str = ""  # done, max_turns, token_budget or truncated (a turn without end-of-turn token)

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.ids += ids
        self.action += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


@dataclass
class Episodes:
    """A batch of finished episodes: the rollout (completion = everything after the first prompt) and what the
    reward functions, metrics and samples.jsonl need."""

    rollout: Rollout
    prompts: list[list[Message]]  # first messages
    completions: list[list[Message]]  # the assistant and environment turns that followed
    environments: list[Environment]
    env_rewards: list[dict[str, float]]  # reward parts summed over each episode
    stats: dict[str, torch.Tensor]  # [N] per episode: turns, tool calls/errors, how it ended


def _turn_seed(seed: int | None, turn: int) -> int | None:
    """The noise seed of an episode's turn (turn 0: the episode's own seed, as a single-turn sample)."""
    return None if seed is None else (seed if turn == 0 else (seed * 1_000_003 + turn) % (1 << 62))


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except AlignRLError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: one line naming it
        raise AlignRLError(f"environment: {what} raised {type(e).__name__}: {e}") from None


def run_episodes(
    engine: Any,
    tokenizer: PreTrainedTokenizerBase,
    interaction: Interaction,
    rows: Sequence[dict[str, Any]],
    params: SamplingParams,
    *,
    max_prompt_length: int,
    seeds: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> Episodes:
    """One episode per row (rows repeated by the caller for groups), all turns sampled together in batches."""
    runs: list[_Run] = []
    for i, row in enumerate(rows):
        env = interaction.make()
        first = _call(f"{interaction.name}.reset", env.reset, row)
        if first is None:
            if "prompt" not in row:
                raise AlignRLError(f"environment: {interaction.name}.reset returned None and the row has no prompt")
            first = row["prompt"]
        messages = [{"role": "user", "content": first}] if isinstance(first, str) else [dict(m) for m in first]
        text = render_conversation(tokenizer, messages, getattr(env, "tools", []) or [])
        ids = encode(tokenizer, text)[-max_prompt_length:]
        runs.append(_Run(env, Episode(dict(row), messages), ids, None if seeds is None else seeds[i]))
    firsts = [[dict(m) for m in r.episode.messages] for r in runs]
    budget = interaction.max_episode_tokens
    for turn in range(interaction.max_turns):
        active = [r for r in runs if not r.ended]
        if not active:
            break
        rooms = [budget - len(r.ids) for r in active]
        step = SamplingParams(min(params.max_new_tokens, max(rooms)), params.temperature, params.top_p,
                              params.top_k, params.autocast)  # fmt: skip
        out = engine.generate([r.prompt_ids + r.ids for r in active], step, [_turn_seed(r.seed, turn) for r in active]
                              if seeds is not None else None)  # fmt: skip
        sampled = out.completion_lists()
        for k, (r, room) in enumerate(zip(active, rooms)):
            ids = sampled[k][:room]
            r.add(ids, out.logprobs[k, : len(ids)].tolist())
            r.episode.turn += 1
            text = tokenizer.decode(ids, skip_special_tokens=True)
            r.episode.messages.append({"role": "assistant", "content": text})
            answer = _call(f"{interaction.name}.step", r.env.step, r.episode, text)
            for key, v in answer.rewards.items():
                r.rewards[key] = r.rewards.get(key, 0.0) + float(v)
            r.tool_calls += answer.tool_calls
            r.tool_errors += answer.tool_errors
            if answer.done:
                r.ended = "done"
            elif len(ids) < len(sampled[k]) or len(r.ids) >= budget:
                r.ended = "token_budget"
            elif bool(out.truncated[k]):
                r.ended = "truncated"
            elif r.episode.turn >= interaction.max_turns:
                r.ended = "max_turns"
            elif answer.messages:
                more = appended_ids(tokenizer, answer.messages)
                if len(r.ids) + len(more) >= budget:
                    r.ended = "token_budget"
                else:
                    r.add(more, None)
                    r.episode.messages += answer.messages
    for r in runs:
        if not r.ended:
            r.ended = "max_turns"
        for key, v in _call(f"{interaction.name}.finish", r.env.finish, r.episode).items():
            r.rewards[key] = r.rewards.get(key, 0.0) + float(v)
    return Episodes(
        _rollout(runs, tokenizer.pad_token_id, device),
        firsts,
        [r.episode.messages[len(f) :] for r, f in zip(runs, firsts)],
        [r.env for r in runs],
        [r.rewards for r in runs],
        _stats(runs),
    )


def _rollout(runs: list[_Run], pad_id: int, device: torch.device | str) -> Rollout:
    """The episodes as one Rollout: prompts left-padded, trajectories right-padded."""
    prompt_ids, prompt_mask = pad_batch([r.prompt_ids for r in runs], pad_id, device, left=True)
    ids, mask = pad_batch([r.ids for r in runs], pad_id, device)
    width = ids.shape[1]

    def rows(values: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([v + [0] * (width - len(v)) for v in values], dtype=dtype, device=device).view(-1, width)

    return Rollout(
        prompt_ids, prompt_mask, ids, mask,
        rows([r.logprobs for r in runs], torch.float32),
        torch.tensor([r.ended in ("truncated", "token_budget") for r in runs], device=device),
        rows([r.action for r in runs], torch.long),
    )  # fmt: skip


def _stats(runs: list[_Run]) -> dict[str, torch.Tensor]:
    """Per-episode metrics under their logged names (reward parts absent from an episode count as 0)."""
    parts = sorted({k for r in runs for k in r.rewards})
    out = {
        "episode/turns": [r.episode.turn for r in runs],
        "episode/tool_calls": [r.tool_calls for r in runs],
        "episode/tool_errors": [r.tool_errors for r in runs],
        "episode/hit_max_turns": [r.ended == "max_turns" for r in runs],
        "episode/hit_token_budget": [r.ended == "token_budget" for r in runs],
        **{f"env/{p}": [r.rewards.get(p, 0.0) for r in runs] for p in parts},
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


def warn_positions(interaction: Interaction, max_prompt_length: int, model: Any) -> None:
    """A warning when a prompt plus an episode's tokens can exceed the model's positions."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and max_prompt_length + interaction.max_episode_tokens > positions:
        print(
            f"alignrl: warning: max_prompt_length ({max_prompt_length}) + max_episode_tokens "
            f"({interaction.max_episode_tokens}) exceeds the model's {positions} positions",
            file=sys.stderr,
        )
