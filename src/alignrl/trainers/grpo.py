"""GRPO and its variants (DAPO, Dr. GRPO, GSPO, RLOO): group-relative advantages, no critic.

One step (the online driver, trainers/online.py): sample G completions for each of `prompts_per_step` prompts,
score them, normalise rewards within each group into advantages, then take `num_iterations` clipped
policy-gradient updates on that batch, with an optional KL penalty to the reference in the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from alignrl.algos.advantages import ADVANTAGE_ESTIMATORS, GROUP_SCALES, AdvantageInputs
from alignrl.algos.kl import KL_ESTIMATORS, kl_estimate
from alignrl.algos.policy_loss import LOSS_AGGREGATIONS, POLICY_LOSSES, aggregate_loss
from alignrl.algos.utils import masked_mean
from alignrl.errors import AlignRLError
from alignrl.rollout import ScoredRollout, concat_rollouts, select_rollouts
from alignrl.trainers import loop, online


@dataclass
class GRPOConfig(online.OnlineConfig):
    """GRPO options on top of the shared ones (defaults follow TRL where it has the option)."""

    learning_rate: float = 1e-6
    advantage_estimator: str = "grpo"  # ADVANTAGE_ESTIMATORS: grpo, rloo, reinforce_pp, reinforce_pp_baseline
    scale_rewards: str = "group"  # group, batch or none (Dr. GRPO)
    policy_loss: str = "clipped"  # POLICY_LOSSES: clipped (PPO/GRPO/DAPO/GSPO) or cispo
    loss_aggregation: str = "token_mean"  # token_mean, seq_mean_token_mean, seq_mean_token_sum_norm
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    importance_sampling: str = "token"  # token or sequence (GSPO)
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    kl_estimator: str = "k3"  # k1, k2, k3
    num_iterations: int = 1  # policy updates per rollout batch
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample to refill
    dynamic_sampling_max_rounds: int = 4
    overlong_cache: int = 0  # > 0 adds DAPO's soft overlong penalty with this cache length

    MIN_GENERATIONS: ClassVar[int] = 2

    def validate(self) -> None:
        super().validate()
        ADVANTAGE_ESTIMATORS.check("advantage_estimator", self.advantage_estimator)
        if self.advantage_estimator == "gae":
            raise AlignRLError("advantage_estimator: gae needs a critic (alignrl train ppo)")
        if self.scale_rewards not in GROUP_SCALES:
            raise AlignRLError(f"scale_rewards: choose from {', '.join(GROUP_SCALES)}, got {self.scale_rewards!r}")
        POLICY_LOSSES.check("policy_loss", self.policy_loss)
        LOSS_AGGREGATIONS.check("loss_aggregation", self.loss_aggregation)
        KL_ESTIMATORS.check("kl_estimator", self.kl_estimator)
        if self.importance_sampling not in ("token", "sequence"):
            raise AlignRLError(f"importance_sampling: token or sequence, got {self.importance_sampling!r}")
        if self.policy_loss == "cispo" and self.importance_sampling != "token":
            raise AlignRLError("importance_sampling: cispo weighs tokens (importance_sampling=token)")
        if self.num_iterations < 1 or self.dynamic_sampling_max_rounds < 1:
            raise AlignRLError("num_iterations and dynamic_sampling_max_rounds: must be ≥ 1")
        if not 0 <= self.overlong_cache < self.max_completion_length:
            raise AlignRLError("overlong_cache: must be in [0, max_completion_length)")


class GRPO(online.OnlineAlgorithm):
    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig):
        super().__init__(cfg)
        self.epochs = cfg.num_iterations

    def reference_model(self) -> str | None:
        return self.cfg.model if self.cfg.beta > 0 else None

    def extra_rewards(self) -> list[tuple[str, Any]]:
        if self.cfg.overlong_cache <= 0:
            return []
        from alignrl.rewards.math import overlong_penalty_factory

        return [("overlong_penalty", overlong_penalty_factory(self.cfg.max_completion_length, self.cfg.overlong_cache))]

    def sample(self, stream: Iterator[list[int]], step: int) -> tuple[ScoredRollout, dict[str, float]]:
        """With dynamic sampling keep only groups with reward spread, sampling further batches to refill."""
        cfg, G = self.cfg, self.cfg.num_generations
        if not cfg.dynamic_sampling:
            return super().sample(stream, step)
        kept: list[ScoredRollout] = []
        n_groups, dropped, rounds = 0, 0, 0
        while n_groups < cfg.prompts_per_step and rounds < cfg.dynamic_sampling_max_rounds:
            scored = self.ctx.sample(next(stream), getattr(stream, "consumed", rounds))
            rounds += 1
            spread = scored.rewards.view(-1, G).std(dim=1) > 0
            dropped += int((~spread).sum())
            kept.append(select_rollouts(scored, spread.repeat_interleave(G)))
            n_groups += int(spread.sum())
        merged = concat_rollouts(kept, self.ctx.tokenizer.pad_token_id)
        keep = torch.arange(merged.rewards.numel() // G) < min(n_groups, cfg.prompts_per_step)
        metrics = {"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/rounds": float(rounds)}
        return select_rollouts(merged, keep.repeat_interleave(G)), metrics

    def multi_process_error(self, mode: str) -> str | None:
        return "dynamic_sampling is not supported in multi-process runs yet" if self.cfg.dynamic_sampling else None

    def prepare(self, batch: online.RolloutBatch, timer: loop.Timer) -> None:
        if self.cfg.mask_truncated_completions:
            batch.loss_mask = batch.loss_mask * (~batch.truncated).float()[:, None]
        batch.advantages = ADVANTAGE_ESTIMATORS[self.cfg.advantage_estimator](self.advantage_inputs(batch))[0]

    def advantage_inputs(self, batch: online.RolloutBatch) -> AdvantageInputs:
        return AdvantageInputs(
            batch.scores, batch.loss_mask, batch.group_size, scale=self.cfg.scale_rewards, total=batch.global_sum
        )

    def kl_in_loss(self) -> bool:
        """β·KL to the reference in the loss (the alternative: in the reward)."""
        return self.cfg.beta > 0

    def loss(self, out: online.Forward, mb: online.RolloutBatch, norms: online.Norms) -> tuple[Tensor, dict]:
        cfg, m = self.cfg, mb.loss_mask
        per_tok, st = POLICY_LOSSES[cfg.policy_loss](
            out.logp, mb.old_logp, mb.advantages, m, eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high,
            importance_sampling=cfg.importance_sampling,
        )  # fmt: skip
        per_tok = mb.is_weighted(per_tok)
        stats = {f"clip/{k[3:]}": masked_mean(st[k], m) for k in ("is_low_clipped", "is_high_clipped", "is_clipped")}
        if self.kl_in_loss() and mb.ref_logp is not None:
            kl = kl_estimate(out.logp, mb.ref_logp, cfg.kl_estimator)
            per_tok = per_tok + cfg.beta * kl
            stats["kl"] = masked_mean(kl.detach(), m)
        loss = aggregate_loss(
            per_tok, m, cfg.loss_aggregation, num_tokens=norms.num_tokens, num_seqs=norms.num_seqs,
            max_completion_length=norms.max_completion_length,
        )  # fmt: skip
        return loss, stats



@loop.ends_run
def train(cfg: GRPOConfig) -> Path:
    """Run GRPO; returns the final model directory."""
    return online.train(cfg, GRPO(cfg))
