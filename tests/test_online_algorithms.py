"""REINFORCE++, CISPO and on-policy distillation on the online driver: the CISPO loss against a float64 reference,
distillation's zero point, each algorithm learning on a tiny model, and each running from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from alignrl.algos.policy_loss import POLICY_LOSSES, clipped_policy_loss
from alignrl.cli import main
from alignrl.config import load_config
from alignrl.data import write_jsonl
from alignrl.errors import AlignRLError
from alignrl.trainers import cispo, distill, reinforce_pp

DT = torch.float64

REWARD_FILE = """
def digits(prompts, completions, completion_ids, **kw):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]
"""


def _setup(tmp_path) -> list[str]:
    (tmp_path / "rew.py").write_text(REWARD_FILE)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}="} for a in range(40)])
    return [f"train_file={tmp_path / 'p.jsonl'}", f"reward_funcs=[{tmp_path / 'rew.py'}:digits]", "progress_bar=false"]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- CISPO loss (float64)


def test_cispo_loss_and_gradient_reference() -> None:
    """L_t = −sg(clip(ρ_t, 1−ε_low, 1+ε_high))·A·log π(y_t): value and gradient from the formula; every valid token
    keeps a gradient (where PPO's clip drops it), and at ρ = 1 the gradient is REINFORCE's −A."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=DT)
    old = torch.randn(2, 4, generator=g, dtype=DT) - 2
    logp = (old + torch.tensor([[0.5, -0.7, 0.05, 2.0], [-0.01, 0.3, 9.0, 9.0]], dtype=DT)).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 0.5, 2.0], [-2.0, 1.5, 3.0, 3.0]], dtype=DT)
    loss, st = POLICY_LOSSES["cispo"](logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    for b in range(2):
        for t in range(4):
            if mask[b, t] == 0:
                assert loss[b, t].item() == 0 and logp.grad[b, t].item() == 0
                continue
            rho = torch.exp(logp[b, t] - old[b, t]).item()
            w = min(max(rho, 0.8), 1.28)
            assert loss[b, t].item() == pytest.approx(-w * adv[b, t].item() * logp[b, t].item(), rel=1e-12)
            assert logp.grad[b, t].item() == pytest.approx(-w * adv[b, t].item(), rel=1e-12)
            assert st["is_clipped"][b, t].item() == float(rho < 0.8 or rho > 1.28)
    assert st["is_clipped"].sum() > 0  # the data exercise the clip
    ppo_loss, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    ppo_grad = torch.autograd.grad(ppo_loss.sum(), logp)[0]
    assert ((ppo_grad == 0) & (mask > 0) & (logp.grad != 0)).any()  # tokens PPO drops, CISPO keeps
    same = logp.detach().clone().requires_grad_(True)
    POLICY_LOSSES["cispo"](same, same.detach(), adv, mask)[0].sum().backward()
    torch.testing.assert_close(same.grad, -adv * mask)


def test_cispo_refuses_sequence_ratio_and_dual_clip() -> None:
    x = torch.zeros(1, 2, dtype=DT)
    with pytest.raises(AlignRLError, match="cispo"):
        POLICY_LOSSES["cispo"](x, x, x, x + 1, importance_sampling="sequence")
    with pytest.raises(AlignRLError, match="importance_sampling"):
        load_config(cispo.CISPOConfig, None, ["model=m", "importance_sampling=sequence"])


# ----------------------------------------------------------------------------- learning runs


@pytest.mark.parametrize(
    "module,cls,extra",
    [
        (reinforce_pp, "ReinforcePPConfig", ["num_generations=2", "beta=0.01"]),
        (reinforce_pp, "ReinforcePPConfig", ["advantage_estimator=reinforce_pp_baseline", "beta=0.01"]),
        (cispo, "CISPOConfig", ["num_iterations=2"]),
    ],
    ids=["reinforce_pp", "reinforce_pp_baseline", "cispo"],
)
def test_online_algorithm_learns(tiny_model, tmp_path, module, cls, extra) -> None:
    """The digit-share reward rises over 12 steps."""
    args = _setup(tmp_path) + [
        f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", "max_steps=12", "prompts_per_step=8",
        "num_generations=4", "max_completion_length=8", "learning_rate=1e-2", "seed=1", *extra,
    ]  # fmt: skip
    module.train(load_config(getattr(module, cls), None, args))
    rows = _metrics(tmp_path / "run")
    first = sum(m["reward"] for m in rows[:3]) / 3
    last = sum(m["reward"] for m in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert all(abs(m["advantages/mean"]) < 1e-4 for m in rows if "reinforce" in cls.lower())  # batch-whitened
    if extra[0].startswith("num_generations"):  # KL in the reward: logged as the sampled policy's k1
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["kl"] > 0


@pytest.fixture(scope="module")
def teacher(tiny_model, tmp_path_factory) -> str:
    """`tiny_model` with its final norm scaled by 4: the same tokenizer, sharper next-token distributions."""
    from transformers import AutoModelForCausalLM

    out = str(tmp_path_factory.mktemp("teacher") / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def _exact_reverse_kl(student: str, teacher: str, prompts: list[str]) -> float:
    """Σ_v π_S(v|·)(log π_S(v|·) − log π_T(v|·)) averaged over every prompt position (float64, no sampling)."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(student)
    ids = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        s, t = (AutoModelForCausalLM.from_pretrained(p, dtype=DT)(**ids).logits for p in (student, teacher))
    s, t = s.log_softmax(-1), t.log_softmax(-1)
    return float((s.exp() * (s - t)).sum(-1)[ids.attention_mask.bool()].mean())


def test_distill_lowers_reverse_kl_to_the_teacher(tiny_model, teacher, tmp_path) -> None:
    """The sampled per-token reverse KL to the teacher falls by half in 30 steps, and so does the exact KL over
    the vocabulary at positions never trained on (the prompts)."""
    args = _setup(tmp_path) + [
        f"model={tiny_model}", f"teacher_model={teacher}", f"output_dir={tmp_path / 'run'}", "max_steps=30",
        "prompts_per_step=32", "max_completion_length=16", "learning_rate=3e-3", "seed=1",
    ]  # fmt: skip
    final = distill.train(load_config(distill.DistillConfig, None, args))
    kl = [m["distill/reverse_kl"] for m in _metrics(tmp_path / "run")]
    assert sum(kl[-5:]) < 0.6 * sum(kl[:5]), kl
    prompts = [f"{a}+{a}=" for a in range(40)]
    before, after = _exact_reverse_kl(tiny_model, teacher, prompts), _exact_reverse_kl(str(final), teacher, prompts)
    assert after < 0.6 * before, (before, after)


def test_distill_from_itself_has_zero_advantages(tiny_model, tmp_path) -> None:
    """Teacher = student: every per-token reward −(log π_θ − log π_T) is 0 up to the float difference between the
    sampling and the training forward, so the first step's reverse KL, advantages and gradient are ~0."""
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}="} for a in range(8)])
    args = [
        f"train_file={tmp_path / 'p.jsonl'}", "progress_bar=false", f"model={tiny_model}",
        f"teacher_model={tiny_model}", f"output_dir={tmp_path / 'run'}", "max_steps=1", "prompts_per_step=4",
        "max_completion_length=6", "learning_rate=1e-2",
    ]  # fmt: skip
    distill.train(load_config(distill.DistillConfig, None, args))
    (m,) = _metrics(tmp_path / "run")
    assert abs(m["distill/reverse_kl"]) < 1e-5 and m["advantages/abs_mean"] < 1e-5 and m["grad_norm"] < 1e-4, m


def test_distill_needs_the_students_vocabulary(tiny_model, tmp_path, capsys) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(other)  # fmt: skip
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}])
    argv = ["train", "distill", f"model={tiny_model}", f"teacher_model={other}", f"train_file={tmp_path / 'p.jsonl'}",
            f"output_dir={tmp_path / 'run'}", "max_steps=1", "prompts_per_step=1", "max_completion_length=8",
            "progress_bar=false"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher_model" in err[0] and "vocabulary of 50 tokens" in err[0], err


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "algo,extra",
    [
        ("reinforce_pp", ["num_generations=1"]),
        ("reinforce_pp", ["advantage_estimator=reinforce_pp_baseline", "num_generations=2"]),
        ("cispo", ["num_generations=2"]),
        ("distill", ["teacher_model=TEACHER"]),
    ],
)
def test_runs_from_the_cli(tiny_model, teacher, tmp_path, algo, extra) -> None:
    args = [a.replace("TEACHER", teacher) for a in extra]
    argv = ["train", algo, f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
            "prompts_per_step=2", "max_completion_length=4", *_setup(tmp_path), *args]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "alignrl_run.json").read_text())["algorithm"] == algo


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "cls,args,message",
    [
        ("grpo.GRPOConfig", ["policy_loss=ppo"], r"policy_loss: unknown policy loss 'ppo' \(choose from clipped, cisp"),
        ("grpo.GRPOConfig", ["advantage_estimator=gea"], r"advantage_estimator: unknown advantage estimator 'gea'"),
        ("grpo.GRPOConfig", ["advantage_estimator=gae"], "gae needs a critic"),
        ("grpo.GRPOConfig", ["loss_aggregation=mean"], "loss_aggregation: unknown loss aggregation 'mean'"),
        ("grpo.GRPOConfig", ["kl_estimator=k4"], "kl_estimator: unknown KL estimator 'k4'"),
        ("dpo.DPOConfig", ["loss_type=kto"], "loss_type: unknown preference loss_type 'kto'"),
        ("reinforce_pp.ReinforcePPConfig", ["advantage_estimator=grpo"], "reinforce_pp or reinforce_pp_baseline"),
        ("reinforce_pp.ReinforcePPConfig", ["advantage_estimator=reinforce_pp_baseline", "num_generations=1"],
         "needs ≥ 2"),
        ("reinforce_pp.ReinforcePPConfig", ["gamma=0"], r"gamma: must be in \(0, 1\]"),
        ("cispo.CISPOConfig", ["policy_loss=clipped"], "policy_loss: cispo"),
        ("distill.DistillConfig", [], "teacher_model: give the teacher's model directory"),
        ("distill.DistillConfig", ["teacher_model=t", "num_iterations=0"], "num_iterations: must be ≥ 1"),
    ],
)
def test_option_errors_are_one_line(cls, args, message) -> None:
    import importlib

    module, name = cls.split(".")
    config = getattr(importlib.import_module(f"alignrl.trainers.{module}"), name)
    with pytest.raises(AlignRLError, match=message):
        load_config(config, None, ["model=m", *args])
