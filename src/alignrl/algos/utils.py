"""Masked reductions and whitening over the valid (mask != 0) tokens of a padded batch.

Masks are 0/1 (float or bool) tensors of the same shape as the data. Values at masked-out positions
never reach a result, even when they are inf or NaN (e.g. the log-prob of a pad token), and they
pass no NaN gradient back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["masked_mean", "masked_moments", "masked_sum", "masked_var", "whiten"]


def _check_mask(x: Tensor, mask: Tensor) -> None:
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match data shape {tuple(x.shape)}")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x·mask at valid positions, exactly 0 elsewhere (no inf·0 = NaN)."""
    _check_mask(x, mask)
    if mask.dtype == torch.bool:
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.where(mask != 0, x * mask.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))


def _count(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None) -> Tensor:
    m = mask.to(x.dtype)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ x·mask over `dim` (all dims when None)."""
    xm = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ x·mask / Σ mask over `dim` (all dims when None); 0 (not NaN) where the mask is empty."""
    total = masked_sum(x, mask, dim)
    count = _count(x, mask, dim)
    return total / count.clamp(min=torch.finfo(x.dtype).tiny)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Σ mask·(x − mean)² / n over all valid entries (n − 1 when unbiased; NaN if unbiased and n = 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _count(x, mask, None)
        var = var * n / (n - 1)
    return var


def masked_moments(x: Tensor, mask: Tensor, total: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of the valid entries; with `total` (Σ over the parts of a batch split across processes)
    of every part's valid entries together."""
    if total is None:
        return masked_mean(x, mask), masked_var(x, mask, unbiased=False)
    n = total(_count(x, mask, None)).clamp(min=torch.finfo(x.dtype).tiny)
    mean = total(masked_sum(x, mask)) / n
    return mean, total(masked_sum((x - mean) ** 2, mask)) / n


def whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    total: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(x − mean) / sqrt(var + eps) over valid entries, biased var; mean added back if not shift_mean.

    Same as TRL's ``masked_whiten``. Mean and variance use only the valid entries (of every part of the batch
    with `total`, see `masked_moments`), but the affine map is applied to every position: outputs at masked-out
    positions are meaningless and must be masked by the caller (they are not zeroed here).
    """
    mean, var = masked_moments(x, mask, total)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out
