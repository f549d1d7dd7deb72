"""One-token decode step for Llama-family models as a few tensor ops per layer, reading the model's own weights.

At decode time a batch holds one new token per row, so the cost per token is per-op dispatch, not FLOPs: the
transformers module stack spends ~60 ops and their Python per layer (hooks, kwargs, mask and cache plumbing),
this spends ~18 (fused q/k/v and gate/up projections, RoPE on q and k at once, attention straight on the
KV-cache views: `one_token_attention`). It computes the same function as the model's forward, op for op in the
same dtypes, up to the float rounding of the packed matmuls (tested against it); `FastDecoder.build` returns None
for anything it does not reproduce, and generation then steps through the model's forward instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignrl.models import packed_linear

_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
_STATIC_ROPE = {"default", "linear", "llama3"}  # cos/sin depend on the position only


class FastDecoder:
    """The decode step of a Llama/Qwen2/Mistral model whose projections are plain `nn.Linear` layers or LoRA
    layers over them (adapters merged into the decoder's own weight copies)."""

    def __init__(self, lm: nn.Module, rows: int):
        cfg, body = lm.config, lm.model
        device = body.embed_tokens.weight.device
        # the dtype the projections compute in: autocast's while sampling under it, else the weights' own
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        self.eps = cfg.rms_norm_eps
        self.embed = body.embed_tokens.weight
        self.norm = body.norm.weight
        self.head = packed_linear(lm.lm_head.weight, lm.lm_head.bias, dtype, rows)
        self.rotary = body.rotary_emb
        a0 = body.layers[0].self_attn
        self.head_dim = a0.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scaling = a0.scaling
        self.layers = []
        for layer in body.layers:
            at, mlp = layer.self_attn, layer.mlp
            (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wg, _), (wu, _), (wd, bd) = (
                _weights(m)  # type: ignore[misc]
                for m in (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            )
            b_qkv = torch.cat([bq, bk, bv]) if bq is not None else None
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    packed_linear(torch.cat([wq, wk, wv]), b_qkv, dtype, rows),
                    packed_linear(wo, bo, dtype, rows),
                    layer.post_attention_layernorm.weight,
                    packed_linear(torch.cat([wg, wu]), None, dtype, rows),
                    packed_linear(wd, bd, dtype, rows),
                )
            )

    @staticmethod
    def build(model: nn.Module, max_position: int, rows: int) -> FastDecoder | None:
        """A decoder for `model` (unwrapped) stepping `rows` sequences when it reproduces the model's forward,
        else None. Call it under the autocast the steps will run under."""
        cfg = getattr(model, "config", None)
        if cfg is None or type(model).__name__ not in _ARCHITECTURES or not hasattr(model, "model"):
            return None
        if type(model.lm_head) is not nn.Linear or type(model.model.embed_tokens) is not nn.Embedding:
            return None
        body = model.model
        rope = getattr(body.rotary_emb, "rope_type", "default")
        window = getattr(cfg, "sliding_window", None)
        if (
            getattr(cfg, "hidden_act", None) != "silu"
            or rope not in _STATIC_ROPE
            or (window is not None and getattr(cfg, "use_sliding_window", True) and window < max_position)
            or getattr(cfg, "mlp_bias", False)
            or model.training
        ):
            return None
        for layer in body.layers:
            at, mlp = layer.self_attn, layer.mlp
            projs = [at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            # quantised / sharded (DTensor) projections and LoRA variants (DoRA, ...) compute something else
            if any(_weights(p, merge=False) is None for p in projs):
                return None
            if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                return None
        return FastDecoder(model, rows)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, N, head_dim] for `positions` [B, N], as the model's rotary embedding computes them (in the
        embedding output's dtype, which the model passes it)."""
        return self.rotary(torch.empty((), dtype=self.embed.dtype, device=positions.device), positions)

    def step(
        self,
        tokens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        length: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits [B, V] of the next token after `tokens` [B] at cache position `length`.

        cos/sin [B, head_dim]; caches: per layer (keys, values) buffers [B, Hkv, capacity, head_dim], written at
        `length`; mask: additive [B, 1, 1, length + 1] (0 or -inf) over the cache, or None without padding."""
        B, H, Hk, D = tokens.shape[0], self.n_heads, self.n_kv, self.head_dim
        end = length + 1
        h = F.embedding(tokens, self.embed)  # [B, hidden]
        cos, sin = cos[:, None], sin[:, None]
        half = D // 2
        for (ln1, qkv_proj, o_proj, ln2, gate_up, down), (kbuf, vbuf) in zip(self.layers, caches):
            x = _rms_norm(h, ln1, self.eps)
            qkv = qkv_proj(x)
            qk = qkv[:, : (H + Hk) * D].view(B, H + Hk, D)
            v = qkv[:, (H + Hk) * D :].view(B, Hk, D)
            rot = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rot * sin  # RoPE on q and k at once, in the model's op order
            kbuf[:, :, length] = qk[:, H:]
            vbuf[:, :, length] = v
            att = one_token_attention(qk[:, :H], kbuf[:, :, :end], vbuf[:, :, :end], mask, self.scaling)
            h = h + o_proj(att.flatten(1))
            x = _rms_norm(h, ln2, self.eps)
            gate, up = gate_up(x).chunk(2, dim=-1)
            h = h + down(F.silu(gate) * up)
        return self.head(_rms_norm(h, self.norm, self.eps))


def one_token_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + mask)·v for one query token per row, [B, H, Dv], in the cache's dtype, from q [B, H, D],
    cache views [B, Hk, L, D] (H a multiple of Hk: grouped-query heads share theirs without a copy) and a mask
    [B, 1, 1, L] (bool, True = attend, or additive) or None. A float32 cache takes two batched matmuls per KV-head
    group; a bf16/fp16 one takes SDPA, whose CPU kernel reads the strided views in place (CPU bf16 batched
    matmuls copy them first), so a bf16 cache costs half the float32 one's reads."""
    B, H, D = q.shape
    Hk, L = keys.shape[1], keys.shape[2]
    with torch.autocast(q.device.type, enabled=False):
        q = q.to(keys.dtype)
        if keys.dtype != torch.float32:
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.to(keys.dtype)
            out = F.scaled_dot_product_attention(q[:, :, None], keys, values, mask, scale=scaling, enable_gqa=H != Hk)
            return out[:, :, 0]
        scores = torch.bmm((q * scaling).view(B * Hk, H // Hk, D), keys.flatten(0, 1).transpose(1, 2))
        scores = scores.view(B, Hk, H // Hk, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(-1).view(B * Hk, H // Hk, L)
        return torch.bmm(probs, values.flatten(0, 1)).view(B, H, values.shape[-1])


def _weights(proj: nn.Module, merge: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W, b) that `proj` computes x·Wᵀ + b with: a plain nn.Linear's own, or for a peft LoRA layer its base
    weight plus each active adapter's scaling·B·A, merged once per rollout, so sampling with an adapter steps
    plain matmuls instead of peft's wrappers at every token. None for anything else (quantised, sharded, DoRA
    and other LoRA variants). merge=False only checks (the base weight is returned unmerged)."""
    if type(proj) is nn.Linear:
        return (proj.weight, proj.bias) if type(proj.weight) is nn.Parameter else None
    base = getattr(proj, "base_layer", None)
    if base is None or type(base) is not nn.Linear or type(base.weight) is not nn.Parameter:
        return None
    if not callable(getattr(proj, "get_delta_weight", None)) or getattr(proj, "lora_variant", None):
        return None
    if any(getattr(proj, "lora_bias", {}).get(name) for name in proj.active_adapters):
        return None  # adapters with a bias of their own
    if proj.disable_adapters:  # peft computes the base layer alone (unmerging first): not reproduced when merged
        return (base.weight, base.bias) if not proj.merged else None
    if proj.merged:  # the adapters are already in the base weight
        return base.weight, base.bias
    weight = base.weight
    for name in proj.active_adapters if merge else ():
        if name in proj.lora_A:
            weight = weight + proj.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / sqrt(mean(x²) + eps), computed in float32 and returned in x's dtype (Llama's RMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
