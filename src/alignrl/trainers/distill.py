"""On-policy distillation (GKD with λ = 1, arXiv 2306.13649): the student samples, the teacher grades every token.

y ~ π_θ; per-token reward r_t = −(log π_θ(y_t) − log π_T(y_t)), the sampled estimate of the reverse KL to the
teacher π_T at the student's own prefix (detached), used as the advantage of token t in a policy-gradient loss
(clipped when num_iterations > 1). Its expected gradient is that of KL(π_θ ‖ π_T) over the student's sampled
prefixes; it is 0 where π_θ = π_T. The teacher is an HF model directory with the student's tokenizer; reward
functions are optional and only logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import Tensor

from alignrl.algos.policy_loss import LOSS_AGGREGATIONS, aggregate_loss, clipped_policy_loss
from alignrl.algos.utils import masked_mean
from alignrl.errors import AlignRLError
from alignrl.models import unwrap
from alignrl.trainers import loop, online


@dataclass
class DistillConfig(online.OnlineConfig):
    """On-policy distillation options on top of the shared online ones."""

    teacher_model: str = ""  # HF directory (or .gguf) of the teacher; must share the student's vocabulary
    learning_rate: float = 1e-5
    num_generations: int = 1  # completions per prompt (no group is needed)
    reward_funcs: list[str] = field(default_factory=list)  # optional, logged only
    num_iterations: int = 1  # policy updates per rollout batch (clipped ratio beyond the first)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_aggregation: str = "token_mean"

    MIN_GENERATIONS: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        if not self.teacher_model:
            raise AlignRLError("teacher_model: give the teacher's model directory")
        LOSS_AGGREGATIONS.check("loss_aggregation", self.loss_aggregation)
        if self.num_iterations < 1:
            raise AlignRLError("num_iterations: must be ≥ 1")


class Distill(online.OnlineAlgorithm):
    cfg: DistillConfig
    rewards_required = False

    def __init__(self, cfg: DistillConfig):
        super().__init__(cfg)
        self.epochs = cfg.num_iterations

    def reference_model(self) -> str | None:
        return self.cfg.teacher_model  # batch.ref_logp holds the teacher's log-probs

    def setup(self) -> None:
        student, teacher = unwrap(self.ctx.model).config, unwrap(self.ctx.reference_lm()).config
        if student.vocab_size != teacher.vocab_size:
            raise AlignRLError(
                f"teacher_model: {self.cfg.teacher_model} has a vocabulary of {teacher.vocab_size} tokens, the student "
                f"{student.vocab_size}; on-policy distillation needs the same tokenizer"
            )

    def prepare(self, batch: online.RolloutBatch, timer: loop.Timer) -> None:
        assert batch.ref_logp is not None
        batch.advantages = -(batch.old_logp - batch.ref_logp) * batch.loss_mask  # r_t = −(log π_θ − log π_T)

    def loss(self, out: online.Forward, mb: online.RolloutBatch, norms: online.Norms) -> tuple[Tensor, dict]:
        cfg, m = self.cfg, mb.loss_mask
        per_tok, st = clipped_policy_loss(out.logp, mb.old_logp, mb.advantages, m, cfg.epsilon_low, cfg.epsilon_high)
        per_tok = mb.is_weighted(per_tok)
        loss = aggregate_loss(
            per_tok, m, cfg.loss_aggregation, num_tokens=norms.num_tokens, num_seqs=norms.num_seqs,
            max_completion_length=norms.max_completion_length,
        )  # fmt: skip
        return loss, {"clip/clipped": masked_mean(st["is_clipped"], m)}

    def metrics(self, batch: online.RolloutBatch, stats: dict[str, float]) -> dict[str, float]:
        stats["distill/reverse_kl"] = batch.token_mean(-batch.advantages)  # type: ignore[operator]  # (= −r_t)
        return stats


@loop.ends_run
def train(cfg: DistillConfig) -> Path:
    """Run on-policy distillation; returns the final (student) model directory."""
    return online.train(cfg, Distill(cfg))
