"""PPO for RLHF: actor–critic with the KL to a frozen reference folded into a per-token reward.

One step (the online driver, trainers/online.py): sample completions for `prompts_per_step` prompts, score them
(reward model and/or reward functions, minus `missing_eos_penalty` for completions without EOS), build per-token
rewards r_t = −β·kl_t plus the score at the last token, compute GAE advantages and returns with the critic's
values, whiten the advantages, then run `num_ppo_epochs` passes over `num_mini_batches` shuffled minibatches of
clipped policy loss + vf_coef · clipped value loss. β is fixed or adapted toward a target KL (Ziegler et al.).
The recipe follows "The N Implementation Details of RLHF with PPO" (docs/algorithms.md, section PPO).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from alignrl.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
from alignrl.algos.kl import kl_estimate
from alignrl.algos.kl_control import AdaptiveKLController, FixedKLController
from alignrl.algos.policy_loss import approx_kl_stats, clipped_policy_loss, clipped_value_loss
from alignrl.algos.utils import masked_mean, masked_moments, masked_sum
from alignrl.errors import AlignRLError
from alignrl.trainers import loop, online
from alignrl.value_model import Critic, captured_hidden, values_from_logprob_pass


@dataclass
class PPOConfig(online.OnlineConfig):
    """PPO options on top of the shared ones (names follow TRL's PPOConfig where it has the option)."""

    learning_rate: float = 3e-6
    adam_epsilon: float = 1e-5
    # rollout
    prompts_per_step: int = 16  # distinct prompts per rollout batch
    num_generations: int = 1  # completions sampled per prompt
    max_completion_length: int = 64
    temperature: float = 0.7  # sampling temperature; log-probs use logits / temperature
    # scoring: reward-model directories and/or reward functions, as in GRPO, weighted and summed
    reward_funcs: list[str] = field(default_factory=list)
    missing_eos_penalty: float | None = None  # subtracted from the score of completions without EOS
    # critic
    critic: str = "separate"  # separate value model, or a head on the policy's trunk
    value_model: str | None = None  # critic init (separate): default = first reward-model dir in reward_funcs,
    # else the policy; a reward model keeps its score head, a causal LM gets a zero-initialised head
    save_value_model: bool = True  # write the trained critic to OUTPUT_DIR/value_model (or value_head.pt)
    # KL penalty in the reward
    kl_coef: float = 0.05  # β, the initial value when adaptive_kl
    kl_estimator: str = "k1"  # k1 or k3
    adaptive_kl: bool = False  # Ziegler et al. proportional controller toward kl_target
    kl_target: float = 6.0  # target KL (nats per sequence, the sum over completion tokens)
    kl_horizon: float = 10000.0  # controller horizon in samples
    whiten_rewards: bool = False  # whiten per-token rewards over valid tokens (mean kept)
    # advantages
    gamma: float = 1.0
    lam: float = 0.95
    # updates
    num_ppo_epochs: int = 4  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per pass (the batch is split into this many shuffled parts)
    cliprange: float = 0.2  # ε of the clipped policy loss
    cliprange_value: float = 0.2  # c_v of the clipped value loss
    dual_clip: float | None = None  # c > 1 caps the loss of negative-advantage tokens (typically 3)
    vf_coef: float = 0.1  # weight of the value loss

    RESUME_FIXED: ClassVar[tuple[str, ...]] = (*online.OnlineConfig.RESUME_FIXED, "critic", "value_model")

    def validate(self) -> None:
        super().validate()
        if not self.reward_funcs and not self.multi_turn:
            raise AlignRLError("reward_funcs: give at least one reward model directory or reward function")
        if self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
            raise AlignRLError("num_ppo_epochs and num_mini_batches: must be ≥ 1")
        if self.batch_size % self.num_mini_batches:
            raise AlignRLError(
                f"num_mini_batches: {self.num_mini_batches} does not divide the batch of "
                f"prompts_per_step × num_generations = {self.batch_size} sequences"
            )
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise AlignRLError("gamma must be in (0, 1] and lam in [0, 1]")
        if self.kl_coef < 0 or self.cliprange < 0 or self.cliprange_value < 0 or self.vf_coef < 0:
            raise AlignRLError("kl_coef, cliprange, cliprange_value and vf_coef must be ≥ 0")
        if self.adaptive_kl and (self.kl_coef <= 0 or self.kl_target <= 0 or self.kl_horizon <= 0):
            raise AlignRLError("adaptive_kl: needs kl_coef, kl_target and kl_horizon > 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise AlignRLError(f"dual_clip: must be > 1 (typically 3), got {self.dual_clip}")
        if self.critic not in ("separate", "shared"):
            raise AlignRLError(f"critic: separate or shared, got {self.critic!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise AlignRLError(f"kl_estimator: k1 or k3, got {self.kl_estimator!r}")
        if self.critic == "shared" and self.value_model:
            raise AlignRLError("value_model: only used with critic=separate (critic=shared is a head on the policy)")


# ----------------------------------------------------------------------------- the PPO math of one batch


def kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    """The β controller (its state_dict() is what a checkpoint needs)."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig,
    num_tokens: float | torch.Tensor,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Σ w·L_pg + vf_coef · Σ L_v) / num_tokens over valid tokens (w: the rollout-correction weight, 1 without),
    and detached masked-mean statistics.

    `num_tokens` is the minibatch's valid-token count, so summing the losses of its micro-batches gives the
    minibatch's token-mean loss.
    """
    pg, st = clipped_policy_loss(
        logp, old_logp, advantages, mask, cfg.cliprange, cfg.cliprange, dual_clip=cfg.dual_clip
    )
    vl, vclip = clipped_value_loss(values, old_values, returns, mask, cfg.cliprange_value)
    if is_weight is not None:
        pg = pg * is_weight
    loss = (masked_sum(pg, mask) + cfg.vf_coef * masked_sum(vl, mask)) / num_tokens
    ratio = st["ratio"]
    stats = {
        "policy_loss": masked_mean(pg.detach(), mask),
        "value_loss": masked_mean(vl.detach(), mask),
        "clipfrac": masked_mean(st["is_clipped"], mask),
        "dual_clipfrac": masked_mean(st["is_dual_clipped"], mask),
        "value_clipfrac": masked_mean(vclip, mask),
        "ratio": masked_mean(ratio, mask),
        **approx_kl_stats(logp.detach(), old_logp, mask),
    }
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, total: Callable | None = None) -> float:
    """1 − Var(R − V) / Var(R) over valid tokens (of every process's part with `total`)."""
    var_r = masked_moments(returns, mask, total)[1]
    return float(1 - masked_moments(returns - values, mask, total)[1] / var_r) if var_r > 0 else 0.0


# ----------------------------------------------------------------------------- the algorithm on the driver


class PPO(online.OnlineAlgorithm):
    cfg: PPOConfig
    shuffle = True

    def __init__(self, cfg: PPOConfig):
        super().__init__(cfg)
        self.epochs, self.minibatches = cfg.num_ppo_epochs, cfg.num_mini_batches
        self.kl_ctl = kl_controller(cfg)
        self.first: dict[str, float] | None = None

    def multi_process_error(self, mode: str) -> str | None:
        if mode == "fsdp" and self.cfg.critic == "shared":
            return "critic=shared with distributed=fsdp is not supported; use critic=separate or ddp"
        return None

    def reference_model(self) -> str | None:
        return self.cfg.model

    def setup(self) -> None:
        self.critic = Critic(self.cfg, self.ctx.model, self.ctx.run.device)
        self.critic.wrap(self.cfg.distributed, self.ctx.run.device)

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.ctx.model, self.critic.module])  # one optimiser and one gradient clip for both

    def synced_modules(self) -> list[nn.Module]:
        return [self.critic.wrapped]

    def state(self) -> dict[str, Any]:
        return {"critic": self.critic.module, "kl_ctl": self.kl_ctl}

    def prepare(self, batch: online.RolloutBatch, timer: loop.Timer) -> None:
        cfg, ctx, mask = self.cfg, self.ctx, batch.loss_mask
        if cfg.missing_eos_penalty is not None:
            batch.scores = batch.scores - cfg.missing_eos_penalty * batch.truncated.float()
        old_values = torch.zeros_like(mask)
        with timer("values"), torch.no_grad(), loop.autocast(cfg, ctx.run.device):
            for sel, w in batch.parts:
                mb = batch.select(sel)
                values = self.critic.values(ctx.policy, mb.input_ids, mb.attention_mask, mb.prompt_len, mb.loss_mask)
                if w:
                    old_values[sel] = values * mb.loss_mask
        assert batch.ref_logp is not None
        kl = kl_estimate(batch.old_logp, batch.ref_logp, cfg.kl_estimator) * mask
        self.beta = self.kl_ctl.value
        inputs = AdvantageInputs(
            batch.scores, mask, kl_rewards=-self.beta * kl, values=old_values, gamma=cfg.gamma, lam=cfg.lam,
            whiten_rewards=cfg.whiten_rewards, total=batch.global_sum,
        )  # fmt: skip
        batch.advantages, returns = ADVANTAGE_ESTIMATORS["gae"](inputs)
        batch.extra.update(old_values=old_values, returns=returns, kl=kl)
        self.first = None

    def forward(self, mb: online.RolloutBatch, with_entropy: bool) -> online.Forward:
        policy = self.ctx.policy
        with captured_hidden(self.ctx.model) as hidden:
            logp, ent = self.ctx.logprobs(policy, mb, with_entropy=with_entropy)
            if self.critic.head is not None:  # reuse the trunk pass the log-probs just made
                values = values_from_logprob_pass(
                    self.critic.wrapped, hidden[-1], mb.attention_mask, mb.loss_mask, start=mb.prompt_len
                )
            else:
                values = self.critic.values(policy, mb.input_ids, mb.attention_mask, mb.prompt_len, mb.loss_mask)
        return online.Forward(logp, ent, values)

    def loss(self, out: online.Forward, mb: online.RolloutBatch, norms: online.Norms) -> tuple[Tensor, dict]:
        x = mb.extra
        loss, stats = ppo_loss(
            out.logp, mb.old_logp, out.values, x["old_values"], mb.advantages, x["returns"], mb.loss_mask, self.cfg,
            norms.num_tokens, x.get("is_weight"),
        )  # fmt: skip
        if self.first is None:  # sanity: nothing has changed yet, so ρ = 1
            self.first = {f"policy/first_minibatch_{k}": float(stats[k]) for k in ("ratio", "approx_kl_k1", "clipfrac")}
        return loss, stats

    def metrics(self, batch: online.RolloutBatch, stats: dict[str, float]) -> dict[str, float]:
        mask, kl, total = batch.loss_mask, batch.extra["kl"], batch.total
        N = batch.num_seqs
        self.kl_ctl.update(total(float(kl.sum())) / N, N)  # the global batch's mean KL per sequence
        score_sum, nonscore_sum = total(float(batch.scores.sum())), total(float((-self.beta * kl).sum()))
        log_ratio = (batch.old_logp - batch.ref_logp) * mask  # type: ignore[operator]
        out = {
            "objective/scores": score_sum / N,
            "objective/non_score_reward": nonscore_sum / N,
            "objective/rlhf_reward": (score_sum + nonscore_sum) / N,
            "objective/kl": total(float(log_ratio.sum())) / N,
            "objective/kl_k3": total(float((kl_estimate(batch.old_logp, batch.ref_logp, "k3") * mask).sum())) / N,
            "objective/entropy": stats.get("entropy", 0.0),
            "kl_coef": self.beta,
            "loss/policy_avg": stats["policy_loss"],
            "loss/value_avg": stats["value_loss"],
            "policy/approxkl_avg": stats["approx_kl_k1"],
            "policy/approxkl_k3_avg": stats["approx_kl_k3"],
            "policy/clipfrac_avg": stats["clipfrac"],
            "policy/dual_clipfrac_avg": stats["dual_clipfrac"],
            "val/clipfrac_avg": stats["value_clipfrac"],
            "val/ratio": stats["ratio"],
            **(self.first or {}),
        }
        old_values, returns = batch.extra["old_values"], batch.extra["returns"]
        for name, x in (("returns", returns), ("values", old_values)):
            mean, var = masked_moments(x, mask, batch.global_sum)
            out[f"{name}/mean"], out[f"{name}/std"] = float(mean), float(var.sqrt())
        out["val/explained_variance"] = explained_variance(old_values, returns, mask, batch.global_sum)
        return out

    def save(self, out: Path) -> None:
        if self.cfg.save_value_model:
            self.critic.save(out, self.ctx.tokenizer)


@loop.ends_run
def train(cfg: PPOConfig) -> Path:
    """Run PPO; returns the final policy directory (the critic is saved next to it)."""
    return online.train(cfg, PPO(cfg))
