"""VLLMEngine (alignrl.engines.vllm_engine) against the native engine: the same greedy completions, the sampler's
log-probs equal to alignrl's recomputation, and weight pushes. vLLM runs in `.venv-vllm` (`make test-vllm`); where
it is not installed (the main venv) only the missing-extra error is tested.

Models: SmolLM2-135M-Instruct and a tiny char-level Llama of head size 32 (vLLM's CPU attention takes head sizes
32, 64, 80, ...; the shared `tiny_model` fixture has 16)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from alignrl.errors import AlignRLError
from alignrl.generation import SamplingParams

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed here; `make test-vllm` runs these tests in .venv-vllm",
)
# fp32 on both sides; measured max |diff| on this CPU: 1e-6 (tiny), 5e-5 (SmolLM2, 32 tokens at T=0.7)
LOGP_ATOL = 1e-3


def test_missing_vllm_is_a_one_line_error(monkeypatch, tmp_path):
    from alignrl.engines.vllm_engine import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(AlignRLError, match="needs the vllm extra: make .venv-vllm/.installed"):
        VLLMEngine(tmp_path)


class Setup:
    def __init__(self, model_dir: str, max_model_len: int, texts: list[str], chat: bool):
        from transformers import AutoModelForCausalLM

        from alignrl.engines.vllm_engine import VLLMEngine
        from alignrl.rollout import NativeEngine

        self.engine = VLLMEngine(model_dir, max_model_len=max_model_len, kv_cache_gib=0.5)
        self.tokenizer = tok = self.engine.tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.native = NativeEngine(self.model, tok)
        if chat:
            self.prompts = [
                tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
                for t in texts
            ]  # fmt: skip
        else:
            self.prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def setup(request, tmp_path_factory) -> Setup:
    """One engine per model for the whole module (in-process vLLM engines are not shut down: the second one
    would lose the distributed state that both share)."""
    if request.param == "tiny":
        from alignrl.models import init_model

        out = tmp_path_factory.mktemp("tiny32") / "model"
        init_model(out, hidden_size=64, num_layers=2, num_heads=2, max_length=64, seed=0)
        return Setup(str(out), 64, ["hello world", "ab", "the quick brown fox", "12+3=", "zz"], chat=False)
    texts = ["What is the capital of France?", "Write a haiku about rain.", "2 + 2 =", "Say hi.", "Name a colour."]
    return Setup(request.getfixturevalue("smollm2"), 512, texts, chat=True)


def _same_rollout(a, b) -> None:
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=LOGP_ATOL, rtol=0)


@needs_vllm
def test_greedy_matches_native(setup):
    params = SamplingParams(max_new_tokens=24, temperature=0)
    _same_rollout(setup.engine.generate(setup.prompts, params), setup.native.generate(setup.prompts, params))


@needs_vllm
def test_sampled_logprobs_match_recomputation(setup):
    from alignrl.logprobs import token_logprobs

    params = SamplingParams(max_new_tokens=32, temperature=0.7)
    prompts, seeds = setup.prompts * 3, list(range(15))
    r = setup.engine.generate(prompts, params, seeds)
    again, other = (setup.engine.generate(prompts, params, s) for s in (seeds, [s + 99 for s in seeds]))
    assert torch.equal(r.completion_ids, again.completion_ids)  # per-request seeds: reproducible
    assert not torch.equal(r.completion_ids, other.completion_ids)
    ended = r.completion_ids.gather(1, (r.completion_mask.sum(1, keepdim=True) - 1))[:, 0]
    assert torch.equal(~r.truncated, torch.isin(ended, torch.tensor(setup.engine.eos)))
    assert torch.equal(r.logprobs == 0, r.completion_mask == 0)
    with torch.no_grad():
        ref, _ = token_logprobs(setup.model, r.input_ids, r.attention_mask, r.completion_mask,
                                start=r.prompt_ids.shape[1], temperature=params.temperature)  # fmt: skip
    diff = ((ref - r.logprobs) * r.completion_mask).abs().max().item()
    assert diff < LOGP_ATOL, f"max |vLLM - recomputed| log-prob: {diff:.2e}"


@needs_vllm
def test_load_weights(setup):
    params = SamplingParams(max_new_tokens=24, temperature=0)
    before = setup.native.generate(setup.prompts, params)
    original = {k: v.clone() for k, v in setup.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the embedding (tied to the head in SmolLM2), a fused q/k/v member and an MLP matrix
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                     "model.layers.0.mlp.down_proj.weight"):  # fmt: skip
            p = setup.model.get_parameter(name)
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    try:
        with pytest.raises(AlignRLError, match="pass the whole state dict"):
            setup.engine.load_weights([("model.embed_tokens.weight", setup.model.model.embed_tokens.weight)])
        setup.engine.load_weights(setup.model.state_dict().items())
        after = setup.native.generate(setup.prompts, params)
        assert not torch.equal(after.completion_ids, before.completion_ids)
        _same_rollout(setup.engine.generate(setup.prompts, params), after)
    finally:
        setup.model.load_state_dict(original)
        setup.engine.load_weights(setup.model.state_dict().items())
    _same_rollout(setup.engine.generate(setup.prompts, params), before)


DIGITS = """
def digits(prompts, completions, completion_ids, **kw):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]
"""


@needs_vllm
def test_grpo_learns_with_vllm_rollouts(tmp_path):
    """`rollout_engine=vllm`: GRPO samples through vLLM with the weights pushed every step, and learns (the
    digit-share reward rises over 12 steps); with an fp32 engine the trainer's log π_old equals the sampler's
    (rollout_correction's mismatch metrics ~0). In a subprocess: an in-process vLLM engine holds global state."""
    import json
    import subprocess

    from alignrl.data import write_jsonl
    from alignrl.models import init_model

    model = tmp_path / "model"
    init_model(model, hidden_size=64, num_layers=2, num_heads=2, max_length=64, seed=0)
    (tmp_path / "rew.py").write_text(DIGITS)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}="} for a in range(40)])
    out = tmp_path / "run"
    args = [f"model={model}", f"train_file={tmp_path / 'p.jsonl'}", f"reward_funcs=[{tmp_path / 'rew.py'}:digits]",
            f"output_dir={out}", "max_steps=12", "prompts_per_step=8", "num_generations=4", "max_completion_length=8",
            "learning_rate=1e-2", "seed=1", "rollout_engine=vllm", "vllm_kv_cache_gib=0.25",
            "rollout_correction=token_truncate", "progress_bar=false"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "alignrl.cli", "train", "grpo", *args], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = sum(m["reward"] for m in rows[:3]) / 3
    last = sum(m["reward"] for m in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert max(m["rollout_correction/abs_logp_diff"] for m in rows) < 1e-3
