"""Pairwise preference losses: the DPO family (DPO/cDPO, robust, IPO, hinge, SimPO, ORPO) and Bradley–Terry.

Inputs are per-pair [B] tensors. Log-probs are *summed* over completion tokens; lengths are completion
token counts (clamped to >= 1, so an empty completion gives a finite value rather than NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignrl.errors import AlignRLError
from alignrl.registry import Registry

__all__ = ["PREFERENCE_LOSSES", "REFERENCE_FREE_LOSSES", "bradley_terry_loss", "log1mexp", "preference_loss"]


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stably: log(−expm1(x)) near 0, log1p(−exp(x)) below −ln 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    """(1 − ε)(−log σ(z)) + ε(−log σ(−z)); ε = 0 is plain −log σ(z)."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


@dataclass
class PairLogps:
    """Summed completion log-probs of a batch of pairs [B] (policy; reference None for reference-free losses)."""

    chosen: Tensor
    rejected: Tensor
    len_chosen: Tensor  # completion lengths, ≥ 1
    len_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def margin(self) -> Tensor:
        """h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)  # type: ignore[operator]


@dataclass(frozen=True)
class PreferenceLoss:
    fn: Callable[[PairLogps, float, float, float, float], Tensor]  # (logps, β, ε, simpo_gamma, orpo λ) -> [B]
    reference_free: bool = False
    label_smoothing: bool = False  # accepts label_smoothing ε


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss_type")


def _register(name: str, reference_free: bool = False, label_smoothing: bool = False):
    def add(fn: Callable[[PairLogps, float, float, float, float], Tensor]):
        PREFERENCE_LOSSES.add(name, PreferenceLoss(fn, reference_free, label_smoothing))
        return fn

    return add


@_register("sigmoid", label_smoothing=True)
def dpo_loss(x: PairLogps, beta: float, eps: float, gamma: float, lam: float) -> Tensor:
    """DPO (cDPO with ε): (1−ε)(−log σ(βh)) + ε(−log σ(−βh))."""
    return _smoothed_sigmoid(beta * x.margin(), eps)


@_register("ipo")
def ipo_loss(x: PairLogps, beta: float, eps: float, gamma: float, lam: float) -> Tensor:
    """IPO: (h̄ − 1/(2β))² with h̄ from per-token averaged log-probs (policy and reference)."""
    rw, rl, lw, ll = x.ref_chosen, x.ref_rejected, x.len_chosen, x.len_rejected
    h_avg = (x.chosen / lw - rw / lw) - (x.rejected / ll - rl / ll)  # type: ignore[operator]
    return (h_avg - 1.0 / (2.0 * beta)) ** 2


@_register("hinge")
def hinge_loss(x: PairLogps, beta: float, eps: float, gamma: float, lam: float) -> Tensor:
    """SLiC: relu(1 − βh)."""
    return torch.relu(1.0 - beta * x.margin())


@_register("robust", label_smoothing=True)
def robust_loss(x: PairLogps, beta: float, eps: float, gamma: float, lam: float) -> Tensor:
    """Robust DPO: [(1−ε)(−log σ(βh)) − ε(−log σ(−βh))] / (1 − 2ε), ε < 0.5."""
    h = x.margin()
    return (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)


@_register("simpo", reference_free=True, label_smoothing=True)
def simpo_loss(x: PairLogps, beta: float, eps: float, gamma: float, lam: float) -> Tensor:
    """SimPO (no reference): −log σ(β·logp_w/|y_w| − β·logp_l/|y_l| − γ), label smoothing as cDPO."""
    return _smoothed_sigmoid(beta * (x.chosen / x.len_chosen - x.rejected / x.len_rejected) - gamma, eps)


@_register("orpo", reference_free=True)
def orpo_loss(x: PairLogps, beta: float, eps: float, gamma: float, lam: float) -> Tensor:
    """ORPO (no reference): −logp_w/|y_w| + λ·(−log σ(log odds_w − log odds_l)), log odds = m − log(1 − eᵐ) with m
    the mean token log-prob (only an exact m = 0, P = 1, is nudged below 0)."""
    avg_w, avg_l = x.chosen / x.len_chosen, x.rejected / x.len_rejected
    x_w = avg_w.clamp(max=-torch.finfo(avg_w.dtype).eps)
    x_l = avg_l.clamp(max=-torch.finfo(avg_l.dtype).eps)
    log_odds = (x_w - log1mexp(x_w)) - (x_l - log1mexp(x_l))
    return -avg_w - lam * F.logsigmoid(log_odds)


REFERENCE_FREE_LOSSES: tuple[str, ...] = tuple(n for n in PREFERENCE_LOSSES if PREFERENCE_LOSSES[n].reference_free)


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
    """Per-pair loss [B] and implicit rewards (chosen [B], rejected [B]) of the PREFERENCE_LOSSES entry `loss_type`.

    Log-probs are summed over completion tokens. ORPO's λ is orpo_lambda, or beta when None (TRL uses beta as λ);
    its NLL term is per pair (TRL averages it over all chosen tokens of the batch instead). Implicit rewards
    (detached, for logging): β·(log π − log π_ref) with summed log-probs for the reference-based types (IPO
    included, although its loss uses averaged log-probs); β·logp/|y| for the reference-free ones, as TRL logs them.
    """
    spec = PREFERENCE_LOSSES[loss_type]
    if not beta > 0:
        raise AlignRLError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise AlignRLError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing != 0.0 and not spec.label_smoothing:
        smoothed = ", ".join(n for n in PREFERENCE_LOSSES if PREFERENCE_LOSSES[n].label_smoothing)
        raise AlignRLError(
            f"label_smoothing={label_smoothing} has no effect with loss_type {loss_type!r}; it applies to {smoothed}"
        )
    if loss_type == "robust" and label_smoothing >= 0.5:
        raise AlignRLError("robust DPO needs label_smoothing < 0.5 (it divides by 1 − 2ε)")
    pw, pl = policy_chosen_logps, policy_rejected_logps
    x = PairLogps(pw, pl, chosen_lengths.to(pw.dtype).clamp(min=1.0), rejected_lengths.to(pl.dtype).clamp(min=1.0))
    lam = beta if orpo_lambda is None else orpo_lambda
    if spec.reference_free:
        losses = spec.fn(x, beta, label_smoothing, simpo_gamma, lam)
        return losses, (beta * (pw / x.len_chosen)).detach(), (beta * (pl / x.len_rejected)).detach()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise AlignRLError(
            f"loss_type {loss_type!r} needs reference log-probs (ref_chosen_logps and ref_rejected_logps); "
            f"reference-free types: {', '.join(REFERENCE_FREE_LOSSES)}"
        )
    x.ref_chosen, x.ref_rejected = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    losses = spec.fn(x, beta, label_smoothing, simpo_gamma, lam)
    return losses, (beta * (pw - x.ref_chosen)).detach(), (beta * (pl - x.ref_rejected)).detach()


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
