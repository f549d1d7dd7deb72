"""Advantage estimators: group-relative (GRPO and variants, RLOO), GAE (PPO) and return-to-go (REINFORCE++).

Group layout: rewards of one prompt's completions are contiguous, ``[p0g0, p0g1, …, p1g0, …]``.
Token-level inputs are ``[B, T]`` with a right-padded 0/1 completion mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from alignrl.algos.utils import whiten
from alignrl.errors import AlignRLError
from alignrl.registry import Registry

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_SCALES",
    "AdvantageInputs",
    "gae",
    "group_advantages",
    "reinforce_pp_returns",
    "rloo_advantages",
    "token_rewards",
]

GROUP_SCALES: tuple[str, ...] = ("group", "batch", "none")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise AlignRLError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise AlignRLError(
            f"group_size must be an integer >= 2 (a group of one has no baseline), got {group_size!r}"
        )
    if rewards.numel() % group_size != 0:
        raise AlignRLError(
            f"number of rewards ({rewards.numel()}) is not divisible by group_size ({group_size})"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    total: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Â_i = (r_i − mean_group) / (std + eps), std of the group ("group"), the batch ("batch") or 1 ("none").

    std is the *unbiased* (n − 1) standard deviation, torch.std's default, as in TRL's GRPOTrainer, so
    results match TRL. "none" is Dr. GRPO (no std division). A group whose rewards are all equal gets 0.
    With `total` (Σ over the parts of a batch split across processes, whole groups in each) the "batch" std
    is that of every part's rewards together.
    """
    if scale not in GROUP_SCALES:
        raise AlignRLError(f"unknown advantage scale {scale!r}; valid: {', '.join(GROUP_SCALES)}")
    grouped = _grouped(rewards, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        if total is None:
            return centred / (rewards.std() + eps)
        n = total(torch.tensor(float(rewards.numel()), dtype=rewards.dtype, device=rewards.device))
        mean = total(rewards.sum()) / n
        std = (total(((rewards - mean) ** 2).sum()) / (n - 1)).sqrt()
        return centred / (std + eps)
    return centred


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Â_i = r_i − mean_{j≠i} r_j (leave-one-out baseline within the group) = G/(G−1)·(r_i − mean)."""
    grouped = _grouped(rewards, group_size)
    loo_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - loo_mean).reshape(-1)


def _check_tokens(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(f"{name} must be [B, T] like mask {tuple(mask.shape)}, got {tuple(x.shape)}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """δ_t = r_t + γV_{t+1} − V_t, A_t = Σ_k (γλ)^k δ_{t+k}, R_t = A_t + V_t; V = 0 past the last valid token.

    `mask` is a 0/1 completion mask [B, T]; t+1 is the next *valid* position, so masked positions inside a sequence
    (another party's tokens in a multi-turn episode) are skipped, and everything after a sequence's last valid token
    bootstraps as 0. Returns (advantages,
    returns), both [B, T], zero outside the mask and not whitened. Not differentiable by design
    (computed under no_grad).
    """
    _check_tokens("rewards", rewards, mask)
    _check_tokens("values", values, mask)
    with torch.no_grad():
        m = mask.to(values.dtype)
        valid = mask != 0
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        r = torch.where(valid, rewards.to(values.dtype), zero)
        v = torch.where(valid, values, zero)
        T = r.shape[1]
        adv = torch.zeros_like(v)
        next_value = torch.zeros_like(v[:, 0])
        next_adv = torch.zeros_like(v[:, 0])
        for t in reversed(range(T)):
            delta = r[:, t] + gamma * next_value - v[:, t]
            a_t = delta + gamma * lam * next_adv
            adv[:, t] = torch.where(valid[:, t], a_t, zero)
            # what position t hands to the valid position before it; an invalid t passes on what it got
            next_value = torch.where(valid[:, t], v[:, t], next_value)
            next_adv = torch.where(valid[:, t], a_t, next_adv)
        returns = (adv + v) * m
    return adv, returns


def reinforce_pp_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = Σ_{k≥0} γ^k r_{t+k} over the valid tokens from t on (masked positions skipped); zero outside the mask."""
    _check_tokens("rewards", rewards, mask)
    with torch.no_grad():
        valid = mask != 0
        zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        r = torch.where(valid, rewards, zero)
        out = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
            out[:, t] = torch.where(valid[:, t], running, zero)
    return out


def token_rewards(scores: Tensor, mask: Tensor, kl_rewards: Tensor | None = None) -> Tensor:
    """r_t = kl_rewards_t (e.g. −β·kl_t) on valid tokens, plus the sequence's score at its last valid token."""
    m = mask.to(scores.dtype if kl_rewards is None else kl_rewards.dtype)
    rewards = torch.zeros_like(m) if kl_rewards is None else torch.where(m > 0, kl_rewards, torch.zeros_like(m))
    positions = torch.arange(m.shape[-1], device=m.device)
    last = torch.where(m > 0, positions, torch.zeros_like(positions)).amax(-1)  # (masked positions may be inside)
    has_tokens = (m.sum(-1) > 0).to(rewards.dtype)
    return rewards.scatter_add(1, last[:, None], (scores.to(rewards.dtype) * has_tokens)[:, None])


# ----------------------------------------------------------------------------- the registry


@dataclass
class AdvantageInputs:
    """What an advantage estimator may read: per-sequence scores and per-token tensors [B, T] of one batch."""

    scores: Tensor  # [B] sequence rewards, groups of `group_size` contiguous
    mask: Tensor  # [B, T] 0/1 completion mask
    group_size: int = 1
    kl_rewards: Tensor | None = None  # [B, T] per-token rewards besides the score (−β·kl_t); None: none
    values: Tensor | None = None  # [B, T] critic values (GAE)
    gamma: float = 1.0
    lam: float = 0.95
    scale: str = "group"  # group-relative std: "group", "batch" or "none"
    eps: float = 1e-4
    whiten_rewards: bool = False  # GAE: whiten the per-token rewards first (mean kept)
    total: Callable[[Tensor], Tensor] | None = None  # Σ over processes when the batch is split across them


AdvantageEstimator = Callable[[AdvantageInputs], tuple[Tensor, Tensor]]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def _per_token(adv: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    out = adv[:, None].expand(mask.shape)
    return out, out


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_estimator(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Â_i,t = (r_i − mean_group r) / (std + eps) at every token of completion i; returns = advantages."""
    return _per_token(group_advantages(x.scores, x.group_size, x.scale, x.eps, x.total), x.mask)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_estimator(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Â_i,t = r_i − mean_{j≠i} r_j (leave-one-out within the group) at every token; returns = advantages."""
    return _per_token(rloo_advantages(x.scores, x.group_size), x.mask)


@ADVANTAGE_ESTIMATORS.register("gae")
def gae_estimator(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """GAE(γ, λ) on r_t = kl_rewards_t + score at the last token, then A whitened over the batch; R = A + V."""
    if x.values is None:
        raise AlignRLError("advantage estimator 'gae' needs critic values")
    rewards = token_rewards(x.scores, x.mask, x.kl_rewards)
    if x.whiten_rewards:
        rewards = whiten(rewards, x.mask, shift_mean=False, total=x.total) * x.mask
    adv, returns = gae(rewards, x.values, x.mask, x.gamma, x.lam)
    return whiten(adv, x.mask, total=x.total) * x.mask, returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_estimator(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE++: G_t = Σ_{s≥t} γ^{s−t} r_s on r_t = kl_rewards_t + score at the last token, whitened over the
    batch's valid tokens; returns = G."""
    returns = reinforce_pp_returns(token_rewards(x.scores, x.mask, x.kl_rewards), x.mask, x.gamma)
    return whiten(returns, x.mask, total=x.total) * x.mask, returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline_estimator(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: scores minus their group mean, then REINFORCE++ (return-to-go, batch whitening)."""
    grouped = _grouped(x.scores, x.group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    returns = reinforce_pp_returns(token_rewards(centred, x.mask, x.kl_rewards), x.mask, x.gamma)
    return whiten(returns, x.mask, total=x.total) * x.mask, returns
