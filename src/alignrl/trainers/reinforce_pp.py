"""REINFORCE++ and REINFORCE++-baseline (arXiv 2501.03262): a critic-free policy gradient with token-level returns.

REINFORCE++: per-token reward r_t = −β·k1_t (KL to the reference, in the reward) plus the score at the last token;
return-to-go G_t = Σ_{s≥t} γ^{s−t} r_s; advantages = G whitened over every valid token of the global batch; PPO's
clipped surrogate. No group is needed (num_generations may be 1). REINFORCE++-baseline subtracts each group's mean
score first and puts the KL in the loss instead. Everything else is GRPO's step on the online driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from alignrl.algos.advantages import AdvantageInputs
from alignrl.algos.kl import kl_estimate
from alignrl.errors import AlignRLError
from alignrl.trainers import loop, online
from alignrl.trainers.grpo import GRPO, GRPOConfig

VARIANTS = ("reinforce_pp", "reinforce_pp_baseline")


@dataclass
class ReinforcePPConfig(GRPOConfig):
    """REINFORCE++ options on top of GRPO's (defaults follow OpenRLHF's REINFORCE++ recipe)."""

    advantage_estimator: str = "reinforce_pp"  # or reinforce_pp_baseline
    beta: float = 0.01  # KL coefficient: k1 in the reward (reinforce_pp), kl_estimator in the loss (-baseline)
    gamma: float = 1.0  # discount of the return-to-go

    MIN_GENERATIONS: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        if self.advantage_estimator not in VARIANTS:
            raise AlignRLError(f"advantage_estimator: {' or '.join(VARIANTS)}, got {self.advantage_estimator!r}")
        if self.advantage_estimator == "reinforce_pp_baseline" and self.num_generations < 2:
            raise AlignRLError("num_generations: reinforce_pp_baseline subtracts the group mean; needs ≥ 2")
        if not 0 < self.gamma <= 1:
            raise AlignRLError(f"gamma: must be in (0, 1], got {self.gamma}")


class ReinforcePP(GRPO):
    cfg: ReinforcePPConfig

    def kl_in_reward(self) -> bool:
        return self.cfg.beta > 0 and self.cfg.advantage_estimator == "reinforce_pp"

    def kl_in_loss(self) -> bool:
        return self.cfg.beta > 0 and not self.kl_in_reward()

    def advantage_inputs(self, batch: online.RolloutBatch) -> AdvantageInputs:
        inputs = super().advantage_inputs(batch)
        inputs.gamma = self.cfg.gamma
        if self.kl_in_reward():
            assert batch.ref_logp is not None
            batch.extra["kl"] = kl_estimate(batch.old_logp, batch.ref_logp, "k1") * batch.loss_mask
            inputs.kl_rewards = -self.cfg.beta * batch.extra["kl"]
        return inputs

    def metrics(self, batch: online.RolloutBatch, stats: dict[str, float]) -> dict[str, float]:
        if "kl" in batch.extra:  # the sampled policy's k1 KL per token, as it entered the reward
            stats["kl"] = batch.token_mean(batch.extra["kl"])
        return stats


@loop.ends_run
def train(cfg: ReinforcePPConfig) -> Path:
    """Run REINFORCE++; returns the final model directory."""
    return online.train(cfg, ReinforcePP(cfg))
