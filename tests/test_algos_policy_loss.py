"""Clipped policy loss (token / GSPO / dual clip), loss aggregation, clipped value loss, approx-KL stats."""

from __future__ import annotations

import math

import pytest
import torch

from alignrl.algos.policy_loss import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    approx_kl_stats,
    clipped_policy_loss,
    clipped_value_loss,
)
from alignrl.errors import AlignRLError

DT = torch.float64


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=DT)


def _batch(seed: int, lengths: list[int], T: int, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    old = -torch.rand(B, T, generator=g, dtype=DT) * 4
    logp = old + spread * torch.randn(B, T, generator=g, dtype=DT)
    adv = torch.randn(B, generator=g, dtype=DT)
    return logp, old, adv, _mask(lengths, T)


def _ref_token_loss(rho: float, a: float, lo: float, hi: float, c: float | None = None) -> float:
    loss = max(-rho * a, -min(max(rho, 1 - lo), 1 + hi) * a)
    if c is not None and a < 0:
        loss = min(loss, -c * a)
    return loss


# ----------------------------------------------------------------------------- clipped policy loss


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)])
def test_token_loss_reference(eps_low: float, eps_high: float) -> None:
    lengths = [6, 3, 0, 5]
    logp, old, adv, mask = _batch(0, lengths, 6)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high)
    n_low = n_high = 0
    for b, n in enumerate(lengths):
        a = adv[b].item()
        for t in range(6):
            if t >= n:
                assert loss[b, t].item() == 0.0 and stats["is_clipped"][b, t].item() == 0.0
                continue
            rho = math.exp(logp[b, t].item() - old[b, t].item())
            assert loss[b, t].item() == pytest.approx(_ref_token_loss(rho, a, eps_low, eps_high), rel=1e-12)
            assert stats["ratio"][b, t].item() == pytest.approx(rho, rel=1e-12)
            low = rho < 1 - eps_low and a < 0
            high = rho > 1 + eps_high and a > 0
            n_low += low
            n_high += high
            assert stats["is_low_clipped"][b, t].item() == float(low)
            assert stats["is_high_clipped"][b, t].item() == float(high)
            assert stats["is_clipped"][b, t].item() == float(low or high)
    assert n_low + n_high > 0  # the batch exercises the clip


def test_advantages_per_token_shape() -> None:
    logp, old, adv, mask = _batch(1, [5, 4], 5)
    a_bt = adv.unsqueeze(-1).expand(2, 5).clone()
    l1, _ = clipped_policy_loss(logp, old, adv, mask)
    l2, _ = clipped_policy_loss(logp, old, a_bt, mask)
    torch.testing.assert_close(l1, l2)
    with pytest.raises(ValueError):
        clipped_policy_loss(logp, old, adv[:1], mask)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_one_value_and_gradient_are_minus_advantage(level: str) -> None:
    """GRPO note: at ρ = 1 the loss is −A per token (0 on average for centred A); the gradient is not 0."""
    lengths = [4, 2, 3, 4]
    _, old, _, mask = _batch(2, lengths, 4)
    adv = torch.tensor([1.5, -1.5, 0.5, -0.5], dtype=DT)  # centred
    logp = old.clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, importance_sampling=level)
    expected = -adv.unsqueeze(-1) * mask
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-15)
    assert stats["is_clipped"].sum().item() == 0.0
    loss.sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-15)
    # centred advantages, equal lengths → aggregated value 0, gradient not 0
    full = _mask([4, 4, 4, 4], 4)
    logp2 = old.clone().requires_grad_(True)
    loss2, _ = clipped_policy_loss(logp2, old, adv, full, importance_sampling=level)
    agg = aggregate_loss(loss2, full, "seq_mean_token_mean")
    agg.backward()
    assert abs(agg.item()) < 1e-15
    assert logp2.grad is not None and logp2.grad.abs().min().item() > 0


def test_clip_higher_asymmetry() -> None:
    mask = torch.ones(1, 1, dtype=DT)
    old = torch.zeros(1, 1, dtype=DT)
    pos = torch.tensor([2.0], dtype=DT)

    def run(rho: float, adv: torch.Tensor, lo: float, hi: float):
        logp = torch.full((1, 1), math.log(rho), dtype=DT, requires_grad=True)
        loss, stats = clipped_policy_loss(logp, old, adv, mask, eps_low=lo, eps_high=hi)
        loss.sum().backward()
        assert logp.grad is not None
        return loss.item(), logp.grad.item(), stats

    # ρ = 1.25, A > 0: clipped with the symmetric 0.2, not with DAPO's eps_high 0.28
    val, grad, stats = run(1.25, pos, 0.2, 0.2)
    assert val == pytest.approx(-1.2 * 2.0) and grad == 0.0 and stats["is_high_clipped"].item() == 1.0
    val, grad, stats = run(1.25, pos, 0.2, 0.28)
    assert val == pytest.approx(-1.25 * 2.0) and grad == pytest.approx(-1.25 * 2.0)
    assert stats["is_clipped"].item() == 0.0
    # the low side still clips at 1 − eps_low = 0.8 for A < 0
    val, grad, stats = run(0.75, -pos, 0.2, 0.28)
    assert val == pytest.approx(0.8 * 2.0) and grad == 0.0 and stats["is_low_clipped"].item() == 1.0
    # and ρ = 0.75 with A > 0 is never clipped (pessimistic min keeps the unclipped term)
    val, grad, stats = run(0.75, pos, 0.2, 0.28)
    assert val == pytest.approx(-0.75 * 2.0) and grad == pytest.approx(-0.75 * 2.0)


def test_gspo_sequence_ratio_value_and_gradient() -> None:
    lengths = [5, 3, 1, 4]
    T = 5
    logp0, old, adv, mask = _batch(3, lengths, T, spread=0.4)
    eps_low, eps_high = 0.2, 0.28
    logp = logp0.clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(
        logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, importance_sampling="sequence"
    )
    loss.sum().backward()
    assert logp.grad is not None
    n_clipped = 0
    for b, n in enumerate(lengths):
        s = math.exp(sum(logp0[b, t].item() - old[b, t].item() for t in range(n)) / n)
        a = adv[b].item()
        clipped = (s > 1 + eps_high and a > 0) or (s < 1 - eps_low and a < 0)
        n_clipped += clipped
        for t in range(T):
            if t >= n:
                assert loss[b, t].item() == 0.0 and logp.grad[b, t].item() == 0.0
                continue
            assert stats["ratio"][b, t].item() == pytest.approx(s, rel=1e-12)
            assert loss[b, t].item() == pytest.approx(_ref_token_loss(s, a, eps_low, eps_high), rel=1e-12)
            # GSPO-token: d s_i,t / d logp_t = s_i (no cross-token terms)
            assert logp.grad[b, t].item() == pytest.approx(0.0 if clipped else -a * s, rel=1e-12, abs=1e-15)
            assert stats["is_clipped"][b, t].item() == float(clipped)
    assert 0 < n_clipped < len(lengths)


def test_gspo_token_form_with_per_token_advantages() -> None:
    """GSPO-token: value s_i at each token; d L_t / d logp_t' = −A_t·s_i·[t = t'], no cross-token terms."""
    lengths = [5, 3, 4]
    T = 5
    logp0, old, _, mask = _batch(13, lengths, T, spread=0.05)  # small spread: nothing clipped
    adv = torch.randn(3, T, generator=torch.Generator().manual_seed(14), dtype=DT)
    logp = logp0.clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, importance_sampling="sequence")
    assert stats["is_clipped"].sum().item() == 0.0
    (grad_one,) = torch.autograd.grad(loss[0, 1], logp, retain_graph=True)
    (grad_all,) = torch.autograd.grad(loss.sum(), logp)
    for b, n in enumerate(lengths):
        s = math.exp(sum(logp0[b, t].item() - old[b, t].item() for t in range(n)) / n)
        for t in range(T):
            e_all = -adv[b, t].item() * s if t < n else 0.0
            assert grad_all[b, t].item() == pytest.approx(e_all, rel=1e-12, abs=1e-15)
            e_one = -adv[0, 1].item() * s if (b, t) == (0, 1) else 0.0
            assert grad_one[b, t].item() == pytest.approx(e_one, rel=1e-12, abs=1e-15)


def test_gspo_token_form_matches_sequence_objective_gradient() -> None:
    """With seq_mean_token_mean, GSPO-token's gradient equals that of the plain sequence objective."""
    lengths = [6, 2, 4]
    logp0, old, adv, mask = _batch(4, lengths, 6, spread=0.05)  # small spread: nothing clipped
    logp = logp0.clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, importance_sampling="sequence")
    assert stats["is_clipped"].sum().item() == 0.0
    aggregate_loss(loss, mask, "seq_mean_token_mean").backward()
    # sequence objective written directly: J = mean_i −A_i·exp(mean_t log ρ_it)
    logp_ref = logp0.clone().requires_grad_(True)
    seq = []
    for b, n in enumerate(lengths):
        s_log = (logp_ref[b, :n] - old[b, :n]).sum() / n
        seq.append(-adv[b] * torch.exp(s_log))
    torch.stack(seq).mean().backward()
    assert logp.grad is not None and logp_ref.grad is not None
    torch.testing.assert_close(logp.grad, logp_ref.grad, rtol=1e-12, atol=1e-15)


def test_dual_clip_caps_the_loss() -> None:
    mask = torch.ones(1, 3, dtype=DT)
    old = torch.zeros(1, 3, dtype=DT)
    rhos = [5.0, 2.0, 1.0]
    logp = torch.tensor([[math.log(r) for r in rhos]], dtype=DT, requires_grad=True)
    a = torch.tensor([-1.0], dtype=DT)
    loss, stats = clipped_policy_loss(logp, old, a, mask, dual_clip=3.0)
    # ρ = 5, A = −1: PPO loss −ρA = 5, capped at −c·A = 3 (a max would have left it at 5)
    # ρ = 2 and ρ = 1: cap not binding, loss = ρ|A| (a max would have raised both to 3)
    assert loss[0].tolist() == pytest.approx([3.0, 2.0, 1.0], rel=1e-12)
    assert stats["is_dual_clipped"][0].tolist() == [1.0, 0.0, 0.0]
    loss.sum().backward()
    assert logp.grad is not None
    assert logp.grad[0].tolist() == pytest.approx([0.0, 2.0, 1.0], rel=1e-12)
    plain, _ = clipped_policy_loss(logp.detach(), old, a, mask)
    assert plain[0].tolist() == pytest.approx([5.0, 2.0, 1.0], rel=1e-12)


def test_dual_clip_reference_and_positive_advantages_untouched() -> None:
    lengths = [6, 6, 4]
    logp, old, adv, mask = _batch(5, lengths, 6, spread=1.5)
    loss, _ = clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    n_capped = 0
    for b, n in enumerate(lengths):
        a = adv[b].item()
        for t in range(n):
            rho = math.exp(logp[b, t].item() - old[b, t].item())
            e = _ref_token_loss(rho, a, 0.2, 0.2, 3.0)
            n_capped += e != _ref_token_loss(rho, a, 0.2, 0.2)
            assert loss[b, t].item() == pytest.approx(e, rel=1e-12)
    assert n_capped > 0


@pytest.mark.parametrize("pad_logp,pad_old", [(-math.inf, 50.0), (0.0, -math.inf), (math.nan, math.nan)])
def test_padding_garbage_gives_no_nan(pad_logp: float, pad_old: float) -> None:
    logp, old, adv, mask = _batch(6, [4, 2], 4)
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, pad_logp)).requires_grad_(True)
    old = torch.where(mask.bool(), old, torch.full_like(old, pad_old))
    for level in ("token", "sequence"):
        loss, stats = clipped_policy_loss(logp, old, adv, mask, importance_sampling=level, dual_clip=3.0)
        total = aggregate_loss(loss, mask, "token_mean")
        (grad,) = torch.autograd.grad(total, logp)
        assert torch.isfinite(total)
        assert torch.isfinite(grad).all()
        assert all(torch.isfinite(v).all() for v in stats.values())
        assert torch.equal(grad * (1 - mask), torch.zeros_like(grad))


def test_policy_loss_option_errors() -> None:
    logp, old, adv, mask = _batch(7, [3], 3)
    with pytest.raises(AlignRLError, match="token, sequence"):
        clipped_policy_loss(logp, old, adv, mask, importance_sampling="seq")
    with pytest.raises(AlignRLError, match="dual_clip"):
        clipped_policy_loss(logp, old, adv, mask, dual_clip=0.5)


# ----------------------------------------------------------------------------- aggregation


def _ref_aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int) -> float:
    rows = [
        [v for v, m in zip(lr, mr, strict=True) if m]
        for lr, mr in zip(loss.tolist(), mask.tolist(), strict=True)
    ]
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_len)


LENGTHS = [7, 2, 0, 5, 1, 7]


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_reference(mode: str) -> None:
    T = 7
    loss = torch.randn(len(LENGTHS), T, generator=torch.Generator().manual_seed(8), dtype=DT)
    mask = _mask(LENGTHS, T)
    out = aggregate_loss(loss, mask, mode, max_completion_length=10)
    assert out.dim() == 0 and torch.isfinite(out)
    assert out.item() == pytest.approx(_ref_aggregate(loss, mask, mode, 10), rel=1e-12)
    # the three modes really differ on ragged batches
    others = [aggregate_loss(loss, mask, m, max_completion_length=10).item() for m in LOSS_AGGREGATIONS]
    assert len({round(v, 12) for v in others}) == 3


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_microbatch_split_sums_to_full(mode: str) -> None:
    T = 7
    g = torch.Generator().manual_seed(9)
    loss = torch.randn(len(LENGTHS), T, generator=g, dtype=DT)
    mask = _mask(LENGTHS, T)
    full = aggregate_loss(loss, mask, mode, max_completion_length=T)
    n_tok = mask.sum()
    n_seq = len(LENGTHS)
    # micro-batches are re-padded to their own longest row, as a data collator would do
    total = torch.zeros((), dtype=DT)
    for lo, hi in [(0, 2), (2, 6)]:
        sub_mask = mask[lo:hi]
        width = max(int(sub_mask.sum(dim=1).max().item()), 1)
        total = total + aggregate_loss(
            loss[lo:hi, :width],
            sub_mask[:, :width],
            mode,
            num_tokens=n_tok,
            num_seqs=n_seq,
            max_completion_length=T,
        )
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    # and without the global counts the sum is NOT the full-batch loss
    naive = sum(
        aggregate_loss(loss[lo:hi], mask[lo:hi], mode, max_completion_length=T).item()
        for lo, hi in [(0, 2), (2, 6)]
    )
    assert naive != pytest.approx(full.item(), rel=1e-6)


def test_aggregate_defaults_and_empty_rows() -> None:
    loss = torch.randn(3, 4, generator=torch.Generator().manual_seed(10), dtype=DT, requires_grad=True)
    mask = _mask([0, 0, 0], 4)
    for mode in LOSS_AGGREGATIONS:
        out = aggregate_loss(loss, mask, mode)
        (grad,) = torch.autograd.grad(out, loss)
        assert out.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    # default max_completion_length is this batch's T
    mask = _mask([4, 1, 2], 4)
    a = aggregate_loss(loss, mask, "seq_mean_token_sum_norm")
    b = aggregate_loss(loss, mask, "seq_mean_token_sum_norm", max_completion_length=4, num_seqs=3)
    assert a.item() == pytest.approx(b.item(), rel=1e-15)
    with pytest.raises(AlignRLError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"):
        aggregate_loss(loss, mask, "sum")


# ----------------------------------------------------------------------------- value loss, KL stats


def test_clipped_value_loss_reference() -> None:
    lengths = [6, 3, 5]
    g = torch.Generator().manual_seed(11)
    old_v = torch.randn(3, 6, generator=g, dtype=DT)
    values = old_v + 0.4 * torch.randn(3, 6, generator=g, dtype=DT)
    returns = torch.randn(3, 6, generator=g, dtype=DT)
    mask = _mask(lengths, 6)
    c = 0.2
    loss, frac = clipped_value_loss(values, old_v, returns, mask, c)
    n_frac = 0
    for b, n in enumerate(lengths):
        for t in range(6):
            if t >= n:
                assert loss[b, t].item() == 0.0 and frac[b, t].item() == 0.0
                continue
            v, vo, r = values[b, t].item(), old_v[b, t].item(), returns[b, t].item()
            vc = min(max(v, vo - c), vo + c)
            e = 0.5 * max((v - r) ** 2, (vc - r) ** 2)
            assert loss[b, t].item() == pytest.approx(e, rel=1e-12)
            f = float((vc - r) ** 2 > (v - r) ** 2)
            n_frac += f
            assert frac[b, t].item() == f
    assert 0 < n_frac < sum(lengths)


def test_clipped_value_loss_hand_case() -> None:
    mask = torch.ones(1, 2, dtype=DT)
    # V moved from 0 to 1, R = 2: clipped V = 0.2 is further from R → 0.5·1.8² = 1.62, clipped
    # V moved from 0 to 1, R = -1: unclipped (1 − (−1))² = 4 dominates → 2.0, not clipped
    values = torch.tensor([[1.0, 1.0]], dtype=DT, requires_grad=True)
    loss, frac = clipped_value_loss(
        values, torch.zeros(1, 2, dtype=DT), torch.tensor([[2.0, -1.0]], dtype=DT), mask, 0.2
    )
    assert loss[0].tolist() == pytest.approx([1.62, 2.0], rel=1e-12)
    assert frac[0].tolist() == [1.0, 0.0]
    loss.sum().backward()
    assert values.grad is not None and values.grad[0].tolist() == pytest.approx([0.0, 2.0], rel=1e-12)


def test_approx_kl_stats() -> None:
    lengths = [5, 2, 4]
    logp, old, _, mask = _batch(12, lengths, 5)
    stats = approx_kl_stats(logp, old, mask)
    k1 = []
    k3 = []
    for b, n in enumerate(lengths):
        for t in range(n):
            lr = logp[b, t].item() - old[b, t].item()
            k1.append(-lr)
            k3.append(math.exp(lr) - 1 - lr)
    assert stats["approx_kl_k1"].item() == pytest.approx(sum(k1) / len(k1), rel=1e-12)
    assert stats["approx_kl_k3"].item() == pytest.approx(sum(k3) / len(k3), rel=1e-12)
    zero = approx_kl_stats(old, old.clone(), mask)
    assert zero["approx_kl_k1"].item() == 0.0 and zero["approx_kl_k3"].item() == 0.0
