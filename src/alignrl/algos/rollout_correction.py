"""Importance-sampling correction for the sampler–trainer mismatch (TRL's `vllm_importance_sampling_*`, verl's
rollout correction).

The sampler (an inference engine's kernels, or the native decoder in bf16) draws y from π_sampler, while the
update assumes π_old, the trainer's own distribution at the same weights. Each token's loss is weighted by
w = π_old / π_sampler, computed per token (ρ_t = exp(log π_old(y_t) − log π_sampler(y_t))) or per sequence
(ρ = exp Σ_t of the same), then bounded by [c_min, c_max]: truncated (clamped into the range) or masked (0 outside
the range, ρ inside). The weight is a constant in the loss (no gradient). log ρ is capped at 20 (ρ ≤ 4.9e8) so
that an unbounded range still gives finite weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignrl.registry import Registry

__all__ = ["ROLLOUT_CORRECTIONS", "importance_log_ratio", "mismatch_metrics"]

# (old_logp, sampler_logp, mask, c_min, c_max) -> weights [B, T] (0 off the mask)
MAX_LOG_RATIO = 20.0
Correction = Callable[[Tensor, Tensor, Tensor, float | None, float | None], Tensor]
ROLLOUT_CORRECTIONS: Registry[Correction] = Registry("rollout correction")


def importance_log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, sequence: bool) -> Tensor:
    """log ρ_t = log π_old(y_t) − log π_sampler(y_t) on valid tokens (0 where the sampler gave no value: NaN), or
    per sequence log ρ = Σ_t log ρ_t as [B, 1]."""
    diff = torch.where(mask.bool() & ~sampler_logp.isnan(), old_logp - sampler_logp, torch.zeros_like(old_logp))
    return (diff.sum(-1, keepdim=True) if sequence else diff).clamp(max=MAX_LOG_RATIO)


def _truncate(log_ratio: Tensor, mask: Tensor, c_min: float | None, c_max: float | None) -> Tensor:
    weight = torch.exp(log_ratio)
    if c_min is not None or c_max is not None:
        weight = weight.clamp(min=c_min, max=c_max)
    weight = weight.expand_as(mask)
    return torch.where(mask.bool(), weight, torch.zeros_like(weight))


def _mask(log_ratio: Tensor, mask: Tensor, c_min: float | None, c_max: float | None) -> Tensor:
    ratio = torch.exp(log_ratio)
    low = c_min if c_min is not None else -torch.inf
    high = c_max if c_max is not None else torch.inf
    weight = torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio)).expand_as(mask)
    return torch.where(mask.bool(), weight, torch.zeros_like(weight))


FORMULAS = {
    "token_truncate": "w_t = clip(ρ_t, c_min, c_max) on every valid token.",
    "token_mask": "w_t = ρ_t if c_min ≤ ρ_t ≤ c_max else 0.",
    "sequence_truncate": "w_t = clip(ρ, c_min, c_max) on every valid token of the sequence, ρ = Π_t ρ_t.",
    "sequence_mask": "w_t = ρ if c_min ≤ ρ ≤ c_max else 0 (the whole sequence masked), ρ = Π_t ρ_t.",
}


def _correction(name: str) -> Correction:
    """The registered weight function `name` (level_bound), its formula as its docstring."""
    sequence, bound = name.startswith("sequence"), _truncate if name.endswith("truncate") else _mask

    def weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, c_min: float | None, c_max: float | None):
        return bound(importance_log_ratio(old_logp, sampler_logp, mask, sequence), mask, c_min, c_max)

    weights.__name__, weights.__doc__ = name, FORMULAS[name]
    return weights


for _name in FORMULAS:
    ROLLOUT_CORRECTIONS.add(_name, _correction(_name))


def mismatch_metrics(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """Sums over valid tokens (the caller divides by the token count, over every process): the k1 and k3
    estimates of KL(π_sampler ‖ π_old) per token, |Δ log p|, the raw ratio ρ_t and the weight; and the largest ρ_t
    and the count of zero weights (masked tokens)."""
    m = mask.bool() & ~sampler_logp.isnan()
    log_ratio = torch.where(m, old_logp - sampler_logp, torch.zeros_like(old_logp))
    ratio = torch.exp(log_ratio)
    return {
        "kl_k1": (-log_ratio * m).sum(),  # E_sampler[log π_sampler − log π_old]
        "kl_k3": ((ratio - 1 - log_ratio) * m).sum(),
        "abs_logp_diff": (log_ratio.abs() * m).sum(),
        "ratio": (ratio * m).sum(),
        "weight": (weights * m).sum(),
        "masked": ((weights == 0) & m).sum().to(old_logp.dtype),
        "ratio_max": (ratio * m).max() if m.any() else torch.zeros((), dtype=old_logp.dtype),
    }
