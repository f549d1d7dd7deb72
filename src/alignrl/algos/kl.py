"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020).

With samples from π_θ and log-ratio l = log π_ref − log π_θ, each estimator is a per-token estimate of
KL(π_θ ‖ π_ref). All are exactly 0 where π_θ = π_ref. Differentiated as a loss on on-policy samples,
∇k2 matches ∇KL(π_θ ‖ π_ref) while ∇k3 matches the forward KL(π_ref ‖ π_θ).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignrl.registry import Registry

__all__ = ["KL_ESTIMATORS", "kl_estimate", "kl_k1", "kl_k2", "kl_k3"]


KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = −l = log π_θ − log π_ref (unbiased, high variance, can be negative)."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ l² with l = log π_ref − log π_θ (biased, low variance)."""
    return 0.5 * (ref_logp - logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(l) − l − 1 with l = log π_ref − log π_θ (unbiased, low variance, ≥ 0); via expm1."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate named by `estimator` ("k1", "k2" or "k3"); same shape as logp."""
    return KL_ESTIMATORS[estimator](logp, ref_logp)
