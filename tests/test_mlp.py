from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from alignrl.data import pad_batch
from alignrl.logprobs import token_logprobs
from alignrl.mlp import GatedDown, use_lean_mlp


@pytest.mark.parametrize("bias", [False, True])
def test_gated_down_gradients_float64(bias):
    """GatedDown's hand-written backward equals autograd through silu(gate)·up·Wᵀ + b (float64 gradcheck and a
    direct comparison with the stock expression)."""
    torch.manual_seed(0)
    gate, up = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    w, b = torch.randn(4, 6, dtype=torch.float64), (torch.randn(4, dtype=torch.float64) if bias else None)
    args = [t.requires_grad_() for t in (gate, up, w, b) if t is not None]
    assert torch.autograd.gradcheck(lambda g, u, w, *b: GatedDown.apply(g, u, w, b[0] if b else None), args)
    ours = GatedDown.apply(gate, up, w, b)
    ref = F.linear(gate * torch.sigmoid(gate) * up, w, b)  # silu(x) = x·σ(x), written out
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(ours, args, g)
    want = torch.autograd.grad(ref, args, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def _pair(arch: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"mlp_bias": True} if arch == "llama" else {}
    cfg = AutoConfig.for_model(
        arch, vocab_size=50, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, **extra,
    )  # fmt: skip
    stock = AutoModelForCausalLM.from_config(cfg)
    lean = copy.deepcopy(stock)
    assert use_lean_mlp(lean) == 2
    return stock, lean


def _run(model, autocast: bool, saved: list | None = None):
    ids, mask = pad_batch([[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]], 0, left=True)
    model.zero_grad()
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            lp, _ = token_logprobs(model, ids, mask, mask[:, 2:], start=2)
    lp.sum().backward()
    if saved is not None:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved.append(sum(n for ptr, n in seen.items() if ptr not in params))
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_mlp_gives_stock_logprobs_and_gradients_with_less_saved(arch, autocast):
    """Same log-probs and gradients as the model's own MLP (fp32 and bf16 autocast, MLP bias, padding), while the
    tensors kept for backward shrink by the two [tokens, intermediate] activations per layer."""
    stock, lean = _pair(arch)
    saved: list[int] = []
    lp_s, g_s = _run(stock, autocast, saved)
    lp_l, g_l = _run(lean, autocast, saved)
    torch.testing.assert_close(lp_l, lp_s, rtol=0, atol=1e-6 if not autocast else 1e-2)
    for n in g_s:
        torch.testing.assert_close(g_l[n], g_s[n], rtol=1e-5, atol=1e-6 if not autocast else 1e-3, msg=n)
    tokens, inter = 2 * 8, 96  # two sequences left-padded to 8
    itemsize = 2 if autocast else 4
    assert saved[0] - saved[1] >= 2 * 2 * tokens * inter * itemsize  # 2 layers × (silu(gate), product)


def test_lean_mlp_steps_aside_without_grad_and_under_lora():
    """No grad (reference pass, sampling): the model's own forward. A LoRA-wrapped down projection (peft, applied
    after `use_lean_mlp`) also takes the model's own forward, so the adapter trains."""
    from alignrl.models import apply_lora

    stock, lean = _pair("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lean(ids).logits, stock(ids).logits, rtol=0, atol=0)
    lora = apply_lora(lean, 4, 8, 0.0, ["down_proj", "q_proj"])
    lp, _ = token_logprobs(lora, ids, torch.ones_like(ids), torch.ones(1, 2, dtype=torch.long), start=2)
    lp.sum().backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n and "down_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
