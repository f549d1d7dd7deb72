"""The one generation path: batched sampling with a KV cache, shared by every algorithm and the evaluator."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from alignrl.attention import TRAIN_ATTENTION
from alignrl.decode import FastDecoder, one_token_attention
from alignrl.logprobs import position_ids_from_mask
from alignrl.models import cast_linear_weights, unwrap


@dataclass
class SamplingParams:
    """How to sample: temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    autocast: torch.dtype | None = None  # run the forwards under torch.autocast(dtype), as training does


@dataclass
class Rollout:
    """A batch of prompts (left-padded) and sampled completions (right-padded after EOS)."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C], 1 up to and including the EOS token
    logprobs: torch.Tensor  # [B, C], log-probs of the sampled tokens from temperature-scaled logits
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    # [B, C] 1 on sampled tokens, 0 on what an environment appended between turns; None: all of completion_mask
    action_mask: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def sampled_mask(self) -> torch.Tensor:
        """[B, C] 1 on the tokens the policy sampled (the tokens that carry log-probs)."""
        return self.completion_mask if self.action_mask is None else self.completion_mask * self.action_mask

    def completion_lists(self) -> list[list[int]]:
        """Completion token ids per sample, without padding."""
        lengths = self.completion_mask.sum(-1).tolist()
        return [row[: int(n)].tolist() for row, n in zip(self.completion_ids, lengths)]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k set and outside the smallest set with cumulative probability ≥ top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _sample(
    logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under the temperature-scaled (unfiltered) distribution; with `u`
    ([B] uniforms in [0, 1)), the token is the inverse-CDF draw at u (sampling keyed by the caller's seeds)."""
    if params.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    logp = (logits / params.temperature).log_softmax(-1)
    if params.top_k > 0 or params.top_p < 1.0:
        probs = filter_logits(logp, params.top_k, params.top_p).softmax(-1)
    else:
        probs = logp.exp()  # no filter: sample straight from the softmax, no logits-processor chain
    if u is None:
        tok = torch.multinomial(probs, 1).squeeze(-1)
    else:
        cdf = probs.cumsum(-1)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).squeeze(-1)
        tok = tok.clamp(max=probs.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    seeds: Sequence[int] | None = None,
) -> Rollout:
    """Sample completions for left-padded prompts; stops early once every sequence has emitted EOS.

    The loop runs under inference mode with preallocated token, log-prob and attention-mask buffers and no
    logits-processor chain; the returned tensors are ordinary (autograd-usable) tensors. (A preallocated
    static KV cache was measured slower on CPU: attention then spans the whole buffer; the cache here is
    preallocated but attention reads only its filled part, see `_PreallocatedLayer` and BENCHMARKS.md.)
    Llama-family models decode through `alignrl.decode.FastDecoder` (the same function in fewer ops, with
    pre-packed weights), dropping finished rows from the batch (and their KV cache) whenever they are a quarter
    of it; other models step through their own forward.
    """
    was_training = model.training
    model.eval()
    try:
        amp = torch.autocast(prompt_ids.device.type, params.autocast, enabled=params.autocast is not None)
        with torch.inference_mode(), _decode_attention_on(model) as routed, amp:
            batch, width = prompt_ids.shape
            fast = FastDecoder.build(unwrap(model), width + params.max_new_tokens, batch)
            # Only the model's own decode loop needs its weights held in the autocast dtype: the fused decoder
            # keeps its own packed copies, and the prefill forward casts each weight once either way.
            with _weights_in(model, None if fast is not None else params.autocast):
                u = _uniforms(seeds, params, prompt_ids.device)
                # the cache in the dtype autocast's attention matmuls read (RoPE leaves the keys in float32)
                kv_dtype = params.autocast if routed else None
                ids, logps, n = _sample_loop(
                    model, prompt_ids, prompt_mask, params, eos_token_ids, pad_token_id, u, kv_dtype, fast
                )
    finally:
        model.train(was_training)
    completion_ids = ids[:, :n].clone()  # clone: leave inference mode so training may use these tensors
    logps = logps[:, :n].clone()
    eos = torch.tensor(list(eos_token_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos)
    # mask: tokens up to and including the first EOS
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    truncated = ~is_eos.any(-1)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logps * completion_mask,
        truncated=truncated,
    )


@contextlib.contextmanager
def _weights_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Linear weights held in the autocast dtype while the model's own forward steps the decode, restored after:
    autocast alone recasts every weight at every token (its cast cache does not work under inference mode), for
    the same numbers. Costs one copy of those weights in `dtype` while sampling."""
    if dtype is None:
        yield
        return
    kept = cast_linear_weights(model, dtype)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


def _uniforms(seeds: Sequence[int] | None, params: SamplingParams, device) -> torch.Tensor | None:
    """[B, max_new_tokens] uniforms, row i from a CPU generator seeded with seeds[i]."""
    if seeds is None:
        return None
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.rand(params.max_new_tokens, generator=g) for g in gens]).to(device)


DECODE_ATTENTION = "alignrl_decode"


def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for one new token per row straight on the KV-cache views, grouped by KV head (no repeat_kv
    copy): `one_token_attention`. Prompts (several query tokens) and models with logit soft-capping, sinks or
    sliding windows take the SDPA path."""
    special = any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sliding_window"))
    if query.shape[2] != 1 or dropout or special:
        out, w = sdpa_attention_forward(
            module, query.to(key.dtype), key, value, attention_mask, scaling=scaling, **kwargs
        )
        return out.to(query.dtype), w
    B, H, _, D = query.shape
    L = key.shape[2]
    mask = None if attention_mask is None else attention_mask[..., -L:].reshape(B, 1, 1, L)
    out = one_token_attention(query[:, :, 0], key, value, mask, scaling if scaling is not None else D**-0.5)
    return out.view(B, 1, H, value.shape[-1]).to(query.dtype), None


AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _decode_attention_on(model: nn.Module) -> Iterator[bool]:
    """Route an SDPA (or alignrl training-attention) model's attention through `_decode_attention` for the
    sampling loop (CPU only: there it was measured faster; GPU SDPA kernels handle 1-token queries well), then
    back. Yields whether it did."""
    lm = unwrap(model)
    cfg = getattr(lm, "config", None)
    before = getattr(cfg, "_attn_implementation", None)
    if before not in ("sdpa", TRAIN_ATTENTION) or next(lm.parameters()).device.type != "cpu":
        yield False
        return
    lm.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield True
    finally:
        lm.set_attn_implementation(before)


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer writing into a buffer sized for the whole generation and returning the filled prefix (a
    view): appending a token copies that token, where torch.cat copied the whole cache (O(N²) bytes per row).
    `dtype` overrides the dtype keys and values are kept in."""

    def __init__(self, capacity: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.capacity, self.store_dtype = capacity, dtype
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = self.store_dtype or key_states.dtype, key_states.device
            B, H, _, D = key_states.shape
            self._k = key_states.new_empty((B, H, self.capacity, D), dtype=self.dtype)
            self._v = value_states.new_empty((B, H, self.capacity, value_states.shape[-1]), dtype=self.dtype)
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > {self.capacity} positions")
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self.length = 0
        super().reset()


def _cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by: `cache` from transformers 5.24 (which deprecates
    `past_key_values`, to be removed in 5.40), `past_key_values` before. Read off the first transformers model
    inside `model`, so wrappers that pass keywords through (DDP, peft, a user's own) get the same name."""
    lm = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _keep_rows(buf: torch.Tensor, keep: torch.Tensor, length: int) -> torch.Tensor:
    """A KV buffer [B, H, capacity, D] narrowed to the rows `keep`, its first `length` positions copied."""
    out = buf.new_empty((len(keep), *buf.shape[1:]))
    out[:, :, :length] = buf[:, :, :length].index_select(0, keep)
    return out


def _sample_loop(
    model, prompt_ids, prompt_mask, params: SamplingParams, eos_token_ids, pad_token_id, u, kv_dtype, fast
):
    device = prompt_ids.device
    batch, P = prompt_ids.shape
    N = params.max_new_tokens
    eos = torch.tensor(list(eos_token_ids), device=device)
    cache = Cache(layer_class_to_replicate=lambda: _PreallocatedLayer(P + N, kv_dtype))  # type: ignore[arg-type]
    attn = torch.ones((batch, P + N), dtype=prompt_mask.dtype, device=device)
    attn[:, :P] = prompt_mask
    tokens = torch.full((batch, N), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((batch, N), dtype=torch.float32, device=device)
    positions = position_ids_from_mask(prompt_mask)
    # Without left padding the causal mask is implied: passing none skips building a 4D mask every token.
    padded = not bool(prompt_mask.bool().all())
    with_cache = {_cache_kwarg(model): cache, "use_cache": True}
    out = model(
        input_ids=prompt_ids,
        attention_mask=attn[:, :P] if padded else None,
        position_ids=positions,
        logits_to_keep=1,
        **with_cache,
    )
    next_pos = positions[:, -1:] + 1
    logits = out.logits[:, -1]
    u_live = u
    if fast is not None:  # the decode steps as plain tensor ops on the cache the prefill filled
        cos, sin = fast.rope(next_pos + torch.arange(N, device=device))
        kv = [(layer._k, layer._v) for layer in cache.layers]  # type: ignore[attr-defined]
        cache.layers.clear()  # `kv` holds the buffers alone, so compacting them frees the full-width ones
        if padded:  # additive padding mask over the whole cache, sliced per step
            neg = torch.zeros((batch, 1, 1, P + N), dtype=kv[0][0].dtype, device=device)
            neg.masked_fill_(~attn.bool()[:, None, None], float("-inf"))
    live = torch.arange(batch, device=device)  # the batch row of each row still decoding
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # over the live rows
    n = 0
    for step in range(N):
        tok, logp = _sample(logits.float(), params, None if u_live is None else u_live[:, step])
        tok = tok.masked_fill(done, pad_token_id)
        if len(live) == batch:
            tokens[:, step], logps[:, step] = tok, logp.masked_fill(done, 0.0)
        else:
            tokens[live, step], logps[live, step] = tok, logp.masked_fill(done, 0.0)
        n = step + 1
        done = done | torch.isin(tok, eos)
        if step == N - 1 or bool(done.all()):
            break
        if fast is not None:
            finished = int(done.sum())
            if finished and 4 * finished >= len(live):  # drop finished rows once they are a quarter of the batch
                keep = (~done).nonzero().squeeze(1)
                live, done, tok = live[keep], done[keep], tok[keep]
                for i, (k, v) in enumerate(kv):  # layer by layer: each full-width pair is freed as it is replaced
                    kv[i] = (_keep_rows(k, keep, P + step), _keep_rows(v, keep, P + step))
                cos, sin = cos[keep], sin[keep]
                neg = neg[keep] if padded else None
                u_live = None if u_live is None else u_live[keep]
            mask = neg[..., : P + step + 1] if padded else None
            logits = fast.step(tok, cos[:, step], sin[:, step], kv, P + step, mask)
            continue
        out = model(
            input_ids=tokens[:, step : step + 1],
            attention_mask=attn[:, : P + step + 1] if padded else None,  # a view: no per-token cat
            position_ids=next_pos,
            **with_cache,
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens, logps, n
