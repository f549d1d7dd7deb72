from __future__ import annotations

import copy

import pytest
import torch

import alignrl.attention as A
from alignrl.data import pad_batch
from alignrl.logprobs import token_logprobs


def _pair(gqa: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kv = 2 if gqa else 4
    cfg = AutoConfig.for_model("llama", vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=kv, initializer_range=0.1)  # fmt: skip
    sdpa = AutoModelForCausalLM.from_config(cfg)
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation(A.TRAIN_ATTENTION)
    return sdpa, ours


def _logps_and_grads(model, ids, mask, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        lp, _ = token_logprobs(model, ids, mask, mask[:, 2:], start=2)
    lp.sum().backward()
    return lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


SEQS = {"padded": [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]], "unpadded": [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]}


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("seqs", ["padded", "unpadded"])
def test_matmul_attention_equals_sdpa_in_float32(monkeypatch, gqa, seqs):
    """The matmul form (forced on, fp32) gives SDPA's log-probs and gradients: causal mask implied or given,
    left padding (fully masked query rows output 0 as in SDPA), grouped KV heads."""
    monkeypatch.setattr(A, "_matmul_applies", lambda *a: True)
    sdpa, ours = _pair(gqa)
    ids, mask = pad_batch(SEQS[seqs], 0, left=True)
    lp_s, g_s = _logps_and_grads(sdpa, ids, mask, autocast=False)
    lp_o, g_o = _logps_and_grads(ours, ids, mask, autocast=False)
    torch.testing.assert_close(lp_o, lp_s, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_o, g_s, atol=1e-5, rtol=1e-4)


def test_matmul_attention_runs_only_for_cpu_bf16_training(monkeypatch):
    """Taken under bf16 autocast with grad (gradients then match SDPA's to bf16 rounding, finite with padding);
    not taken without autocast or without grad."""
    calls = []
    real = A._matmul_applies
    monkeypatch.setattr(A, "_matmul_applies", lambda *a: calls.append(real(*a)) or calls[-1])
    sdpa, ours = _pair(gqa=True)
    ids, mask = pad_batch(SEQS["padded"], 0, left=True)
    lp_s, g_s = _logps_and_grads(sdpa, ids, mask, autocast=True)
    lp_o, g_o = _logps_and_grads(ours, ids, mask, autocast=True)
    assert calls and all(calls)
    assert torch.isfinite(g_o).all()
    assert (lp_o - lp_s).abs().max() < 0.05
    assert torch.nn.functional.cosine_similarity(g_o, g_s, 0) > 0.999
    calls.clear()
    _logps_and_grads(ours, ids, mask, autocast=False)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        token_logprobs(ours, ids, mask, mask[:, 2:], start=2)
    assert calls and not any(calls)
