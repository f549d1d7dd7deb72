"""Advantage estimators: group-relative (GRPO and variants, RLOO), GAE (PPO) and return-to-go (REINFORCE++).

Group layout: rewards of one prompt's completions are contiguous, ``[p0g0, p0g1, …, p1g0, …]``.
Token-level inputs are ``[B, T]`` with a right-padded 0/1 completion mask.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from alignrl.errors import AlignRLError

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_SCALES",
    "AdvantageEstimator",
    "gae",
    "group_advantages",
    "reinforce_pp_returns",
    "rloo_advantages",
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


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Â_i = (r_i − mean_group) / (std + eps), std of the group ("group"), the batch ("batch") or 1 ("none").

    std is the *unbiased* (n − 1) standard deviation, torch.std's default, as in TRL's GRPOTrainer, so
    results match TRL. "none" is Dr. GRPO (no std division). A group whose rewards are all equal gets 0.
    """
    if scale not in GROUP_SCALES:
        raise AlignRLError(f"unknown advantage scale {scale!r}; valid: {', '.join(GROUP_SCALES)}")
    grouped = _grouped(rewards, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    return centred


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Â_i = r_i − mean_{j≠i} r_j (leave-one-out baseline within the group) = G/(G−1)·(r_i − mean)."""
    grouped = _grouped(rewards, group_size)
    loo_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - loo_mean).reshape(-1)


class AdvantageEstimator(Protocol):
    """Uniform signature of the group-advantage registry entries."""

    def __call__(
        self, rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
    ) -> Tensor: ...


def _rloo_estimator(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """RLOO advantages r_i − mean_{j≠i} r_j; `scale` and `eps` are ignored."""
    return rloo_advantages(rewards, group_size)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": group_advantages,
    "rloo": _rloo_estimator,
}


def _check_tokens(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(f"{name} must be [B, T] like mask {tuple(mask.shape)}, got {tuple(x.shape)}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """δ_t = r_t + γV_{t+1} − V_t, A_t = Σ_k (γλ)^k δ_{t+k}, R_t = A_t + V_t; V = 0 past the last valid token.

    `mask` is a right-padded 0/1 completion mask [B, T]; the recursion stops at the first invalid position
    after t, so everything after a sequence's last valid token bootstraps as 0. Returns (advantages,
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
            a_t = (delta + gamma * lam * next_adv) * m[:, t]
            adv[:, t] = a_t
            # what position t hands to t−1: zero when t is invalid (bootstrap 0 past the end)
            next_value = v[:, t]
            next_adv = a_t
        returns = (adv + v) * m
    return adv, returns


def reinforce_pp_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = Σ_{k≥0} γ^k r_{t+k} over valid tokens (return-to-go, REINFORCE++); zero outside the mask."""
    _check_tokens("rewards", rewards, mask)
    with torch.no_grad():
        m = mask.to(rewards.dtype)
        r = torch.where(mask != 0, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
        out = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            running = (r[:, t] + gamma * running) * m[:, t]
            out[:, t] = running
    return out
