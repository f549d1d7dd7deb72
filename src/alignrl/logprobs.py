"""The one log-prob path: per-token log-probs (and entropy) of target tokens, chunked over the vocab projection.

The model's trunk produces hidden states; the lm-head projection, temperature scaling, log-softmax and
gather run over chunks of at most `chunk_tokens` valid target tokens, so the [tokens, vocab] float32 buffer
is bounded. Under autograd each chunk is recomputed in backward (activation checkpointing), so memory stays
bounded in training too. Only positions whose target is valid are projected at all, and the trunk skips the
columns no valid target needs (right padding after the last one, left padding common to the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignrl.models import unwrap


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """log softmax(W h / T)[target] for a chunk of hidden states [N, H]."""
    logits = F.linear(hidden, weight, bias).float() / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def _chunk_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """Entropy of softmax(W h / T) for a chunk (a metric: no gradient)."""
    logits = F.linear(hidden, weight, bias).float() / temperature
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _has_plain_lm_head(lm: nn.Module) -> bool:
    """True when logits are exactly lm_head(hidden): no soft-capping or scaling we would skip."""
    cfg = getattr(lm, "config", None)
    return (
        getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
        and hasattr(lm, getattr(lm, "base_model_prefix", ""))
        and isinstance(lm.get_output_embeddings(), nn.Linear)
    )


def needed_span(attention_mask: torch.Tensor, target_mask: torch.Tensor, start: int) -> tuple[int, int]:
    """[first, end): the input columns that the targets selected by `target_mask` ([B, L - start], scored from
    column `start`) need. Columns after the last selected target (right padding of completions shorter than the
    batch's longest) and before the first one any row attends to (left padding common to every prompt) change
    nothing scored: attention is causal and position ids count real tokens. Micro-batches of short completions
    then run a shorter forward and backward."""
    cols = target_mask.bool().any(0).nonzero()
    end = start + (int(cols[-1]) + 1 if cols.numel() else 1)
    first = min(int(attention_mask.bool().any(0).int().argmax()), start - 1)
    return first, end


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    start: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of input_ids[:, start:] under the model: logp[b, j] = log p(x_{start+j} | x_{<start+j}).

    `target_mask` [B, L - start] marks which targets to score; other positions are returned as 0.
    Logits are divided by `temperature` (the sampling temperature) before the softmax. Given the DDP/FSDP-wrapped
    policy (`distributed.PolicyLogProbs`), the call runs through the wrapper, so that DDP and FSDP see the forward.
    """
    wrapper = getattr(model, "module", model)
    if getattr(wrapper, "fn", None) is token_logprobs:
        kw = {"start": start, "temperature": temperature, "with_entropy": with_entropy, "chunk_tokens": chunk_tokens}
        return model(input_ids, attention_mask, target_mask, **kw)
    lm = unwrap(model)
    targets = input_ids[:, start:]
    sel = target_mask.bool()
    out = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    ent = torch.zeros_like(out) if with_entropy else None
    first, end = needed_span(attention_mask, sel, start)
    ids, attn, at = input_ids[:, first:end], attention_mask[:, first:end], start - first
    positions = position_ids_from_mask(attn)
    if _has_plain_lm_head(lm):
        trunk = getattr(lm, lm.base_model_prefix)
        # the lm head runs on the selected tokens only
        hidden = trunk(input_ids=ids, attention_mask=attn, position_ids=positions).last_hidden_state
        head = lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
    else:  # models with logit soft-capping/scaling: take their logits, still scored in chunks below
        hidden = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
        weight, bias = None, None
    kept = sel[:, : ids.shape[1] - at]  # the targets inside the kept columns: every selected one
    h = hidden[:, at - 1 : -1][kept]  # [N, H]: the state before each selected target
    t = targets[:, : kept.shape[1]][kept]
    pieces, ent_pieces = [], []
    n_chunks = max(1, -(-h.shape[0] // chunk_tokens))
    for hc, tc in zip(h.chunk(n_chunks), t.chunk(n_chunks)):
        if weight is None:
            lg = hc.float() / temperature
            pieces.append(lg.gather(-1, tc[:, None]).squeeze(-1) - lg.logsumexp(-1))
            if with_entropy:
                lp = lg.detach().log_softmax(-1)
                ent_pieces.append(-(lp.exp() * lp).sum(-1))
            continue
        if torch.is_grad_enabled() and n_chunks > 1:
            pieces.append(checkpoint(_chunk_logps, hc, tc, weight, bias, temperature, use_reentrant=False))
            if with_entropy:
                ent_pieces.append(_chunk_entropy(hc.detach(), weight, bias, temperature))
        elif with_entropy:  # one lm-head projection serves both the log-probs and the entropy
            lg = F.linear(hc, weight, bias).float() / temperature
            lse = lg.logsumexp(-1)
            pieces.append(lg.gather(-1, tc[:, None]).squeeze(-1) - lse)
            with torch.no_grad():
                lp = lg.detach() - lse.detach()[:, None]
                ent_pieces.append(-(lp.exp() * lp).sum(-1))
        else:
            pieces.append(_chunk_logps(hc, tc, weight, bias, temperature))
    if pieces:
        out = out.masked_scatter(sel, torch.cat(pieces))
        if ent is not None:
            ent = ent.masked_scatter(sel, torch.cat(ent_pieces))
    return out, ent
