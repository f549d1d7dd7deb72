from __future__ import annotations

import warnings

import pytest
import torch

from alignrl.data import pad_batch
from alignrl.generation import SamplingParams, filter_logits, generate
from alignrl.logprobs import token_logprobs
from alignrl.models import load_causal_lm, load_tokenizer


def _setup(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    prompts = [tok("12+34=").input_ids, tok("5=").input_ids, tok("hello, ").input_ids]
    ids, mask = pad_batch(prompts, tok.pad_token_id, left=True)
    return tok, model, ids, mask


def _naive(model, ids, attn, start, temperature):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double() / temperature
    logp = logits.log_softmax(-1)[:, start - 1 : -1]
    tok_logp = logp.gather(-1, ids[:, start:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return tok_logp, ent


def test_rollout_logprobs_match_training_path_and_naive(tiny_model):
    tok, model, ids, mask = _setup(tiny_model)
    torch.manual_seed(0)
    ro = generate(
        model,
        ids,
        mask,
        SamplingParams(12, temperature=0.7, top_k=20, top_p=0.9),
        [tok.eos_token_id],
        tok.pad_token_id,
    )
    P = ids.shape[1]
    for chunk in (3, 4096):  # several chunks and one chunk
        lp, ent = token_logprobs(
            model,
            ro.input_ids,
            ro.attention_mask,
            ro.completion_mask,
            start=P,
            temperature=0.7,
            with_entropy=True,
            chunk_tokens=chunk,
        )
        ref_lp, ref_ent = _naive(model, ro.input_ids, ro.attention_mask, P, 0.7)
        m = ro.completion_mask.bool()
        torch.testing.assert_close(lp[m].double(), ref_lp[m], atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[m].double(), ref_ent[m], atol=1e-5, rtol=0)
        torch.testing.assert_close(lp, ro.logprobs, atol=1e-5, rtol=0)
        assert (lp[~m] == 0).all()


def test_chunked_gradient_equals_unchunked(tiny_model):
    tok, model, ids, mask = _setup(tiny_model)
    target = mask[:, 1:]
    grads = []
    for chunk in (2, 4096):
        model.zero_grad()
        lp, _ = token_logprobs(model, ids, mask, target, start=1, chunk_tokens=chunk)
        (lp * torch.arange(lp.numel()).view_as(lp)).sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_greedy_matches_transformers_generate_and_stops(tiny_model):
    tok, model, ids, mask = _setup(tiny_model)
    ro = generate(model, ids, mask, SamplingParams(10, temperature=0.0), [tok.eos_token_id], tok.pad_token_id)
    # transformers derives positions itself; RoPE is relative, so left padding gives the same result
    hf = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )[:, ids.shape[1] :]
    for row_ours, row_hf, n in zip(ro.completion_ids, hf, ro.completion_mask.sum(-1)):
        assert row_ours[:n].tolist() == row_hf[:n].tolist()
    assert ro.truncated.tolist() == [
        bool(n == 10 and tok.eos_token_id not in r[:n].tolist())
        for r, n in zip(ro.completion_ids, ro.completion_mask.sum(-1))
    ]


class _ForceEOS(torch.nn.Module):
    """Wraps a model so that row 0 emits EOS as its 3rd token; other rows never do."""

    def __init__(self, model, eos):
        super().__init__()
        self.m, self.eos, self.calls = model, eos, 0

    def forward(self, **kw):
        out = self.m(**kw)
        out.logits[:, :, self.eos] = -1e9
        if self.calls == 2:
            out.logits[0, -1, self.eos] = 1e9
        self.calls += 1
        return out


def test_eos_ends_completion_and_mask(tiny_model):
    tok, model, ids, mask = _setup(tiny_model)
    wrapped = _ForceEOS(model, tok.eos_token_id)
    ro = generate(wrapped, ids, mask, SamplingParams(6, temperature=1.0), [tok.eos_token_id], tok.pad_token_id)
    assert ro.completion_ids[0, 2] == tok.eos_token_id
    assert ro.completion_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert (ro.completion_ids[0, 3:] == tok.pad_token_id).all() and (ro.logprobs[0, 3:] == 0).all()
    assert ro.truncated.tolist() == [False, True, True]
    assert ro.completion_mask[1:].sum(-1).tolist() == [6, 6]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert (~torch.isinf(filter_logits(logits, 0, 0.5))).tolist() == [[True, False, False, False]]


def test_generate_returns_autograd_usable_tensors_and_restores_mode(tiny_model):
    """The sampling loop runs under inference mode; its outputs must still feed a training forward/backward."""
    tok, model, ids, mask = _setup(tiny_model)
    model.train()
    ro = generate(model, ids, mask, SamplingParams(5, temperature=1.0), [tok.eos_token_id], tok.pad_token_id)
    assert model.training
    assert not ro.completion_ids.is_inference() and not ro.logprobs.is_inference()
    lp, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=ids.shape[1])
    lp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unpadded_batch_skips_mask_and_matches_training_path(tiny_model):
    """Equal-length prompts take the no-mask fast path; rollout log-probs still equal the training path's."""
    tok, model, _, _ = _setup(tiny_model)
    ids, mask = pad_batch([tok("12+34=").input_ids, tok("56+78=").input_ids], tok.pad_token_id, left=True)
    assert bool(mask.all())
    torch.manual_seed(0)
    ro = generate(model, ids, mask, SamplingParams(8, temperature=0.8), [tok.eos_token_id], tok.pad_token_id)
    lp, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=ids.shape[1],
                           temperature=0.8)  # fmt: skip
    torch.testing.assert_close(lp, ro.logprobs, atol=1e-5, rtol=0)


def _gqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_cpu_decode_attention_equals_sdpa_path(monkeypatch):
    """The CPU decode attention (grouped KV heads, float32 cache views, padding mask) samples exactly what the
    model's own SDPA attention samples, and leaves the model on SDPA afterwards."""
    import contextlib

    import alignrl.generation as g

    model = _gqa_model()
    ids, mask = pad_batch([[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]], 0, left=True)
    params = SamplingParams(16, temperature=1.0)
    fast = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(g, "_decode_attention_on", lambda m: contextlib.nullcontext(False))
    slow = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    lp, _ = token_logprobs(model, fast.input_ids, fast.attention_mask, fast.completion_mask, start=ids.shape[1])
    torch.testing.assert_close(lp, fast.logprobs, atol=1e-5, rtol=0)


def test_bf16_sampling_keeps_float32_weights():
    """autocast=bf16 samples with bf16 weights (cast once per call) and gives the float32 weights back untouched;
    its log-probs are those of the bf16-autocast training pass up to bf16 rounding."""
    model = _gqa_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = pad_batch([[5, 6, 7, 8, 9], [3, 4]], 0, left=True)
    ro = generate(model, ids, mask, SamplingParams(12, autocast=torch.bfloat16), [49], 0, seeds=[1, 2])
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    with torch.autocast("cpu", torch.bfloat16):
        lp, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=ids.shape[1])
    full, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=ids.shape[1])
    err_bf16 = (lp - ro.logprobs).abs().max()
    assert err_bf16 < 0.05
    assert (full - ro.logprobs).abs().max() > 0  # it really sampled in bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_one_token_attention_matches_the_float64_formula(dtype, mask_kind):
    """softmax(q·kᵀ·s + mask)·v for one query token, grouped KV heads (4 query heads on 2), strided cache views,
    against the formula in float64: float32 caches to float rounding, bf16 caches to bf16 rounding."""
    from alignrl.decode import one_token_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hk, L, D, cap = 3, 4, 2, 7, 8, 11
    q = torch.randn(B, H, D, generator=g)
    kbuf, vbuf = torch.randn(2, B, Hk, cap, D, generator=g).to(dtype)
    keys, values = kbuf[:, :, :L], vbuf[:, :, :L]  # views into a wider buffer, as the cache passes them
    attend = torch.ones(B, 1, 1, L, dtype=torch.bool)
    attend[0, ..., :3] = False  # left padding of row 0
    mask = {"none": None, "bool": attend, "additive": torch.zeros(B, 1, 1, L).masked_fill(~attend, float("-inf"))}
    got = one_token_attention(q, keys, values, mask[mask_kind], 0.3)
    k64, v64 = (t.double().repeat_interleave(H // Hk, 1) for t in (keys, values))
    scores = torch.einsum("bhd,bhld->bhl", q.to(dtype).double(), k64) * 0.3
    if mask_kind != "none":
        scores = scores.masked_fill(~attend[:, 0], float("-inf"))
    want = torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v64)
    assert got.dtype == dtype and got.shape == (B, H, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_bf16_sampling_caches_bf16_and_tracks_the_bf16_training_pass(monkeypatch):
    """Under bf16 autocast the KV cache holds bf16 (what autocast's attention matmuls read in training; half the
    float32 cache's reads per token), and the sampled log-probs stay within bf16 rounding of the bf16 training
    pass: mean |Δ log p| under 0.009 per token for Llama and Qwen2 (a float32 cache: ~0.014, keys unrounded)."""
    import alignrl.decode as d

    caches = []
    real = d.one_token_attention
    monkeypatch.setattr(d, "one_token_attention", lambda q, k, *a: caches.append(k.dtype) or real(q, k, *a))
    ids, mask = pad_batch([[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]], 0, left=True)
    for arch in ("llama", "qwen2"):
        model, errs = _tiny(arch), []
        for seed in range(5):
            params = SamplingParams(24, autocast=torch.bfloat16)
            ro = generate(model, ids, mask, params, [49], 0, seeds=[seed, seed + 10, seed + 20])
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                lp, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=ids.shape[1])
            errs.append((lp - ro.logprobs)[ro.completion_mask.bool()].abs())
        assert float(torch.cat(errs).mean()) < 0.009, arch
    assert caches and set(caches) == {torch.bfloat16}


def _tiny(arch: str, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               initializer_range=0.3, **kw)  # fmt: skip
    # large weights: peaked distributions, so that a wrong position or head changes the tokens and log-probs
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("padded", [True, False])
def test_fast_decode_equals_model_forward(monkeypatch, arch, autocast, padded):
    """The fused decode step (`alignrl.decode.FastDecoder`) samples the tokens the model's own forward samples,
    with the same log-probs, for Llama (GQA), Qwen2 (q/k/v biases) and Mistral, with and without padding, in
    fp32 and under bf16 autocast; and it is really used (its step runs once per decoded token), with the model's
    weights left in float32 while it runs."""
    import alignrl.decode as d

    # Mistral without a window: with one, the reference path's attention runs in bf16 SDPA (see _decode_attention)
    model = _tiny(arch, **({"sliding_window": None} if arch == "mistral" else {}))
    seqs = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]] if padded else [[5, 6, 7], [8, 9, 10], [1, 2, 3]]
    ids, mask = pad_batch(seqs, 0, left=True)
    params = SamplingParams(16, temperature=1.0, autocast=autocast)
    steps = []
    real_step = d.FastDecoder.step
    up = model.model.layers[0].mlp.up_proj
    monkeypatch.setattr(d.FastDecoder, "step", lambda self, *a: steps.append(up.weight.dtype) or real_step(self, *a))
    fast = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
    assert len(steps) == 15
    assert set(steps) == {torch.float32}  # it decodes from its own packed copies: no cast copy of the model's
    monkeypatch.setattr(d.FastDecoder, "build", staticmethod(lambda *a: None))
    slow = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5 if autocast is None else 1e-3, rtol=0)
    if autocast is None:  # and both equal the training path's log-probs
        lp, _ = token_logprobs(model, fast.input_ids, fast.attention_mask, fast.completion_mask, start=ids.shape[1])
        torch.testing.assert_close(lp, fast.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("padded", [True, False])
def test_fast_decode_drops_finished_rows_and_samples_the_same(monkeypatch, autocast, padded):
    """Rows that emitted EOS leave the fused decoder's batch (with their KV cache) once they are a quarter of it:
    fewer rows are stepped than the batch at every token, and every row gets the tokens and log-probs the
    model's own forward (which steps the whole batch) samples for it with the same seeds."""
    import alignrl.decode as d

    model = _tiny("llama")
    torch.manual_seed(1)
    seqs = [torch.randint(1, 50, (int(n),)).tolist() for n in torch.randint(2, 7, (16,))]
    if not padded:
        seqs = [s[:2] for s in seqs]
    ids, mask = pad_batch(seqs, 0, left=True)
    params = SamplingParams(24, temperature=1.0, autocast=autocast)
    eos = [7, 11, 23, 31]  # frequent enough that rows end at different tokens
    rows = []
    real_step = d.FastDecoder.step
    monkeypatch.setattr(d.FastDecoder, "step", lambda self, tok, *a: rows.append(len(tok)) or real_step(self, tok, *a))
    fast = generate(model, ids, mask, params, eos, 0, seeds=range(16))
    monkeypatch.setattr(d.FastDecoder, "build", staticmethod(lambda *a: None))
    slow = generate(model, ids, mask, params, eos, 0, seeds=range(16))
    ends = slow.completion_mask.sum(-1)
    assert ends.min() < ends.max() and not slow.truncated.all()  # the rows really end apart
    assert len(set(rows)) >= 3  # compacted twice: the second time, kept rows are not the batch's own indices
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5 if autocast is None else 1e-3, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_generation_passes_the_kv_cache_under_the_current_keyword(monkeypatch, arch):
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40): both decode
    paths (the fused step after the model's prefill, and the model's own forward per token) use the name the
    installed version takes, so no deprecation warning is raised and the cache is really used."""
    import alignrl.decode as d

    model = _tiny(arch, **({"sliding_window": None} if arch == "mistral" else {}))
    ids, mask = pad_batch([[5, 6, 7, 8, 9], [3, 4]], 0, left=True)
    params = SamplingParams(6, temperature=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fast = generate(model, ids, mask, params, [10**6], 0)  # an EOS it cannot sample: all 6 tokens run
        monkeypatch.setattr(d.FastDecoder, "build", staticmethod(lambda *a: None))
        slow = generate(model, ids, mask, params, [10**6], 0)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    # greedy tokens equal a cache-free forward over the growing sequence
    seq, m = ids, mask
    for j in range(slow.completion_ids.shape[1]):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        nxt = model(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1)
        assert torch.equal(nxt, slow.completion_ids[:, j])
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)


def test_fast_decode_declines_what_it_does_not_reproduce(tiny_model):
    """Other activations, sliding windows shorter than the sequence and LoRA variants (DoRA) fall back to the
    model's forward (build returns None); plain LoRA is merged into the decoder's weights."""
    from alignrl.decode import FastDecoder

    assert FastDecoder.build(_tiny("llama"), 64, 3) is not None
    assert FastDecoder.build(_tiny("llama", hidden_act="gelu"), 64, 3) is None
    assert FastDecoder.build(_tiny("mistral", sliding_window=8), 64, 3) is None
    assert FastDecoder.build(_tiny("mistral", sliding_window=128), 64, 3) is not None
    from peft import LoraConfig, get_peft_model

    from alignrl.models import unwrap

    lora = get_peft_model(_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert FastDecoder.build(unwrap(lora), 64, 3) is not None
    dora = get_peft_model(_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert FastDecoder.build(unwrap(dora), 64, 3) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_fast_decode_with_lora_equals_the_peft_forward(monkeypatch, arch, autocast):
    """Sampling with a LoRA adapter (every projection, nonzero B, two adapters' worth of scaling) steps the fused
    decoder on weights with the adapter merged once per rollout: the same tokens and log-probs as peft's own
    forward, and the peft model's weights are left as they were."""
    from peft import LoraConfig, get_peft_model

    import alignrl.decode as d

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(_tiny(arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at zero: the adapter would change nothing
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = pad_batch([[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]], 0, left=True)
    params = SamplingParams(12, temperature=1.0, autocast=autocast)
    steps = []
    real_step = d.FastDecoder.step
    monkeypatch.setattr(d.FastDecoder, "step", lambda self, *a: steps.append(1) or real_step(self, *a))
    fast = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
    assert len(steps) == 11  # the fused decoder ran, not peft's wrappers
    monkeypatch.setattr(d.FastDecoder, "build", staticmethod(lambda *a: None))
    if autocast is None:
        slow = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
        assert torch.equal(fast.completion_ids, slow.completion_ids)
        torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=5e-5, rtol=0)  # W+BA vs W·x+B(A·x) rounding
    else:  # bf16 rounds W + BA differently from W·x + B(A·x), so a near-tie may sample another token: the sampled
        # tokens' log-probs must be as close to peft's float32 forward as those of peft's own bf16 sampling are
        def err(ro):
            with torch.no_grad():
                lp, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=5)
            return float((ro.logprobs - lp).abs().max())

        slow = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
        assert err(fast) <= 2 * err(slow) + 1e-3, (err(fast), err(slow))
    with model.disable_adapter():  # and the adapter matters: without it the samples differ
        base = generate(model, ids, mask, params, [49], 0, seeds=[1, 2, 3])
    assert not torch.equal(base.completion_ids, fast.completion_ids)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_frozen_linears_give_the_same_logprobs(autocast):
    """A reference policy with oneDNN pre-packed linear layers computes the log-probs of the plain model (to float
    rounding, fp32 and bf16 weights under autocast), and holds no second copy of the weights."""
    import copy

    from alignrl.models import _PackedLinear, cast_linear_weights, pack_frozen_linears

    model = _tiny("llama", tie_word_embeddings=True).requires_grad_(False)
    packed = copy.deepcopy(model)
    if autocast:
        cast_linear_weights(model, torch.bfloat16)
        cast_linear_weights(packed, torch.bfloat16)
    n = pack_frozen_linears(packed)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    assert n == 2 * 7  # every projection; the lm_head tied to the embeddings stays a plain nn.Linear
    assert type(packed.lm_head) is torch.nn.Linear and isinstance(packed.model.layers[0].mlp.up_proj, _PackedLinear)
    assert not any(p.dim() == 2 and p.shape[0] != 50 for p in packed.parameters())  # originals not kept
    ids, mask = pad_batch([[5, 6, 7, 8, 9, 10, 11], [3, 4, 12, 13]], 0, left=True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        want, _ = token_logprobs(model, ids, mask, mask[:, 3:], start=3)
        got, _ = token_logprobs(packed, ids, mask, mask[:, 3:], start=3)
    torch.testing.assert_close(got, want, atol=1e-5 if not autocast else 1e-3, rtol=0)


def test_trunk_skips_columns_no_target_needs(tiny_model):
    """Left padding common to every row and right padding after the last scored target are not run through the
    trunk; log-probs and gradients equal a float64 full-width forward of the same model."""
    tok, model, ids, mask = _setup(tiny_model)
    pad = tok.pad_token_id
    B, P = ids.shape
    # two extra all-padding columns on the left; completions of 3, 1 and 0 scored tokens inside 6 columns
    completions = torch.randint(3, 60, (B, 6), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.full((B, 2), pad), ids, completions], 1)
    mask = torch.cat([torch.zeros(B, 2, dtype=torch.long), mask, torch.ones(B, 6, dtype=torch.long)], 1)
    target = torch.zeros(B, 6, dtype=torch.long)
    target[0, :3] = 1
    target[1, :1] = 1
    start = P + 2
    widths = []
    record = lambda m, a, kw: widths.append(kw["input_ids"].shape[1])  # noqa: E731
    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        weights = torch.arange(1.0, 1.0 + B * 6).view(B, 6)
        lp, _ = token_logprobs(model, ids, mask, target, start=start)
        (lp * weights).sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
    finally:
        hook.remove()
    assert widths == [start + 3 - 2]  # first real column to the last scored target
    model.zero_grad()
    model.double()
    want, _ = _naive(model, ids, mask, start, 1.0)
    m = target.bool()
    torch.testing.assert_close(lp[m].double(), want[m].detach(), atol=1e-5, rtol=0)
    assert (lp[~m] == 0).all()
    (want * m * weights.double()).sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g.double(), p.grad, atol=1e-5, rtol=1e-4)
