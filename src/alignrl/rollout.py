"""Prompt rows -> sampled, decoded and scored completions: the rollout stage shared by GRPO, PPO and evaluation."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignrl import distributed as dist
from alignrl.data import Rows, encode, pad_batch, render_prompt
from alignrl.errors import AlignRLError
from alignrl.generation import Rollout, SamplingParams, generate
from alignrl.rewards import RewardFunctions

if TYPE_CHECKING:
    from alignrl.episodes import Interaction


def eos_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> list[int]:
    """EOS ids from the tokenizer plus any extra ones in the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen, int):
        ids.add(gen)
    elif isinstance(gen, (list, tuple)):
        ids.update(gen)
    return sorted(ids)


def encode_prompts(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    wheres: Sequence[str],
) -> list[list[int]]:
    """Render (chat template for message lists) and tokenize prompts, keeping the last max_prompt_length tokens."""
    out = []
    for row, where in zip(rows, wheres):
        ids = encode(tokenizer, render_prompt(row["prompt"], tokenizer, where))
        out.append(ids[-max_prompt_length:])
    return out


def check_prompt_lengths(
    rows: Rows, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int, max_completion_length: int, model: nn.Module
) -> int:
    """Tokenize every prompt once before training: prompts longer than max_prompt_length are counted and reported
    (sampling keeps their last max_prompt_length tokens); a kept prompt longer than the model's positions is an
    error, and one that leaves no room for max_completion_length a warning. Returns the number cut."""
    texts = [render_prompt(r["prompt"], tokenizer, rows.where(i)) for i, r in enumerate(rows.rows)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    cut = [i for i, n in enumerate(lengths) if n > max_prompt_length]
    if cut and dist.is_main():
        print(
            f"alignrl: warning: {len(cut)} of {len(rows)} prompts are longer than max_prompt_length="
            f"{max_prompt_length} tokens and are cut to their last {max_prompt_length} (first: {rows.where(cut[0])}, "
            f"{lengths[cut[0]]} tokens)",
            file=sys.stderr,
        )
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and lengths:
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        kept = min(lengths[longest], max_prompt_length)
        if kept > positions:
            raise AlignRLError(
                f"{rows.where(longest)}: prompt of {kept} tokens (after max_prompt_length={max_prompt_length}) is "
                f"longer than the model's {positions} positions; set max_prompt_length ≤ {positions - 1}"
            )
        if kept + max_completion_length > positions and dist.is_main():
            print(
                f"alignrl: warning: the longest prompt ({kept} tokens, {rows.where(longest)}) plus "
                f"max_completion_length={max_completion_length} exceeds the model's {positions} positions",
                file=sys.stderr,
            )
    return len(cut)


@dataclass
class ScoredRollout:
    rollout: Rollout
    prompts: list[Any]  # as given to reward functions (text or messages), one per completion
    completions: list[Any]  # decoded text (or [{"role": "assistant", ...}] for chat prompts)
    raw_rewards: torch.Tensor  # [N, F]
    rewards: torch.Tensor  # [N]
    episode_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] each, multi-turn episodes only


def select_rollouts(s: ScoredRollout, keep: torch.Tensor) -> ScoredRollout:
    """The samples where the bool mask `keep` [N] is set."""
    r = s.rollout
    k = keep.to(r.completion_ids.device)
    fields = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, r.logprobs, r.truncated, r.action_mask)
    kept = keep.nonzero().squeeze(-1).tolist()
    return ScoredRollout(
        Rollout(*(None if t is None else t[k] for t in fields)),
        [s.prompts[i] for i in kept],
        [s.completions[i] for i in kept],
        s.raw_rewards[keep.to(s.raw_rewards.device)],
        s.rewards[keep.to(s.rewards.device)],
        {name: v[keep.to(v.device)] for name, v in s.episode_stats.items()},
    )


def _pad_columns(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def merge_episode_stats(parts: Sequence[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Episode statistics of several batches ((statistics, episodes) each), in order (a reward part one batch
    lacks counts as 0 there)."""
    keys = sorted({k for stats, _ in parts for k in stats})
    return {k: torch.cat([stats.get(k, torch.zeros(n)) for stats, n in parts]) for k in keys}


def concat_rollouts(parts: Sequence[ScoredRollout], pad_id: int) -> ScoredRollout:
    """One scored rollout of several (prompts re-padded on the left, completions on the right)."""
    P = max(p.rollout.prompt_ids.shape[1] for p in parts)
    C = max(p.rollout.completion_ids.shape[1] for p in parts)

    def cat(name: str, width: int, value: float, left: bool) -> torch.Tensor:
        return torch.cat([_pad_columns(getattr(p.rollout, name), width, value, left) for p in parts])

    rollout = Rollout(
        cat("prompt_ids", P, pad_id, True),
        cat("prompt_mask", P, 0, True),
        cat("completion_ids", C, pad_id, False),
        cat("completion_mask", C, 0, False),
        cat("logprobs", C, 0.0, False),
        torch.cat([p.rollout.truncated for p in parts]),
        None if parts[0].rollout.action_mask is None else cat("action_mask", C, 0, False),
    )
    stats = merge_episode_stats([(p.episode_stats, len(p.rewards)) for p in parts])
    return ScoredRollout(
        rollout,
        [x for p in parts for x in p.prompts],
        [x for p in parts for x in p.completions],
        torch.cat([p.raw_rewards for p in parts]),
        torch.cat([p.rewards for p in parts]),
        stats,
    )


class RolloutEngine(Protocol):
    """What samples completions: the one generation path, whichever engine runs it (this library's own decoder
    now; an inference server such as vLLM behind the same call). Prompts are token ids; the Rollout holds the
    sampled ids, their masks and the sampler's log-probs (log π_sampler, temperature-scaled)."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Rollout: ...


@dataclass
class NativeEngine:
    """Sampling with `generation.generate` (KV cache, per-sample seeded noise) on a plain HF or peft model with full
    parameters (inside `distributed.full_params` under FSDP)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device | str = "cpu"

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Rollout:
        pad = self.tokenizer.pad_token_id
        ids, mask = pad_batch(prompts, pad, self.device, left=True)
        return generate(self.model, ids, mask, params, eos_ids(self.tokenizer, self.model), pad, seeds=seeds)


def sample_and_score(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    wheres: Sequence[str],
    reward_fns: RewardFunctions,
    params: SamplingParams,
    *,
    repeats: int,
    max_prompt_length: int,
    device: torch.device,
    seeds: Sequence[int] | None = None,
    interaction: Interaction | None = None,
) -> ScoredRollout:
    """Sample `repeats` completions per row (contiguous per prompt) with `engine` and score them with the reward
    functions; with an `interaction`, each sample is a multi-turn episode with its environment."""
    if interaction is not None:
        return _sample_episodes(engine, tokenizer, rows, reward_fns, params, repeats=repeats,
                                max_prompt_length=max_prompt_length, device=device, seeds=seeds,
                                interaction=interaction)  # fmt: skip
    prompt_ids = encode_prompts(rows, tokenizer, max_prompt_length, wheres)
    rollout = engine.generate([p for p in prompt_ids for _ in range(repeats)], params, seeds)
    comp_ids = rollout.completion_lists()
    texts = tokenizer.batch_decode(comp_ids, skip_special_tokens=True)
    rep_rows = [r for r in rows for _ in range(repeats)]
    prompts = [r["prompt"] for r in rep_rows]
    completions: list[Any] = [
        [{"role": "assistant", "content": t}] if not isinstance(p, str) else t for p, t in zip(prompts, texts)
    ]
    columns = {k: [r.get(k) for r in rep_rows] for k in rows[0]}  # the reward call passes what TRL passes
    raw = reward_fns.score(prompts, completions, comp_ids, columns)
    return ScoredRollout(rollout, prompts, completions, raw, reward_fns.combine(raw).to(device))


def _sample_episodes(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    reward_fns: RewardFunctions,
    params: SamplingParams,
    *,
    repeats: int,
    max_prompt_length: int,
    device: torch.device,
    seeds: Sequence[int] | None,
    interaction: Interaction,
) -> ScoredRollout:
    """`repeats` episodes per row, scored: the reward functions see the first messages as `prompts`, the turns
    that followed as `completions`, the environment instances as `environments` and the summed environment
    reward parts as `environment_reward`."""
    from alignrl.episodes import run_episodes

    rep_rows = [r for r in rows for _ in range(repeats)]
    eps = run_episodes(engine, tokenizer, interaction, rep_rows, params, max_prompt_length=max_prompt_length,
                       seeds=seeds, device=device)  # fmt: skip
    columns: dict[str, list] = {k: [r.get(k) for r in rep_rows] for k in rows[0]}
    columns["environments"] = eps.environments
    columns["environment_reward"] = [sum(p.values()) if p else None for p in eps.env_rewards]
    traj_ids = eps.rollout.completion_lists()
    raw = reward_fns.score(eps.prompts, eps.completions, traj_ids, columns)
    return ScoredRollout(eps.rollout, eps.prompts, eps.completions, raw, reward_fns.combine(raw).to(device), eps.stats)


@dataclass
class RowScores:
    """What `score_rows` returns, prompt-major (row i's samples at i * repeats ... i * repeats + repeats - 1)."""

    rewards: torch.Tensor  # [N * repeats] combined
    raw: torch.Tensor  # [N * repeats, F] per function, NaN where it did not apply
    lengths: torch.Tensor  # [N * repeats] completion tokens (up to and including EOS; sampled tokens only)
    completions: list[Any]  # as given to the reward functions
    prompts: list[Any] = field(default_factory=list)  # likewise (an episode's first messages)
    episode_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # multi-turn episodes only


def score_rows(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    reward_fns: RewardFunctions,
    params: SamplingParams,
    *,
    repeats: int = 1,
    batch_size: int = 64,
    max_prompt_length: int = 1024,
    device: torch.device | str = "cpu",
    seed: int = 0,
    wheres: Sequence[str] | None = None,
    first_index: int = 0,
    interaction: Interaction | None = None,
) -> RowScores:
    """`repeats` completions of every row, sampled in batches of about `batch_size` completions and scored. Sample
    j of row i draws its noise from (seed, first_index + i, j): the results depend neither on the batch size nor,
    when a data set is split over processes (first_index = the share's start), on the split."""
    device = torch.device(device)
    per_batch = max(1, batch_size // repeats)
    rewards, raws, lengths, prompts, completions, stats = [], [], [], [], [], []
    for s in range(0, len(rows), per_batch):
        idx = range(s, min(s + per_batch, len(rows)))
        where = [wheres[i] if wheres else f"row {i + 1}" for i in idx]
        scored = sample_and_score(
            engine, tokenizer, [rows[i] for i in idx], where, reward_fns, params,
            repeats=repeats, max_prompt_length=max_prompt_length, device=device,
            seeds=[seed * 1_000_003 + (first_index + i) * repeats + j for i in idx for j in range(repeats)],
            interaction=interaction,
        )  # fmt: skip
        rewards.append(scored.rewards.float().cpu())
        raws.append(scored.raw_rewards.float().cpu())
        lengths.append(scored.rollout.sampled_mask.sum(1).cpu())
        prompts += scored.prompts
        completions += scored.completions
        stats.append((scored.episode_stats, len(scored.rewards)))
    if not rewards:
        return RowScores(torch.zeros(0), torch.zeros(0, len(reward_fns.names)), torch.zeros(0, dtype=torch.long), [])
    return RowScores(
        torch.cat(rewards), torch.cat(raws), torch.cat(lengths), completions, prompts, merge_episode_stats(stats)
    )
