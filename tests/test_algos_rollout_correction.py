"""Rollout (sampler–trainer mismatch) correction against float64 references written from the formulas, with the
caps' edge cases: ratios exactly at a cap, no cap, NaN sampler log-probs, masked tokens, overflowing sequences."""

from __future__ import annotations

import math

import pytest
import torch

from alignrl.algos.rollout_correction import MAX_LOG_RATIO, ROLLOUT_CORRECTIONS, mismatch_metrics

DT = torch.float64


def _data():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.5, -4.0, -1.0]], dtype=DT)
    delta = torch.tensor([[0.3, -0.9, math.log(3.0), 1.7], [-0.05, 0.0, 2.5, 0.4]], dtype=DT)  # log ρ_t
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=DT)
    return old, old - delta, mask, delta


def _reference(mode: str, delta, mask, c_min, c_max):
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        seq = math.exp(min(sum(float(delta[b, t]) for t in range(mask.shape[1]) if mask[b, t]), MAX_LOG_RATIO))
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            r = seq if mode.startswith("sequence") else math.exp(float(delta[b, t]))
            lo = -math.inf if c_min is None else c_min
            hi = math.inf if c_max is None else c_max
            if mode.endswith("truncate"):
                out[b, t] = min(max(r, lo), hi)
            else:
                out[b, t] = r if lo <= r <= hi else 0.0
    return out


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize(("c_min", "c_max"), [(None, 3.0), (0.5, 3.0), (0.5, None), (None, None), (1.0, 1.0)])
def test_weights_match_the_formula(mode, c_min, c_max):
    old, sampler, mask, delta = _data()
    got = ROLLOUT_CORRECTIONS[mode](old, sampler, mask, c_min, c_max)
    want = _reference(mode, delta, mask, c_min, c_max)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[mask == 0] == 0).all()


def test_a_ratio_exactly_at_the_cap_is_kept():
    """ρ = c_max (or c_min) exactly: truncation leaves it, the mask keeps it (the range is closed)."""
    old, sampler, mask, delta = _data()
    at = float(torch.exp(delta[0, 2]))  # ≈ 3, as computed
    for mode in ("token_truncate", "token_mask"):
        assert float(ROLLOUT_CORRECTIONS[mode](old, sampler, mask, None, at)[0, 2]) == at
        assert float(ROLLOUT_CORRECTIONS[mode](old, sampler, mask, at, None)[0, 2]) == at
    # ρ = e^1.7 > 3: truncated to 3, masked to 0
    assert float(ROLLOUT_CORRECTIONS["token_truncate"](old, sampler, mask, None, 3.0)[0, 3]) == 3.0
    assert float(ROLLOUT_CORRECTIONS["token_mask"](old, sampler, mask, None, 3.0)[0, 3]) == 0.0


def test_nan_sampler_logprobs_count_as_no_mismatch_and_huge_ratios_stay_finite():
    old, sampler, mask, _ = _data()
    sampler[0, 1] = float("nan")
    w = ROLLOUT_CORRECTIONS["token_truncate"](old, sampler, mask, None, None)
    assert float(w[0, 1]) == 1.0 and torch.isfinite(w).all()
    far = torch.full((1, 50), -1.0, dtype=DT)
    seq = ROLLOUT_CORRECTIONS["sequence_truncate"](far, far - 5.0, torch.ones_like(far), None, None)  # log ρ = 250
    assert torch.isfinite(seq).all() and float(seq[0, 0]) == pytest.approx(math.exp(MAX_LOG_RATIO))


def test_identical_distributions_give_weight_one_and_zero_mismatch():
    old, _, mask, _ = _data()
    for mode in ROLLOUT_CORRECTIONS:
        w = ROLLOUT_CORRECTIONS[mode](old, old.clone(), mask, 0.5, 2.0)
        torch.testing.assert_close(w, mask)
    m = mismatch_metrics(old, old.clone(), mask, mask)
    assert float(m["kl_k1"]) == 0 and float(m["kl_k3"]) == 0 and float(m["masked"]) == 0


def test_mismatch_metrics_reference():
    old, sampler, mask, delta = _data()
    w = ROLLOUT_CORRECTIONS["token_mask"](old, sampler, mask, None, 3.0)
    m = mismatch_metrics(old, sampler, mask, w)
    valid = [(b, t) for b in range(2) for t in range(4) if mask[b, t]]
    d = [float(delta[b, t]) for b, t in valid]
    assert float(m["kl_k1"]) == pytest.approx(sum(-x for x in d), rel=1e-12)
    assert float(m["kl_k3"]) == pytest.approx(sum(math.exp(x) - 1 - x for x in d), rel=1e-12)
    assert float(m["abs_logp_diff"]) == pytest.approx(sum(abs(x) for x in d), rel=1e-12)
    assert float(m["ratio_max"]) == pytest.approx(max(math.exp(x) for x in d), rel=1e-12)
    assert float(m["masked"]) == sum(math.exp(x) > 3.0 for x in d)  # e^1.7 and e^2.5


# ----------------------------------------------------------------------------- in a run


def _grpo(tiny_model, tmp_path, name, *extra):
    from alignrl.cli import main
    from alignrl.data import write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(20)])
    (tmp_path / "r.py").write_text("def n(completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / name
    assert main(["train", "grpo", f"model={tiny_model}", f"train_file={tmp_path / 'p.jsonl'}", f"output_dir={out}",
                 f"reward_funcs=[{tmp_path / 'r.py'}:n]", "prompts_per_step=2", "num_generations=4",
                 "max_completion_length=6", "max_steps=1", "learning_rate=0.1", "adam_epsilon=1.0",
                 "max_grad_norm=0", "progress_bar=false", *extra]) == 0  # fmt: skip
    import json

    from safetensors.torch import load_file

    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return metrics, load_file(str(out / "final" / "model.safetensors"))


def _shift_sampler_logprobs(monkeypatch, shift: float) -> None:
    """The native sampler reports log π_sampler = log π − shift on every sampled token (a mismatched sampler)."""
    from alignrl.rollout import NativeEngine

    real = NativeEngine.generate

    def generate(self, prompts, params, seeds=None):
        ro = real(self, prompts, params, seeds)
        ro.logprobs = ro.logprobs - shift * ro.completion_mask
        return ro

    monkeypatch.setattr(NativeEngine, "generate", generate)


def test_without_mismatch_the_correction_changes_nothing(tiny_model, tmp_path):
    plain, w_plain = _grpo(tiny_model, tmp_path, "plain")
    corrected, w_corr = _grpo(tiny_model, tmp_path, "corr", "rollout_correction=sequence_mask")
    assert corrected["rollout_correction/kl_k3"] < 1e-8 and corrected["rollout_correction/masked"] == 0
    assert corrected["rollout_correction/weight"] == pytest.approx(1.0, abs=1e-4)
    assert max(float((w_plain[k] - w_corr[k]).abs().max()) for k in w_plain) < 1e-5


def test_a_mismatched_sampler_is_masked_or_truncated(tiny_model, tmp_path, monkeypatch):
    """log π_sampler = log π − 0.5 on every token: ρ_t = e^0.5. Token truncation at 1.5 weighs each token's
    policy loss by 1.5 (so the update differs from the plain one); sequence masking at 3 drops every sequence of
    three or more tokens (ρ = e^{0.5·n} > 3), and then, with β = 0, no weight moves."""
    from alignrl.models import load_causal_lm

    start = load_causal_lm(tiny_model, "float32", "cpu", "model").state_dict()
    _shift_sampler_logprobs(monkeypatch, 0.5)
    m, w = _grpo(tiny_model, tmp_path, "trunc", "rollout_correction=token_truncate", "rollout_correction_max=1.5")
    assert m["rollout_correction/kl_k1"] == pytest.approx(-0.5, abs=1e-4)  # E[log π_sampler − log π_old]
    assert m["rollout_correction/ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-4)
    assert m["rollout_correction/weight"] == pytest.approx(1.5, rel=1e-5)
    assert any(not torch.equal(start[k], w[k]) for k in w)
    m, w = _grpo(tiny_model, tmp_path, "mask", "rollout_correction=sequence_mask")
    assert m["completion_length/mean"] == 6  # (no early EOS from the untrained model: every ρ = e^3)
    assert m["rollout_correction/masked"] == 1.0 and m["rollout_correction/weight"] == 0.0
    assert all(torch.equal(start[k], w[k]) for k in w)


@pytest.mark.parametrize(
    ("option", "message"),
    [("rollout_correction=token", "rollout_correction: unknown rollout correction 'token'"),
     ("rollout_correction_min=4", "rollout_correction_min/max: need 0 ≤ min ≤ max"),
     ("rollout_engine=sglang", "rollout_engine: native, vllm or vllm_server, got 'sglang'"),
     ("vllm_kv_cache_gib=0", "vllm_kv_cache_gib: must be > 0"),
     ("vllm_gpu_memory_utilization=1.5", "vllm_gpu_memory_utilization: must be in (0, 1]")],  # fmt: skip
)
def test_bad_rollout_correction_options_are_one_line(option, message, tiny_model, tmp_path, capsys):
    from alignrl.cli import main

    assert main(["train", "grpo", f"model={tiny_model}", "train_file=x.jsonl", *option.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"alignrl: error: {message}") and "\n" not in err


@pytest.mark.parametrize(("engine", "want"), [("native", "none"), ("vllm", "token_truncate"),
                                              ("vllm_server", "token_truncate")])  # fmt: skip
def test_rollout_correction_auto_follows_the_engine(engine, want):
    """The default corrects a vLLM engine's samples (its kernels are not the trainer's), as TRL does, and leaves
    the native engine's alone; an explicit choice stays."""
    from alignrl.config import load_config
    from alignrl.trainers.grpo import GRPOConfig

    assert load_config(GRPOConfig, None, [f"rollout_engine={engine}"]).rollout_correction == want
    chosen = load_config(GRPOConfig, None, [f"rollout_engine={engine}", "rollout_correction=sequence_mask"])
    assert chosen.rollout_correction == "sequence_mask"
