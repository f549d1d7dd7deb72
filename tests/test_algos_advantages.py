"""Group advantages, RLOO, GAE, return-to-go and masked whitening against python loops."""

from __future__ import annotations

import math
import statistics
import threading

import pytest
import torch

from alignrl.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    gae,
    group_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    token_rewards,
)
from alignrl.algos.utils import masked_mean, masked_sum, masked_var, whiten
from alignrl.errors import AlignRLError

DT = torch.float64


def _rewards(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ----------------------------------------------------------------------------- group / RLOO


def _ref_group(rewards: list[float], g: int, scale: str, eps: float) -> list[float]:
    batch_std = statistics.stdev(rewards)
    out = []
    for start in range(0, len(rewards), g):
        grp = rewards[start : start + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
        for r in grp:
            if scale == "group":
                out.append((r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [2, 4, 8])
def test_group_advantages_reference(scale: str, g: int) -> None:
    r = _rewards(6 * g, seed=g)
    out = group_advantages(r, g, scale=scale, eps=1e-4)
    expected = _ref_group(r.tolist(), g, scale, 1e-4)
    assert out.shape == r.shape
    for a, e in zip(out.tolist(), expected, strict=True):
        assert a == pytest.approx(e, rel=1e-12, abs=1e-12)


def test_group_uses_unbiased_std() -> None:
    r = torch.tensor([0.0, 1.0], dtype=DT)
    # unbiased std of {0, 1} is 1/sqrt(2); biased would be 0.5
    out = group_advantages(r, 2, eps=0.0)
    assert out.tolist() == pytest.approx([-0.5 * math.sqrt(2), 0.5 * math.sqrt(2)], rel=1e-12)


def test_group_default_scale_and_eps() -> None:
    r = _rewards(8, seed=3)
    assert torch.equal(group_advantages(r, 4), group_advantages(r, 4, "group", 1e-4))


def test_equal_rewards_give_zero_advantage() -> None:
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=DT)
    for scale in ("group", "batch", "none"):
        out = group_advantages(r, 4, scale=scale)
        assert torch.equal(out[:4], torch.zeros(4, dtype=DT))
        assert (out[4:] != 0).all()
    assert torch.equal(rloo_advantages(r, 4)[:4], torch.zeros(4, dtype=DT))


def test_rloo_reference() -> None:
    g = 5
    r = _rewards(4 * g, seed=11)
    out = rloo_advantages(r, g)
    vals = r.tolist()
    for i, a in enumerate(out.tolist()):
        start = (i // g) * g
        others = [vals[j] for j in range(start, start + g) if j != i]
        assert a == pytest.approx(vals[i] - sum(others) / len(others), rel=1e-12, abs=1e-12)
    # identity (docs/algorithms.md): G/(G−1)·(r − mean)
    centred = group_advantages(r, g, scale="none")
    torch.testing.assert_close(out, centred * g / (g - 1), rtol=1e-12, atol=1e-12)


def test_registry_uniform_signature() -> None:
    r = _rewards(12, seed=5)
    mask = _mask([3, 1, 4, 2, 4, 4, 0, 2, 1, 3, 4, 2], 4)
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "gae", "reinforce_pp", "reinforce_pp_baseline"}
    for scale in ("group", "batch", "none"):
        adv, ret = ADVANTAGE_ESTIMATORS["grpo"](AdvantageInputs(r, mask, 3, scale=scale))
        torch.testing.assert_close(adv, group_advantages(r, 3, scale)[:, None].expand(12, 4))
        torch.testing.assert_close(ret, adv)
    adv, _ = ADVANTAGE_ESTIMATORS["rloo"](AdvantageInputs(r, mask, 3))
    torch.testing.assert_close(adv, rloo_advantages(r, 3)[:, None].expand(12, 4))


def _whiten64(x: list[list[float]], lengths: list[int]) -> list[list[float]]:
    vals = [x[b][t] for b, n in enumerate(lengths) for t in range(n)]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    return [[(x[b][t] - mean) / math.sqrt(var + 1e-8) if t < n else 0.0 for t in range(len(x[b]))]
            for b, n in enumerate(lengths)]  # fmt: skip


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_estimators_reference(baseline: bool) -> None:
    """REINFORCE++: r_t = kl_rewards_t + score at the last token (scores minus the group mean for -baseline),
    return-to-go with γ, whitened over the batch's valid tokens; float64 reference from the formula."""
    lengths, T, G, gamma = [3, 5, 1, 4, 5, 2], 5, 2, 0.9
    scores = _rewards(6, seed=7)
    mask = _mask(lengths, T)
    kl = torch.randn(6, T, generator=torch.Generator().manual_seed(8), dtype=DT) * 0.1
    name = "reinforce_pp_baseline" if baseline else "reinforce_pp"
    adv, ret = ADVANTAGE_ESTIMATORS[name](AdvantageInputs(scores, mask, G, kl_rewards=kl, gamma=gamma))
    s = scores.tolist()
    if baseline:
        s = [v - (s[i - i % G] + s[i - i % G + 1]) / 2 for i, v in enumerate(s)]
    r = [[(kl[b, t].item() if t < n else 0.0) + (s[b] if t == n - 1 else 0.0) for t in range(T)]
         for b, n in enumerate(lengths)]  # fmt: skip
    g = [[sum(gamma**k * r[b][t + k] for k in range(n - t)) if t < n else 0.0 for t in range(T)]
         for b, n in enumerate(lengths)]  # fmt: skip
    torch.testing.assert_close(ret, torch.tensor(g, dtype=DT), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, torch.tensor(_whiten64(g, lengths), dtype=DT), rtol=1e-10, atol=1e-10)


def _in_two_parts(name: str, inputs: AdvantageInputs, split: int) -> torch.Tensor:
    """The estimator run on rows [:split] and [split:] in two threads whose `total` sums over both (an all-reduce)."""
    barrier = threading.Barrier(2)
    slots: list[torch.Tensor | None] = [None, None]
    out: list[torch.Tensor | None] = [None, None]

    def part(i: int, rows: slice) -> None:
        def total(x: torch.Tensor) -> torch.Tensor:
            slots[i] = x
            barrier.wait()
            summed = slots[0] + slots[1]  # type: ignore[operator]
            barrier.wait()
            return summed

        x = inputs
        sub = AdvantageInputs(x.scores[rows], x.mask[rows], x.group_size, scale=x.scale, gamma=x.gamma, total=total)
        out[i] = ADVANTAGE_ESTIMATORS[name](sub)[0]

    threads = [threading.Thread(target=part, args=(i, p)) for i, p in enumerate([slice(0, split), slice(split, None)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return torch.cat(out)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,scale", [("grpo", "batch"), ("reinforce_pp", "group"), ("reinforce_pp_baseline", "group")]
)
def test_batch_statistics_from_parts_equal_the_whole_batch(name: str, scale: str) -> None:
    """With `total` summing over the parts of a batch split across processes, "batch" scaling and REINFORCE++
    whitening give the whole batch's values."""
    r = _rewards(8, seed=11)
    inputs = AdvantageInputs(r, _mask([2, 3, 1, 3, 3, 2, 1, 2], 3), 2, scale=scale)
    whole = ADVANTAGE_ESTIMATORS[name](inputs)[0]
    torch.testing.assert_close(_in_two_parts(name, inputs, 4), whole, rtol=1e-12, atol=1e-12)


def test_group_errors() -> None:
    r = _rewards(10, seed=0)
    with pytest.raises(AlignRLError, match="divisible"):
        group_advantages(r, 4)
    with pytest.raises(AlignRLError, match="divisible"):
        rloo_advantages(r, 3)
    with pytest.raises(AlignRLError, match="group, batch, none"):
        group_advantages(r, 5, scale="std")
    with pytest.raises(AlignRLError, match="group_size"):
        group_advantages(r, 1)
    with pytest.raises(AlignRLError, match="1-D"):
        group_advantages(r.view(2, 5), 5)


# ----------------------------------------------------------------------------- GAE / returns


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=DT)


def _ref_gae(
    r: list[float], v: list[float], n: int, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Direct double sum over the first n tokens; values past the end are 0."""
    T = len(r)
    vv = [v[t] if t < n else 0.0 for t in range(T)] + [0.0]
    deltas = [r[t] + gamma * vv[t + 1] - vv[t] for t in range(n)]
    adv = [0.0] * T
    ret = [0.0] * T
    for t in range(n):
        adv[t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
        ret[t] = adv[t] + v[t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.7)])
def test_gae_reference(gamma: float, lam: float) -> None:
    T = 9
    lengths = [9, 5, 1, 0, 7, 3]
    g = torch.Generator().manual_seed(42)
    rewards = torch.randn(len(lengths), T, generator=g, dtype=DT)
    values = torch.randn(len(lengths), T, generator=g, dtype=DT)
    mask = _mask(lengths, T)
    # garbage at padded positions must not leak
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask.bool(), values, torch.full_like(values, float("nan")))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.shape == ret.shape == (len(lengths), T)
    for b, n in enumerate(lengths):
        ea, er = _ref_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b].tolist() == pytest.approx(ea, rel=1e-10, abs=1e-10)
        assert ret[b].tolist() == pytest.approx(er, rel=1e-10, abs=1e-10)


def test_gae_bool_mask_and_lambda_one_is_return_minus_value() -> None:
    T = 6
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(3, T, generator=g, dtype=DT)
    values = torch.randn(3, T, generator=g, dtype=DT)
    mask = _mask([6, 4, 2], T)
    adv, ret = gae(rewards, values, mask.bool(), 1.0, 1.0)
    rtg = reinforce_pp_returns(rewards, mask, 1.0)
    torch.testing.assert_close(adv, (rtg - values) * mask)
    torch.testing.assert_close(ret, rtg)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_reference(gamma: float) -> None:
    T = 8
    lengths = [8, 3, 0, 5]
    rewards = torch.randn(len(lengths), T, generator=torch.Generator().manual_seed(3), dtype=DT)
    mask = _mask(lengths, T)
    out = reinforce_pp_returns(rewards, mask, gamma)
    for b, n in enumerate(lengths):
        r = rewards[b].tolist()
        expected = [sum(gamma**k * r[t + k] for k in range(n - t)) if t < n else 0.0 for t in range(T)]
        assert out[b].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- masked utils / whitening


def _valid(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]


def test_masked_reductions_reference() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, generator=g, dtype=DT)
    mask = _mask([6, 2, 0, 4], 6)
    x = torch.where(mask.bool(), x, torch.full_like(x, float("inf")))  # padded garbage
    vals = _valid(x, mask)
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals), rel=1e-12)
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals), rel=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(statistics.pvariance(vals), rel=1e-12)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(statistics.variance(vals), rel=1e-12)
    rows = masked_mean(x, mask, dim=1)
    for b in range(4):
        rv = _valid(x[b], mask[b])
        assert rows[b].item() == pytest.approx(sum(rv) / len(rv) if rv else 0.0, rel=1e-12)
    # bool masks give the same answers
    assert masked_mean(x, mask.bool()).item() == pytest.approx(sum(vals) / len(vals), rel=1e-12)


def test_masked_mean_empty_mask_no_nan_and_grad() -> None:
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=DT)
    out = masked_mean(x, mask)
    out.backward()
    assert out.item() == 0.0
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_reference(shift_mean: bool) -> None:
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 7, generator=g, dtype=DT) * 3 + 2
    mask = _mask([7, 4, 2], 7)
    out = whiten(x, mask, shift_mean=shift_mean)
    vals = _valid(x, mask)
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                e = (x[b, t].item() - mean) / math.sqrt(var + 1e-8)
                if not shift_mean:
                    e += mean
                assert out[b, t].item() == pytest.approx(e, rel=1e-12, abs=1e-12)
    w = _valid(out, mask)
    if shift_mean:
        assert sum(w) / len(w) == pytest.approx(0.0, abs=1e-12)
        assert statistics.pvariance(w) == pytest.approx(1.0, rel=1e-6)
    else:
        assert sum(w) / len(w) == pytest.approx(mean, rel=1e-12)


def test_masked_positions_inside_a_sequence_are_skipped() -> None:
    """Multi-turn episodes: tokens of another party (mask 0) inside a sequence are passed over, so returns, GAE and
    the score's position equal those of the same sequence with those tokens removed."""
    g = torch.Generator().manual_seed(4)
    holes = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1, 0, 0]], dtype=DT)  # model, env, model, env, model, padding
    keep = holes[0].nonzero().squeeze(-1)
    rewards, values = torch.randn(1, 10, generator=g, dtype=DT), torch.randn(1, 10, generator=g, dtype=DT)
    dense = torch.ones(1, len(keep), dtype=DT)
    torch.testing.assert_close(
        reinforce_pp_returns(rewards, holes, 0.9)[:, keep], reinforce_pp_returns(rewards[:, keep], dense, 0.9)
    )
    adv, ret = gae(rewards, values, holes, 0.9, 0.8)
    adv_d, ret_d = gae(rewards[:, keep], values[:, keep], dense, 0.9, 0.8)
    torch.testing.assert_close(adv[:, keep], adv_d)
    torch.testing.assert_close(ret[:, keep], ret_d)
    assert adv[holes == 0].abs().sum() == 0 and ret[holes == 0].abs().sum() == 0
    score = torch.tensor([2.0], dtype=DT)
    assert token_rewards(score, holes)[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 2.0, 0, 0]
