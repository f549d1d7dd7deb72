"""Training-time gated MLP for the policy: down(silu(gate)·up) keeping 2 activations for backward instead of 4.

Autograd through the stock Llama/Qwen2/Mistral MLP keeps four [tokens, intermediate] tensors per layer for backward
(gate, silu(gate), up, and their product, the down projection's input): 16·hidden floats per token, about two
thirds of a Llama layer's activations. `GatedDown` keeps only gate and up and recomputes silu(gate) and the product
in backward with the same kernels autograd would run (two elementwise ops per layer, no matmul), so the gradients
are the stock ones. Used only with grad enabled and plain `nn.Linear` down projections (no LoRA, no
quantised or tensor-parallel weights); everything else runs the model's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

try:  # transformers' SiLU module (ACT2FN["silu"]); torch's nn.SiLU is accepted too
    from transformers.activations import SiLUActivation
except ImportError:  # pragma: no cover - older transformers name it differently
    SiLUActivation = nn.SiLU  # type: ignore[misc, assignment]


class GatedDown(torch.autograd.Function):
    """y = (silu(gate) ⊙ up)·Wᵀ + b, saving gate, up and W (not silu(gate) and the product) for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        h = F.silu(gate) * up
        w = weight.to(h.dtype)  # what autocast's linear would use (a bf16 copy under bf16 autocast)
        ctx.save_for_backward(gate, up, w)
        ctx.weight_dtype, ctx.has_bias = weight.dtype, bias is not None
        return F.linear(h, w, None if bias is None else bias.to(h.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, w = ctx.saved_tensors
        silu = F.silu(gate)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t().mm((silu * up).reshape(-1, up.shape[-1])).to(ctx.weight_dtype)
        grad_b = g2.sum(0).to(ctx.weight_dtype) if ctx.has_bias else None
        grad_h = grad.matmul(w)
        grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
        return grad_gate, grad_h * silu, grad_w, grad_b


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    # checked per call: LoRA may wrap the projection after `use_lean_mlp`, tensor parallelism makes it a DTensor
    if not torch.is_grad_enabled() or type(down) is not nn.Linear or isinstance(down.weight, DTensor):
        return type(self).forward(self, x)
    return GatedDown.apply(self.gate_proj(x), self.up_proj(x), down.weight, down.bias)


def use_lean_mlp(model: nn.Module) -> int:
    """Route every SiLU-gated MLP with a plain linear down projection through `GatedDown`; returns how many."""
    n = 0
    for m in model.modules():
        down, act = getattr(m, "down_proj", None), getattr(m, "act_fn", None)
        if (
            type(down) is nn.Linear  # not subclasses (quantised layers): the same test `_forward` makes per call
            and isinstance(act, SiLUActivation | nn.SiLU)
            and isinstance(getattr(m, "gate_proj", None), nn.Module)
            and isinstance(getattr(m, "up_proj", None), nn.Module)
        ):
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n
