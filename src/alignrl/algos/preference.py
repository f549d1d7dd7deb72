"""Pairwise preference losses: the DPO family (DPO/cDPO, robust, IPO, hinge, SimPO, ORPO) and Bradley–Terry.

Inputs are per-pair [B] tensors. Log-probs are *summed* over completion tokens; lengths are completion
token counts (clamped to >= 1, so an empty completion gives a finite value rather than NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignrl.errors import AlignRLError

__all__ = ["PREFERENCE_LOSSES", "REFERENCE_FREE_LOSSES", "bradley_terry_loss", "log1mexp", "preference_loss"]

PREFERENCE_LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE_LOSSES: tuple[str, ...] = ("simpo", "orpo")
_SMOOTHED: tuple[str, ...] = ("sigmoid", "robust", "simpo")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stably: log(−expm1(x)) near 0, log1p(−exp(x)) below −ln 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    """(1 − ε)(−log σ(z)) + ε(−log σ(−z)); ε = 0 is plain −log σ(z)."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def preference_loss(
    loss_type: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss [B] and implicit rewards (chosen [B], rejected [B]) for `loss_type` in PREFERENCE_LOSSES.

    With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] (summed log-probs):
    - "sigmoid" (DPO; cDPO with label_smoothing ε): (1−ε)(−log σ(βh)) + ε(−log σ(−βh)).
    - "robust": [(1−ε)(−log σ(βh)) − ε(−log σ(−βh))] / (1 − 2ε), ε < 0.5.
    - "ipo": (h̄ − 1/(2β))² with h̄ built from per-token averaged log-probs (logp / length, policy and ref).
    - "hinge" (SLiC): relu(1 − βh).
    - "simpo" (no reference): −log σ(β·logp_w/|y_w| − β·logp_l/|y_l| − simpo_gamma), label smoothing as cDPO.
    - "orpo" (no reference): −logp_w/|y_w| + λ·(−log σ(log odds_w − log odds_l)), log odds = x − log(1 − eˣ)
      with x the mean token log-prob, λ = orpo_lambda, or beta when None (TRL uses beta as λ). The NLL term is
      per pair (TRL averages it over all chosen tokens of the batch instead).

    Implicit rewards (detached, for logging): β·(log π − log π_ref) with summed log-probs for the
    reference-based types (IPO included, although its loss uses averaged log-probs); β·logp/|y| for simpo
    and orpo, as TRL logs them. label_smoothing is only accepted for sigmoid, robust and simpo.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise AlignRLError(
            f"unknown preference loss_type {loss_type!r}; valid: {', '.join(PREFERENCE_LOSSES)}"
        )
    if not beta > 0:
        raise AlignRLError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise AlignRLError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type not in _SMOOTHED:
        raise AlignRLError(
            f"label_smoothing={label_smoothing} has no effect with loss_type {loss_type!r}; "
            f"it applies to {', '.join(_SMOOTHED)}"
        )
    if loss_type == "robust" and label_smoothing >= 0.5:
        raise AlignRLError("robust DPO needs label_smoothing < 0.5 (it divides by 1 − 2ε)")

    pw, pl = policy_chosen_logps, policy_rejected_logps
    len_w = chosen_lengths.to(pw.dtype).clamp(min=1.0)
    len_l = rejected_lengths.to(pl.dtype).clamp(min=1.0)

    if loss_type in REFERENCE_FREE_LOSSES:
        avg_w, avg_l = pw / len_w, pl / len_l
        if loss_type == "simpo":
            losses = _smoothed_sigmoid(beta * (avg_w - avg_l) - simpo_gamma, label_smoothing)
        else:
            lam = beta if orpo_lambda is None else orpo_lambda
            # mean log-prob must be < 0 for finite odds; only an exact 0 (P = 1) is nudged
            x_w = avg_w.clamp(max=-torch.finfo(pw.dtype).eps)
            x_l = avg_l.clamp(max=-torch.finfo(pl.dtype).eps)
            log_odds = (x_w - log1mexp(x_w)) - (x_l - log1mexp(x_l))
            losses = -avg_w - lam * F.logsigmoid(log_odds)
        return losses, (beta * avg_w).detach(), (beta * avg_l).detach()

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise AlignRLError(
            f"loss_type {loss_type!r} needs reference log-probs (ref_chosen_logps and ref_rejected_logps); "
            f"reference-free types: {', '.join(REFERENCE_FREE_LOSSES)}"
        )
    rw, rl = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    chosen_rewards = (beta * (pw - rw)).detach()
    rejected_rewards = (beta * (pl - rl)).detach()
    h = (pw - rw) - (pl - rl)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * h, label_smoothing)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:  # ipo
        h_avg = (pw / len_w - rw / len_w) - (pl / len_l - rl / len_l)
        losses = (h_avg - 1.0 / (2.0 * beta)) ** 2
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None, center_coef: float = 0.0
) -> Tensor:
    """mean(−log σ(r_c − r_r − margin)) + center_coef·mean((r_c + r_r)²); scalar."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss
