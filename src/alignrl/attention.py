"""Training-time attention for the policy: SDPA, except where CPU's bf16 SDPA backward is the slow part.

Under bf16 autocast on CPU, SDPA's backward ran at ~18 GFLOP/s here (14% of a 30M-parameter GRPO update for 2% of
its FLOPs); the same attention as two autocast matmuls and a float32 softmax took 10-19% less time per
micro-batch. That form keeps the [B, H, Lq, Lk] probabilities for backward, so it is used only while they are small
(`MATMUL_MAX_SCORES` elements per layer); anything else, and every no-grad or non-bf16 forward, is SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

TRAIN_ATTENTION = "alignrl_train"
MATMUL_MAX_SCORES = 1 << 22  # B·H·Lq·Lk: ≤ 32 MiB of saved scores and probabilities per layer


def _matmul_applies(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    B, H, Lq, _ = query.shape
    return (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not dropout
        and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sliding_window"))
        and B * H * Lq * key.shape[2] <= MATMUL_MAX_SCORES
    )


def train_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    """softmax(q·kᵀ·scaling + mask)·v: SDPA, or under CPU bf16 autocast with grad two matmuls (see module doc)."""
    if not _matmul_applies(query, key, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, is_causal=is_causal, **kwargs
        )
    B, H, Lq, D = query.shape
    Lk, rep = key.shape[2], H // key.shape[1]
    if rep > 1:  # grouped-query attention: KV head i serves query heads i·rep … i·rep + rep − 1
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else D**-0.5)
    if attention_mask is None:  # SDPA's is_causal form: no padding, causal mask implied
        attention_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril(Lk - Lq)
    mask = attention_mask[..., -Lk:]
    if mask.dtype == torch.bool:  # True = attend
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # finite: no NaN in masked rows
    else:
        scores = scores + mask
    probs = scores.float().softmax(-1)
    if mask.dtype == torch.bool:  # a query with nothing to attend to (left padding) outputs 0, as in SDPA
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    out = torch.matmul(probs, value)  # autocast: bf16
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TRAIN_ATTENTION, train_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(TRAIN_ATTENTION, sdpa_mask)
