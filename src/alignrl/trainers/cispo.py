"""CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE with clipped, stop-gradient importance weights.

L = −Σ_t sg(clip(ρ_t, 1−ε_low, 1+ε_high))·Â_t·log π_θ(y_t) / Σ|y|, with GRPO's group advantages. Unlike PPO's clip,
no token loses its gradient (only its weight is bounded), which matters for the rare tokens that open a line of
reasoning; several updates per batch (num_iterations) stay stable. The loss is the "cispo" entry of POLICY_LOSSES;
everything else is GRPO's step on the online driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignrl.errors import AlignRLError
from alignrl.trainers import loop, online
from alignrl.trainers.grpo import GRPO, GRPOConfig


@dataclass
class CISPOConfig(GRPOConfig):
    """GRPO's options with the CISPO loss (as the paper: no lower bound on the weight, token-mean over the batch)."""

    policy_loss: str = "cispo"
    epsilon_low: float = 1.0  # weight ≥ 1 − ε_low = 0: no lower bound
    epsilon_high: float = 0.28  # weight ≤ 1 + ε_high
    loss_aggregation: str = "token_mean"

    def validate(self) -> None:
        super().validate()
        if self.policy_loss != "cispo":
            raise AlignRLError(f"policy_loss: cispo (use alignrl train grpo for {self.policy_loss!r})")


@loop.ends_run
def train(cfg: CISPOConfig) -> Path:
    """Run CISPO; returns the final model directory."""
    return online.train(cfg, GRPO(cfg))
