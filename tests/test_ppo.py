"""PPO: per-token rewards and advantages (float64 references), a tabular bandit converging to π* ∝ π_ref·exp(r/β),
the critic (from a reward model, from the policy, shared trunk), and trainer runs (ratio = 1 sanity, learning)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignrl.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, token_rewards
from alignrl.algos.kl import kl_estimate
from alignrl.cli import main
from alignrl.config import load_config
from alignrl.data import write_jsonl
from alignrl.errors import AlignRLError
from alignrl.trainers import ppo
from alignrl.value_model import ValueModel, load_value_model, token_values

DT = torch.float64


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=DT)


def _cfg(**kw) -> ppo.PPOConfig:
    cfg = ppo.PPOConfig(reward_funcs=["unused"], **kw)
    cfg.validate()
    return cfg


def _gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cfg: ppo.PPOConfig):
    """PPO's advantages and returns: the "gae" estimator on per-token rewards (scores already in them)."""
    x = AdvantageInputs(
        torch.zeros(rewards.shape[0], dtype=rewards.dtype), mask, kl_rewards=rewards, values=values,
        gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
    )  # fmt: skip
    return ADVANTAGE_ESTIMATORS["gae"](x)


# ----------------------------------------------------------------------------- per-batch math (float64)


def test_token_rewards_reference() -> None:
    lengths = [5, 1, 3]
    g = torch.Generator().manual_seed(1)
    kl = torch.randn(3, 5, generator=g, dtype=DT)
    kl = torch.where(_mask(lengths, 5).bool(), kl, torch.full_like(kl, 1e9))  # padding garbage must not leak
    scores = torch.tensor([2.0, -1.0, 0.5], dtype=DT)
    out = token_rewards(scores, _mask(lengths, 5), -0.1 * kl)
    for b, n in enumerate(lengths):
        for t in range(5):
            e = 0.0 if t >= n else -0.1 * kl[b, t].item() + (scores[b].item() if t == n - 1 else 0.0)
            assert out[b, t].item() == pytest.approx(e, rel=1e-12, abs=1e-12)


def test_advantages_and_returns_reference() -> None:
    """returns = GAE + V before whitening; advantages whitened over valid tokens; rewards whitened without shift."""
    lengths = [6, 2, 4]
    T = 6
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(3, T, generator=g, dtype=DT)
    values = torch.randn(3, T, generator=g, dtype=DT)
    mask = _mask(lengths, T)
    valid = [(b, t) for b, n in enumerate(lengths) for t in range(n)]
    for whiten_rewards in (False, True):
        cfg = _cfg(gamma=0.9, lam=0.8, whiten_rewards=whiten_rewards)
        adv, ret = _gae(rewards, values, mask, cfg)
        r = rewards.clone()
        if whiten_rewards:
            xs = [rewards[b, t].item() for b, t in valid]
            mu = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs) + 1e-8)
            r = (rewards - mu) / sd + mu
        raw = {}
        for b, n in enumerate(lengths):
            for t in range(n):
                a = 0.0
                for k in range(n - t):
                    v_next = values[b, t + k + 1].item() if t + k + 1 < n else 0.0
                    delta = r[b, t + k].item() + 0.9 * v_next - values[b, t + k].item()
                    a += (0.9 * 0.8) ** k * delta
                raw[b, t] = a
                assert ret[b, t].item() == pytest.approx(a + values[b, t].item(), rel=1e-10, abs=1e-10)
        mu = sum(raw.values()) / len(raw)
        sd = math.sqrt(sum((x - mu) ** 2 for x in raw.values()) / len(raw) + 1e-8)
        for (b, t), a in raw.items():
            assert adv[b, t].item() == pytest.approx((a - mu) / sd, rel=1e-10, abs=1e-10)
        assert adv[mask == 0].abs().sum() == 0 and ret[mask == 0].abs().sum() == 0


def test_ppo_loss_combines_policy_and_value_terms() -> None:
    lengths = [4, 2]
    g = torch.Generator().manual_seed(2)
    mask = _mask(lengths, 4)
    old = torch.randn(2, 4, generator=g, dtype=DT)
    logp = (old + 0.5 * torch.randn(2, 4, generator=g, dtype=DT)).requires_grad_(True)
    old_v, ret, adv = (torch.randn(2, 4, generator=g, dtype=DT) for _ in range(3))
    values = (old_v + 0.5 * torch.randn(2, 4, generator=g, dtype=DT)).requires_grad_(True)
    cfg = _cfg(vf_coef=0.3, cliprange=0.2, cliprange_value=0.1, dual_clip=3.0)
    loss, st = ppo.ppo_loss(logp, old, values, old_v, adv, ret, mask, cfg, num_tokens=6.0)
    total, n_clip = 0.0, 0
    for b, n in enumerate(lengths):
        for t in range(n):
            rho = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            pg = max(-rho * a, -min(max(rho, 0.8), 1.2) * a)
            if a < 0:
                pg = min(pg, -3.0 * a)
            v, vo, r = values[b, t].item(), old_v[b, t].item(), ret[b, t].item()
            vl = 0.5 * max((v - r) ** 2, (min(max(v, vo - 0.1), vo + 0.1) - r) ** 2)
            total += pg + 0.3 * vl
            n_clip += (rho > 1.2 and a > 0) or (rho < 0.8 and a < 0)
    assert loss.item() == pytest.approx(total / 6, rel=1e-12)
    assert st["clipfrac"].item() == pytest.approx(n_clip / 6, rel=1e-12)
    loss.backward()
    assert logp.grad is not None and values.grad is not None


def test_explained_variance() -> None:
    mask = _mask([3, 2], 3)
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]], dtype=DT)
    assert ppo.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros_like(ret) + 3.0, ret, mask) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- tabular bandit


def test_bandit_converges_to_kl_regularised_optimum() -> None:
    """Single-token completions from a softmax table: PPO with k1 KL in the reward reaches π* ∝ π_ref·exp(r/β),
    and the value of the start state reaches β·log Σ π_ref·exp(r/β) (the optimum's soft value)."""
    torch.manual_seed(0)
    r = torch.tensor([1.0, 0.5, 0.0, 0.0, -0.5], dtype=DT)
    ref_lp = torch.tensor([0.5, -1.0, 1.0, 0.0, 0.3], dtype=DT).log_softmax(-1)
    beta, N, iters = 0.5, 256, 150
    cfg = _cfg(kl_coef=beta, num_ppo_epochs=4, num_mini_batches=4)
    pi_star = (ref_lp + r / beta).softmax(-1)
    theta = ref_lp.clone().requires_grad_(True)
    v = torch.zeros((), dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([theta, v], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / (iters * 16))
    mask = torch.ones(N, 1, dtype=DT)
    mb = N // cfg.num_mini_batches
    for _ in range(iters):
        with torch.no_grad():
            lp = theta.log_softmax(-1)
            arm = torch.multinomial(lp.exp(), N, replacement=True)
            old = lp[arm][:, None]
            kl = kl_estimate(old, ref_lp[arm][:, None], cfg.kl_estimator)
            rewards = token_rewards(r[arm], mask, -beta * kl)
            old_v = v.detach().expand(N, 1).clone()
            adv, ret = _gae(rewards, old_v, mask, cfg)
        for _ in range(cfg.num_ppo_epochs):
            perm = torch.randperm(N)
            for k in range(cfg.num_mini_batches):
                s = perm[k * mb : (k + 1) * mb]
                logp = theta.log_softmax(-1)[arm[s]][:, None]
                loss, _ = ppo.ppo_loss(logp, old[s], v.expand(mb, 1), old_v[s], adv[s], ret[s], mask[s], cfg, mb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    pi = theta.detach().softmax(-1)
    tv = 0.5 * (pi - pi_star).abs().sum().item()
    assert tv < 0.02, (pi.tolist(), pi_star.tolist())
    assert 0.5 * (ref_lp.exp() - pi_star).abs().sum().item() > 0.3  # the test can tell π* from π_ref
    assert v.item() == pytest.approx(beta * torch.logsumexp(ref_lp + r / beta, 0).item(), abs=0.02)


# ----------------------------------------------------------------------------- critic


def test_value_model_from_reward_model_and_from_policy(tiny_model, tmp_path) -> None:
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    torch.nn.init.normal_(rm.score.weight)
    rm.save_pretrained(tmp_path / "rm")
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    from_rm = load_value_model(str(tmp_path / "rm"))
    assert isinstance(from_rm, ValueModel) and from_rm.training
    torch.testing.assert_close(from_rm.head.weight, rm.score.weight)
    vals = token_values(from_rm, ids, attn, start=3)
    assert vals.shape == (2, 3)
    # the value before the last token = the reward model's score of the sequence without that token
    rm.eval()
    with torch.no_grad():
        expect = rm(input_ids=ids[1:, :-1], attention_mask=attn[1:, :-1]).logits[0, 0]
    assert vals[1, -1].item() == pytest.approx(expect.item(), rel=1e-4, abs=1e-5)
    from_policy = load_value_model(tiny_model)
    assert torch.count_nonzero(token_values(from_policy, ids, attn, start=3)) == 0  # zero-initialised head
    with pytest.raises(AlignRLError, match="not a Hugging Face model directory"):
        load_value_model(str(tmp_path))


# ----------------------------------------------------------------------------- trainer

REWARD_FILE = """
def digits(prompts, completions, completion_ids, **kw):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]
"""


def _setup(tmp_path):
    (tmp_path / "rew.py").write_text(REWARD_FILE)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}="} for a in range(40)])
    return [f"train_file={tmp_path / 'p.jsonl'}", f"reward_funcs=[{tmp_path / 'rew.py'}:digits]", "progress_bar=false"]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_first_minibatch_ratio_one_and_learns(tiny_model, tmp_path) -> None:
    """Every rollout's first minibatch has ρ = 1, approx_kl = 0, clipfrac = 0; the reward rises, KL moves."""
    args = _setup(tmp_path) + [
        f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", "max_steps=12", "prompts_per_step=8",
        "num_generations=2", "max_completion_length=8", "learning_rate=1e-2", "num_mini_batches=2",
        "temperature=1.0", "missing_eos_penalty=0.0", "seed=1",
    ]  # fmt: skip
    final = ppo.train(load_config(ppo.PPOConfig, None, args))
    rows = _metrics(tmp_path / "run")
    for m in rows:
        assert m["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert abs(m["policy/first_minibatch_approx_kl_k1"]) < 1e-6
        assert m["policy/first_minibatch_clipfrac"] == 0.0
    for key in ("objective/scores", "objective/non_score_reward", "objective/kl", "objective/kl_k3",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg", "val/clipfrac_avg",
                "val/explained_variance", "objective/entropy", "advantages/mean", "returns/mean",
                "completion_length/mean", "eos_rate", "kl_coef"):  # fmt: skip
        assert key in rows[-1], key
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # policy = reference at step 1
    assert rows[-1]["objective/kl"] > 0.05
    first = sum(m["objective/scores"] for m in rows[:3]) / 3
    last = sum(m["objective/scores"] for m in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert (final / "config.json").is_file() and (tmp_path / "run" / "value_model" / "config.json").is_file()


def test_ppo_bf16_autocast_rollout_logprobs_near_training_pass(tiny_model, tmp_path) -> None:
    """Under bf16 autocast the rollout samples with bf16 linear weights, the reference holds them in bf16: the
    first minibatch's ratio is 1 up to bf16 rounding of the two forward paths, nowhere near the clip range."""
    args = _setup(tmp_path) + [
        f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", "max_steps=2", "prompts_per_step=4",
        "num_generations=2", "max_completion_length=6", "autocast=bfloat16", "learning_rate=1e-2",
    ]  # fmt: skip
    ppo.train(load_config(ppo.PPOConfig, None, args))
    for m in _metrics(tmp_path / "run"):
        assert m["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=0.02)
        assert m["policy/first_minibatch_clipfrac"] == 0.0


def test_ppo_shared_critic_lora_adaptive_kl(tiny_model, tmp_path) -> None:
    """Shared-trunk value head, LoRA policy (reference = adapter off) and the adaptive KL controller run."""
    args = _setup(tmp_path) + [
        f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", "max_steps=2", "prompts_per_step=4",
        "max_completion_length=6", "critic=shared", "lora_r=4", "lora_target_modules=[q_proj,v_proj]",
        "adaptive_kl=true", "kl_coef=0.1", "kl_target=0.01", "kl_horizon=10", "kl_estimator=k3",
        "num_ppo_epochs=2", "micro_batch_size=2", "dual_clip=3.0", "whiten_rewards=true", "learning_rate=1e-2",
    ]  # fmt: skip
    ppo.train(load_config(ppo.PPOConfig, None, args))
    rows = _metrics(tmp_path / "run")
    assert rows[0]["kl_coef"] == 0.1 and rows[1]["kl_coef"] != 0.1
    assert rows[0]["policy/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "run" / "value_head.pt").is_file()


def test_ppo_config_errors(tiny_model, tmp_path, capsys) -> None:
    base = ["train", "ppo", f"model={tiny_model}", f"output_dir={tmp_path / 'o'}"]
    assert main(base) == 2
    assert "reward_funcs" in capsys.readouterr().err
    assert main(base + ["reward_funcs=[gsm8k]", "prompts_per_step=3", "num_mini_batches=2"]) == 2
    err = capsys.readouterr().err
    assert "num_mini_batches" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["reward_funcs=[gsm8k]", "critic=shared", f"value_model={tiny_model}"]) == 2
    assert "value_model" in capsys.readouterr().err
    assert main(base + ["reward_funcs=[gsm8k]", "dual_clip=0.5"]) == 2
    assert "dual_clip" in capsys.readouterr().err


def test_shared_values_from_the_trimmed_logprob_pass_equal_a_full_forward(tiny_model) -> None:
    """The shared critic reads its values off the log-prob forward, which skips columns no target needs
    (common left padding, right padding after the last completion token): the values at scored positions equal
    a full-width trunk forward's, and the columns after the last scored one are 0."""
    from alignrl.logprobs import token_logprobs
    from alignrl.models import load_causal_lm
    from alignrl.value_model import ValueHead, captured_hidden, shared_values, values_from_logprob_pass

    model = load_causal_lm(tiny_model).eval()
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)  # zero-initialised otherwise: every value would be 0
    B, P, C = 3, 6, 7
    ids = torch.randint(3, 60, (B, P + C))
    attn = torch.ones(B, P + C, dtype=torch.long)
    attn[:, :2] = 0  # left padding common to every row
    attn[1, 2] = 0
    target = _mask([4, 2, 1], C)  # the last 3 completion columns are padding in every row
    attn[:, P:] = target
    with torch.no_grad(), captured_hidden(model) as hidden:
        token_logprobs(model, ids, attn, target, start=P)
        got = values_from_logprob_pass(head, hidden[-1], attn, target, start=P)
        want = shared_values(model, head, ids, attn, start=P)
    assert hidden[0].shape[1] == P + 4 - 2  # the pass really was trimmed on both sides
    m = target.bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    assert got.shape == want.shape and (got[:, 4:] == 0).all() and want[m].abs().min() > 0


def test_separate_critic_values_skip_columns_no_target_needs(tiny_model) -> None:
    """With a target mask, the value model runs only the columns the scored positions need and returns the same
    values there as a full-width forward (0 after the last scored column)."""
    critic = load_value_model(tiny_model)
    torch.nn.init.normal_(critic.head.weight)  # a causal-LM init zeroes the head: every value would be 0
    torch.manual_seed(0)
    B, P, C = 3, 6, 7
    ids = torch.randint(3, 60, (B, P + C))
    attn = torch.ones(B, P + C, dtype=torch.long)
    attn[:, :2] = 0
    target = _mask([4, 2, 1], C)
    attn[:, P:] = target
    widths = []
    record = lambda m, a, kw: widths.append(kw["input_ids"].shape[1])  # noqa: E731
    hook = critic.trunk.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        got = token_values(critic, ids, attn, start=P, target_mask=target)
        hook.remove()
        want = token_values(critic, ids, attn, start=P)
    assert widths == [P + 4 - 2]
    m = target.bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    assert got.shape == want.shape and (got[:, 4:] == 0).all() and want[m].abs().min() > 0
