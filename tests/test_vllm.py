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


def same_rollout(a, b) -> None:
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=LOGP_ATOL, rtol=0)


def check_seeded_sampling(engine, prompts, params: SamplingParams):
    """Per-request seeds: the same seeds give the same completions, others differ; log-probs only on completion
    tokens; `truncated` exactly where the last token is no EOS. Returns the rollout and its repeat."""
    seeds = list(range(len(prompts)))
    r = engine.generate(prompts, params, seeds)
    again, other = (engine.generate(prompts, params, s) for s in (seeds, [s + 99 for s in seeds]))
    assert torch.equal(r.completion_ids, again.completion_ids)
    assert not torch.equal(r.completion_ids, other.completion_ids)
    assert torch.equal(r.logprobs == 0, r.completion_mask == 0)
    ended = r.completion_ids.gather(1, (r.completion_mask.sum(1, keepdim=True) - 1))[:, 0]
    assert torch.equal(~r.truncated, torch.isin(ended, torch.tensor(engine.eos)))
    return r, again


def check_load_weights(engine, native, model, prompts, partial_error: str) -> None:
    """A partial state dict is refused (`partial_error`); after perturbing three weights (the embedding, tied to
    the head in SmolLM2; a fused q/k/v member; an MLP matrix) and a full push, the engine's greedy output is the
    native engine's on the new weights; the original weights are pushed back afterwards."""
    params = SamplingParams(max_new_tokens=24, temperature=0)
    before = native.generate(prompts, params)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                     "model.layers.0.mlp.down_proj.weight"):  # fmt: skip
            p = model.get_parameter(name)
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    try:
        with pytest.raises(AlignRLError, match=partial_error):
            engine.load_weights([("model.embed_tokens.weight", model.model.embed_tokens.weight)])
        engine.load_weights(model.state_dict().items())
        after = native.generate(prompts, params)
        assert not torch.equal(after.completion_ids, before.completion_ids)
        same_rollout(engine.generate(prompts, params), after)
    finally:
        model.load_state_dict(original)
        engine.load_weights(model.state_dict().items())
    same_rollout(engine.generate(prompts, params), before)


@needs_vllm
def test_greedy_matches_native(setup):
    params = SamplingParams(max_new_tokens=24, temperature=0)
    same_rollout(setup.engine.generate(setup.prompts, params), setup.native.generate(setup.prompts, params))


@needs_vllm
def test_sampled_logprobs_match_recomputation(setup):
    from alignrl.logprobs import token_logprobs

    params = SamplingParams(max_new_tokens=32, temperature=0.7)
    r, _ = check_seeded_sampling(setup.engine, setup.prompts * 3, params)
    with torch.no_grad():
        ref, _ = token_logprobs(setup.model, r.input_ids, r.attention_mask, r.completion_mask,
                                start=r.prompt_ids.shape[1], temperature=params.temperature)  # fmt: skip
    diff = ((ref - r.logprobs) * r.completion_mask).abs().max().item()
    assert diff < LOGP_ATOL, f"max |vLLM - recomputed| log-prob: {diff:.2e}"


@needs_vllm
@pytest.mark.parametrize("filters", [{"top_k": 5}, {"top_p": 0.8}, {"top_k": 20, "top_p": 0.9}], ids=str)
def test_filtered_logprobs_are_the_samplers(setup, filters):
    """With top-k/top-p, vLLM's log-probs are those of the distribution it sampled from: softmax(logits / T)
    restricted to the kept tokens and renormalised (float64 reference below; `generation.filter_logits` keeps the
    same sets). The trainer scores π_old unfiltered, so with a vLLM engine it always recomputes π_old."""
    from alignrl.generation import filter_logits

    params = SamplingParams(max_new_tokens=16, temperature=0.8, **filters)
    r = setup.engine.generate(setup.prompts, params, list(range(len(setup.prompts))))
    lm = setup.model.double()
    try:
        for b, (prompt, completion) in enumerate(zip(setup.prompts, r.completion_lists())):
            seq = torch.tensor([list(prompt) + completion])
            with torch.no_grad():
                logits = lm(input_ids=seq).logits[0, len(prompt) - 1 : -1] / params.temperature
            kept = filter_logits(logits, params.top_k, params.top_p)
            want = kept.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            assert want.isfinite().all()  # every sampled token is in the kept set
            torch.testing.assert_close(r.logprobs[b, : len(completion)].double(), want, atol=LOGP_ATOL, rtol=0)
    finally:
        setup.model.float()


@needs_vllm
def test_load_weights(setup):
    check_load_weights(setup.engine, setup.native, setup.model, setup.prompts, "pass the whole state dict")


DIGITS = """
def digits(prompts, completions, completion_ids, **kw):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]
"""


def _grpo_args(tmp_path, *extra: str) -> tuple[list[str], object]:
    """A 12-step GRPO run on the tiny model whose reward is the share of digits in the completion."""
    from alignrl.data import write_jsonl
    from alignrl.models import init_model

    model = tmp_path / "model"
    init_model(model, hidden_size=64, num_layers=2, num_heads=2, max_length=64, seed=0)
    (tmp_path / "rew.py").write_text(DIGITS)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}="} for a in range(40)])
    out = tmp_path / "run"
    args = [f"model={model}", f"train_file={tmp_path / 'p.jsonl'}", f"reward_funcs=[{tmp_path / 'rew.py'}:digits]",
            f"output_dir={out}", "max_steps=12", "prompts_per_step=8", "num_generations=4", "max_completion_length=8",
            "learning_rate=1e-2", "seed=1", "vllm_kv_cache_gib=0.25", "progress_bar=false", *extra]  # fmt: skip
    return args, out


def _metrics(out) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _learned(rows: list[dict]) -> tuple[float, float]:
    first = sum(m["reward"] for m in rows[:3]) / 3
    last = sum(m["reward"] for m in rows[-3:]) / 3
    return first, last


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_learns_with_vllm_rollouts(tmp_path, lora):
    """`rollout_engine=vllm`: GRPO samples through vLLM with the weights (LoRA: merged into the base) pushed every
    step; with an fp32 engine the trainer's log π_old (recomputed whenever vLLM samples, whatever
    rollout_correction is) equals the sampler's (the mismatch metrics ~0), which holds only if the engine has
    exactly the policy's weights (pushing the base without the adapter measured 0.21). Full weights: the run
    learns (the digit-share reward rises over 12 steps); LoRA learns this task too slowly to show in 12 steps,
    natively as well. In a subprocess: an in-process vLLM engine holds global state."""
    import subprocess

    extra = ["lora_r=8", "lora_alpha=16", "lora_target_modules=[q_proj,v_proj,up_proj]", "learning_rate=3e-2",
             "rollout_correction=none"]  # (π_old is recomputed all the same: the metrics are logged)
    args, out = _grpo_args(tmp_path, "rollout_engine=vllm", *(extra if lora else []))
    proc = subprocess.run([sys.executable, "-m", "alignrl.cli", "train", "grpo", *args], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert len(rows) == 12
    assert max(m["rollout_correction/abs_logp_diff"] for m in rows) < 1e-3
    first, last = _learned(rows)
    assert lora or last > first + 0.1, (first, last)


@needs_vllm
def test_grpo_with_vllm_under_torchrun_fsdp(tmp_path):
    """Two ranks, FSDP2: each rank's own vLLM engine (on the job's process group) samples its share, with the
    full weights gathered on every rank; the samplers' log-probs equal the trainer's and the run learns."""
    from test_distributed import torchrun

    args, out = _grpo_args(tmp_path, "rollout_engine=vllm", "distributed=fsdp")
    torchrun(["-m", "alignrl.cli", "train", "grpo", *args], timeout=600)
    rows = _metrics(out)
    first, last = _learned(rows)
    assert last > first + 0.1, (first, last)
    assert max(m["rollout_correction/abs_logp_diff"] for m in rows) < 1e-3


@needs_vllm
@pytest.mark.parametrize("case", ["ppo", "grpo_episodes"])
def test_other_online_runs_with_vllm(tmp_path, case):
    """PPO (its critic and GAE on the sampled tokens), and GRPO through a three-turn environment (each turn sampled
    by vLLM, the environment's replies appended as ids): the trainer's log-probs of every sampled token equal
    vLLM's, so the episodes' token alignment is right."""
    import subprocess

    from conftest import train_turn_taker
    from test_multi_turn_training import TALK

    from alignrl.data import write_jsonl
    from alignrl.envs import guess

    args, out = _grpo_args(tmp_path, "rollout_engine=vllm", "max_steps=3")
    if case == "ppo":
        algo, extra = "ppo", ["num_generations=1", "prompts_per_step=8"]
    else:
        (tmp_path / "talk.py").write_text(TALK)
        write_jsonl(tmp_path / "rows.jsonl", guess.make_rows(16, 0))
        (tmp_path / "tt").mkdir()
        algo = "grpo"
        extra = [f"model={train_turn_taker(str(tmp_path / 'model'), tmp_path / 'tt')}",
                 f"train_file={tmp_path / 'rows.jsonl'}", f"environment={tmp_path / 'talk.py'}:Talk",
                 "reward_funcs=[]", "max_completion_length=4", "max_prompt_length=16",
                 "max_episode_tokens=40"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "alignrl.cli", "train", algo, *args, *extra], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert len(rows) == 3 and max(m["rollout_correction/abs_logp_diff"] for m in rows) < 1e-3
    if case == "grpo_episodes":
        assert max(m["episode/turns"] for m in rows) > 1


@needs_vllm
def test_eval_with_vllm_equals_native(tmp_path):
    """`alignrl eval --rollout-engine vllm` scores the same greedy completions as the native engine."""
    import json
    import subprocess

    from alignrl.data import write_jsonl
    from alignrl.models import init_model

    model = tmp_path / "model"
    init_model(model, hidden_size=64, num_layers=2, num_heads=2, max_length=64, seed=0)
    (tmp_path / "rew.py").write_text(DIGITS)
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{a}*{a}="} for a in range(30)])
    results = {}
    for engine in ("native", "vllm"):
        cmd = [sys.executable, "-m", "alignrl.cli", "eval", "--model", str(model), "--data", str(tmp_path / "d.jsonl"),
               "--reward-funcs", f"{tmp_path / 'rew.py'}:digits", "--max-new-tokens", "12", "--pass-k", "2",
               "--rollout-engine", engine, "--vllm-kv-cache-gib", "0.25", "--json", str(tmp_path / f"{engine}.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    native, vllm = results["native"], results["vllm"]
    assert vllm["mean_reward"] == pytest.approx(native["mean_reward"], abs=1e-9)
    assert vllm["prompts"] == native["prompts"] == 30
    assert 0 < native["mean_reward"]


@needs_vllm
def test_demo_quick_with_vllm(tmp_path):
    """`alignrl demo --quick --rollout-engine vllm`: the GRPO demo's whole path with vLLM sampling the rollouts."""
    import subprocess

    cmd = [sys.executable, "-m", "alignrl.cli", "demo", "--quick", "--rollout-engine", "vllm", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SFT + GRPO" in proc.stdout
    rows = _metrics(tmp_path / "grpo")
    assert len(rows) == 3 and max(m["rollout_correction/abs_logp_diff"] for m in rows) < 1e-3


@needs_vllm
@pytest.mark.slow
def test_demo_lift_with_vllm_is_close_to_native(tmp_path):
    """The GRPO demo (full length, ~7 min on 2 cores): with vLLM sampling, the held-out accuracy lift is within 5
    points of the native run's (the same SFT model; only the rollout engine differs)."""
    import re
    import subprocess

    lifts = {}
    for engine in ("native", "vllm"):
        cmd = [sys.executable, "-m", "alignrl.cli", "demo", "--rollout-engine", engine, "--out", str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lifts[engine] = float(re.search(r"change\s+([+-][0-9.]+) points", proc.stdout).group(1))
    assert lifts["native"] > 10, lifts
    assert abs(lifts["vllm"] - lifts["native"]) <= 5, lifts
