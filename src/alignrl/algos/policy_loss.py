"""Policy losses (clipped: PPO / GRPO / DAPO / GSPO; CISPO), loss aggregations, clipped value loss, KL stats.

Token-level tensors are ``[B, T]`` with a 0/1 completion mask. Per-token outputs are exactly 0 at
masked-out positions (inputs there may be anything, including ±inf, without producing NaN).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignrl.algos.utils import masked_mean
from alignrl.errors import AlignRLError
from alignrl.registry import Registry

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "aggregate_loss",
    "approx_kl_stats",
    "cispo_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
]

# ρ from (per-token log-ratio, masked log π_θ, mask): the importance-sampling level of the clipped loss
IMPORTANCE_SAMPLING_LEVELS: Registry[Callable[[Tensor, Tensor, Tensor], Tensor]] = Registry("importance sampling")


@IMPORTANCE_SAMPLING_LEVELS.register("token")
def token_ratio(log_ratio: Tensor, lp: Tensor, mask: Tensor) -> Tensor:
    """ρ_t = exp(log π_θ(y_t) − log π_old(y_t))."""
    return torch.exp(log_ratio)


@IMPORTANCE_SAMPLING_LEVELS.register("sequence")
def sequence_ratio(log_ratio: Tensor, lp: Tensor, mask: Tensor) -> Tensor:
    """GSPO-token: s_i,t = sg[s_i]·exp(lp_t − sg[lp_t]), s_i = exp(mean_t log ρ_t); value s_i, gradient s_i·∇lp_t."""
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).detach()
    return torch.exp(seq_log_ratio).unsqueeze(-1) * torch.exp(lp - lp.detach())


# per-token policy losses: (logp, old_logp, advantages, mask, eps_low, eps_high, importance_sampling, dual_clip)
# -> (loss [B, T], detached stats [B, T])
POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, dict[str, Tensor]]]] = Registry("policy loss")


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _check_bt(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(f"{name} must be [B, T] like mask {tuple(mask.shape)}, got {tuple(x.shape)}")


def _check_clip_range(eps_low: float, eps_high: float) -> None:
    if eps_low < 0 or eps_high < 0:
        raise AlignRLError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")


def _token_advantages(advantages: Tensor, logp: Tensor) -> Tensor:
    """Advantages [B] (one per sequence) or [B, T] as detached [B, T] in logp's dtype."""
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        adv = advantages.unsqueeze(-1).expand_as(logp)
    elif advantages.shape == logp.shape:
        adv = advantages
    else:
        raise ValueError(
            f"advantages must be [B] or [B, T] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    return adv.detach().to(logp.dtype)


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    importance_sampling: str = "token",
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token L = −min(ρA, clip(ρ, 1−eps_low, 1+eps_high)A), optionally dual-clipped; [B, T], 0 off-mask.

    ``importance_sampling="token"``: ρ_t = exp(logp_t − old_logp_t) (PPO/GRPO; DAPO clip-higher via
    eps_high > eps_low). ``"sequence"`` (GSPO, arXiv 2507.18071): s_i = exp(masked mean_t (logp − old_logp)),
    clipped at the sequence level, in the GSPO-token form s_i,t = sg[s_i]·exp(logp_t − sg[logp_t]) whose value
    is s_i and whose gradient is s_i·∇logp_t; with a per-sequence advantage and "seq_mean_token_mean"
    aggregation this equals GSPO's gradient exactly.

    ``dual_clip=c`` (c > 1, Ye et al. 2020; verl's ``clip_ratio_c``), where A < 0: L = min(L, −c·A), a cap
    on the loss when ρ ≫ 1. (The shared algorithm notes write max(L, −c·A); that would replace the loss by the constant
    c·|A| whenever ρ < c, removing the gradient where it matters. The published dual clip is the cap, min.)

    `advantages` is [B] (shared by every token of a sequence) or [B, T]. Returns (loss, stats): stats are
    detached float [B, T] tensors "ratio", "is_low_clipped" (ρ < 1−eps_low and A < 0), "is_high_clipped"
    (ρ > 1+eps_high and A > 0), "is_clipped" (either) and "is_dual_clipped"; average them with masked_mean.
    """
    _check_bt("logp", logp, mask)
    _check_bt("old_logp", old_logp, mask)
    ratio_of = IMPORTANCE_SAMPLING_LEVELS[importance_sampling]
    _check_clip_range(eps_low, eps_high)
    if dual_clip is not None and dual_clip <= 1.0:
        raise AlignRLError(f"dual_clip must be > 1 (typically 3), got {dual_clip}")
    adv = _token_advantages(advantages, logp)
    valid = mask != 0
    zero = _zero(logp)
    # sanitise padded positions first: exp(±inf) there would give NaN gradients through the where below
    lp = torch.where(valid, logp, zero)
    log_ratio = torch.where(valid, logp - old_logp.detach(), zero)
    ratio = ratio_of(log_ratio, lp, mask)

    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    is_dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        cap = -dual_clip * adv
        is_dual = (adv < 0) & (loss > cap)
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
    loss = torch.where(valid, loss, zero)

    with torch.no_grad():
        r = ratio.detach()
        low = (r < 1.0 - eps_low) & (adv < 0) & valid
        high = (r > 1.0 + eps_high) & (adv > 0) & valid
        stats = {
            "ratio": torch.where(valid, r, zero),
            "is_low_clipped": low.to(logp.dtype),
            "is_high_clipped": high.to(logp.dtype),
            "is_clipped": (low | high).to(logp.dtype),
            "is_dual_clipped": (is_dual & valid).to(logp.dtype),
        }
    return loss, stats


@POLICY_LOSSES.register("cispo")
def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
    importance_sampling: str = "token",
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token CISPO L = −sg(clip(ρ_t, 1−eps_low, 1+eps_high))·A·log π_θ(y_t); [B, T], 0 off-mask.

    MiniMax-M1 (arXiv 2506.13585): the importance weight is clipped and detached, so every token keeps a gradient
    (only its weight is bounded); at ρ = 1 the gradient is REINFORCE's −A·∇log π. Token-level ratios only
    (`importance_sampling` must be "token"; `dual_clip` must be None). Stats as `clipped_policy_loss`, where
    "clipped" means the weight was clipped.
    """
    _check_bt("logp", logp, mask)
    _check_bt("old_logp", old_logp, mask)
    if importance_sampling != "token" or dual_clip is not None:
        raise AlignRLError("cispo: only token-level importance sampling and no dual_clip")
    _check_clip_range(eps_low, eps_high)
    adv = _token_advantages(advantages, logp)
    valid = mask != 0
    zero = _zero(logp)
    lp = torch.where(valid, logp, zero)
    ratio = torch.exp(torch.where(valid, logp - old_logp, zero)).detach()
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.where(valid, -weight * adv * lp, zero)
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & valid
        high = (ratio > 1.0 + eps_high) & valid
        stats = {
            "ratio": torch.where(valid, ratio, zero),
            "is_low_clipped": low.to(logp.dtype),
            "is_high_clipped": high.to(logp.dtype),
            "is_clipped": (low | high).to(logp.dtype),
            "is_dual_clipped": torch.zeros_like(lp),
        }
    return loss, stats


# scalar loss from per-token losses: (Σ-ready masked losses, mask, num_tokens, num_seqs, max_completion_length)
LOSS_AGGREGATIONS: Registry[Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(lm: Tensor, m: Tensor, n_tok: Tensor, n_seq: Tensor, length: int) -> Tensor:
    """DAPO: Σ_it m·L / num_tokens."""
    return lm.sum() / n_tok


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(lm: Tensor, m: Tensor, n_tok: Tensor, n_seq: Tensor, length: int) -> Tensor:
    """Original GRPO: Σ_i (Σ_t m·L / max(|y_i|, 1)) / num_seqs."""
    return (lm.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)).sum() / n_seq


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(lm: Tensor, m: Tensor, n_tok: Tensor, n_seq: Tensor, length: int) -> Tensor:
    """Dr. GRPO: Σ_it m·L / (num_seqs · max_completion_length)."""
    return lm.sum() / (n_seq * length)


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Scalar loss from [B, T] per-token losses with the LOSS_AGGREGATIONS entry `mode`.

    Defaults: num_tokens = valid tokens of this batch, num_seqs = rows of this batch (empty rows included,
    as in TRL), max_completion_length = T of this batch — pass the configured maximum so the value does not
    depend on padding. A caller that splits one batch into micro-batches (or ranks) passes the *global*
    num_tokens / num_seqs so that the sum of the micro-batch losses equals the full-batch loss. Rows with no
    valid token contribute 0, never NaN.
    """
    _check_bt("per_token", per_token, mask)
    fn = LOSS_AGGREGATIONS[mode]
    valid = mask != 0
    m = mask.to(per_token.dtype)
    lm = torch.where(valid, per_token * m, _zero(per_token))
    tiny = torch.finfo(per_token.dtype).tiny

    def count(x: float | Tensor | None, default: Tensor) -> Tensor:
        v = default if x is None else torch.as_tensor(x, dtype=per_token.dtype, device=per_token.device)
        return v.clamp(min=tiny)

    n_tok = count(num_tokens, m.sum())
    n_seq = count(num_seqs, torch.tensor(float(per_token.shape[0]), dtype=per_token.dtype, device=per_token.device))
    length = per_token.shape[-1] if max_completion_length is None else max_completion_length
    if length <= 0:
        raise AlignRLError(f"max_completion_length must be > 0, got {length}")
    return fn(lm, m, n_tok, n_seq, length)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """Per-token 0.5·max((V − R)², (clip(V, V_old − c, V_old + c) − R)²) and its clipped flag; 0 off-mask.

    The flag (float) is 1 where the clipped term is the larger one (verl's vf_clipfrac), so
    masked_mean(flag, mask) is the value clip fraction.
    """
    _check_bt("values", values, mask)
    _check_bt("old_values", old_values, mask)
    _check_bt("returns", returns, mask)
    if clip < 0:
        raise AlignRLError(f"value clip range must be >= 0, got {clip}")
    valid = mask != 0
    zero = _zero(values)
    v = torch.where(valid, values, zero)
    v_old = torch.where(valid, old_values.detach(), zero)
    ret = torch.where(valid, returns.detach(), zero)
    v_clipped = v_old + torch.clamp(v - v_old, -clip, clip)
    loss_unclipped = (v - ret) ** 2
    loss_clipped = (v_clipped - ret) ** 2
    loss = torch.where(valid, 0.5 * torch.maximum(loss_unclipped, loss_clipped), zero)
    clipped_frac = ((loss_clipped > loss_unclipped) & valid).to(values.dtype).detach()
    return loss, clipped_frac


def approx_kl_stats(logp: Tensor, old_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """{"approx_kl_k1": masked mean(−log ρ), "approx_kl_k3": masked mean((ρ − 1) − log ρ)}; detached."""
    _check_bt("logp", logp, mask)
    with torch.no_grad():
        log_ratio = torch.where(mask != 0, logp - old_logp, _zero(logp))
        return {
            "approx_kl_k1": masked_mean(-log_ratio, mask),
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
