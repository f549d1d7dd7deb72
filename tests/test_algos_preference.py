"""DPO-family losses and Bradley–Terry against python-float formulas and the sanity values of docs/algorithms.md."""

from __future__ import annotations

import math

import pytest
import torch

from alignrl.algos.preference import PREFERENCE_LOSSES, bradley_terry_loss, log1mexp, preference_loss
from alignrl.errors import AlignRLError

DT = torch.float64
LN2 = 0.693147


def _nls(z: float) -> float:
    """−log σ(z) in python floats."""
    return math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z))


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=DT)


def _pairs(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    lw = torch.randint(1, 40, (n,), generator=g)
    ll = torch.randint(1, 40, (n,), generator=g)
    pw = -torch.rand(n, generator=g, dtype=DT) * lw * 2
    pl = -torch.rand(n, generator=g, dtype=DT) * ll * 2
    rw = pw + torch.randn(n, generator=g, dtype=DT) * 3
    rl = pl + torch.randn(n, generator=g, dtype=DT) * 3
    return dict(
        policy_chosen_logps=pw,
        policy_rejected_logps=pl,
        chosen_lengths=lw,
        rejected_lengths=ll,
        ref_chosen_logps=rw,
        ref_rejected_logps=rl,
    )


def _ref_loss(
    kind: str,
    pw: float,
    pl: float,
    lw: int,
    ll: int,
    rw: float,
    rl: float,
    beta: float,
    eps: float,
    gamma: float,
    lam: float,
) -> tuple[float, float, float]:
    h = (pw - rw) - (pl - rl)
    if kind == "sigmoid":
        return (1 - eps) * _nls(beta * h) + eps * _nls(-beta * h), beta * (pw - rw), beta * (pl - rl)
    if kind == "robust":
        loss = ((1 - eps) * _nls(beta * h) - eps * _nls(-beta * h)) / (1 - 2 * eps)
        return loss, beta * (pw - rw), beta * (pl - rl)
    if kind == "hinge":
        return max(0.0, 1 - beta * h), beta * (pw - rw), beta * (pl - rl)
    if kind == "ipo":
        ha = (pw / lw - rw / lw) - (pl / ll - rl / ll)
        return (ha - 1 / (2 * beta)) ** 2, beta * (pw - rw), beta * (pl - rl)
    if kind == "simpo":
        z = beta * pw / lw - beta * pl / ll - gamma
        return (1 - eps) * _nls(z) + eps * _nls(-z), beta * pw / lw, beta * pl / ll
    # orpo: naive python log odds (fine for the moderate values used here)
    xw, xl = pw / lw, pl / ll
    odds_w = math.log(math.exp(xw) / (1 - math.exp(xw)))
    odds_l = math.log(math.exp(xl) / (1 - math.exp(xl)))
    return -xw + lam * _nls(odds_w - odds_l), beta * xw, beta * xl


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)])
def test_reference(kind: str, beta: float, eps: float) -> None:
    if kind in ("ipo", "hinge", "orpo"):
        eps = 0.0
    batch = _pairs(seed=int(beta * 10) + len(kind))
    loss, cr, rr = preference_loss(kind, beta=beta, label_smoothing=eps, simpo_gamma=0.7, **batch)
    assert loss.shape == cr.shape == rr.shape == (6,)
    cols = [
        batch[k].tolist()
        for k in (
            "policy_chosen_logps",
            "policy_rejected_logps",
            "chosen_lengths",
            "rejected_lengths",
            "ref_chosen_logps",
            "ref_rejected_logps",
        )
    ]
    for i, row in enumerate(zip(*cols, strict=True)):
        el, ec, er = _ref_loss(kind, *row, beta=beta, eps=eps, gamma=0.7, lam=beta)
        assert loss[i].item() == pytest.approx(el, rel=1e-10, abs=1e-12)
        assert cr[i].item() == pytest.approx(ec, rel=1e-12)
        assert rr[i].item() == pytest.approx(er, rel=1e-12)


def test_orpo_lambda_and_reference_free() -> None:
    batch = _pairs(seed=3)
    del batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    l_beta, _, _ = preference_loss("orpo", beta=0.25, **batch)
    l_lam, _, _ = preference_loss("orpo", beta=0.1, orpo_lambda=0.25, **batch)
    torch.testing.assert_close(l_beta, l_lam)  # λ defaults to β
    nll = -batch["policy_chosen_logps"] / batch["chosen_lengths"]
    l_zero, _, _ = preference_loss("orpo", beta=0.1, orpo_lambda=0.0, **batch)
    torch.testing.assert_close(l_zero, nll)
    preference_loss("simpo", **batch)  # no reference needed


def test_h_zero_sanity_values() -> None:
    """docs/algorithms.md: at π_θ = π_ref, DPO / cDPO / robust = ln 2; IPO = 1/(4β²) = 25 at β = 0.1."""
    logps = _t(-12.0, -30.0, -5.5)
    lens = torch.tensor([4, 10, 3])
    common = dict(
        policy_chosen_logps=logps,
        policy_rejected_logps=logps * 2,
        chosen_lengths=lens,
        rejected_lengths=lens * 2,
        ref_chosen_logps=logps.clone(),
        ref_rejected_logps=logps * 2,
    )
    for kind, eps in [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2)]:
        loss, cr, rr = preference_loss(kind, beta=0.1, label_smoothing=eps, **common)
        assert loss.tolist() == pytest.approx([LN2] * 3, abs=1e-6)
        assert cr.tolist() == [0.0] * 3 and rr.tolist() == [0.0] * 3
    loss, _, _ = preference_loss("ipo", beta=0.1, **common)
    assert loss.tolist() == pytest.approx([25.0] * 3, rel=1e-12)
    loss, _, _ = preference_loss("hinge", beta=0.1, **common)
    assert loss.tolist() == pytest.approx([1.0] * 3, rel=1e-12)


def test_minus_log_sigmoid_point_one() -> None:
    # β = 1, h = 0.1 → −log σ(0.1) = 0.644397
    loss, cr, rr = preference_loss(
        "sigmoid",
        beta=1.0,
        policy_chosen_logps=_t(-1.0),
        policy_rejected_logps=_t(-2.0),
        chosen_lengths=torch.tensor([1]),
        rejected_lengths=torch.tensor([1]),
        ref_chosen_logps=_t(-1.1),
        ref_rejected_logps=_t(-2.0),
    )
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert (cr > rr).all()


def test_stable_for_large_margins_and_gradients() -> None:
    pw = _t(-1.0, -3000.0).requires_grad_(True)
    pl = _t(-3000.0, -1.0).requires_grad_(True)
    loss, _, _ = preference_loss(
        "sigmoid",
        beta=1.0,
        policy_chosen_logps=pw,
        policy_rejected_logps=pl,
        chosen_lengths=torch.tensor([5, 5]),
        rejected_lengths=torch.tensor([5, 5]),
        ref_chosen_logps=_t(-2.0, -2.0),
        ref_rejected_logps=_t(-2.0, -2.0),
    )
    assert loss[0].item() == pytest.approx(0.0, abs=1e-12)
    assert loss[1].item() == pytest.approx(2999.0, rel=1e-12)  # −log σ(−2999) ≈ 2999, not inf
    loss.sum().backward()
    assert pw.grad is not None and torch.isfinite(pw.grad).all()
    assert pw.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-12)


def test_log1mexp_precision() -> None:
    x = _t(-1e-12, -1e-5, -0.5, -1.0, -30.0)
    out = log1mexp(x)
    for xi, o in zip(x.tolist(), out.tolist(), strict=True):
        expected = math.log(-math.expm1(xi))
        assert o == pytest.approx(expected, rel=1e-12)
    # the naive log1p(−exp(x)) is badly off at −1e-12, which is why log1mexp exists
    naive = torch.log1p(-torch.exp(x[:1])).item()
    assert naive != pytest.approx(math.log(-math.expm1(-1e-12)), rel=1e-9)


def test_orpo_mean_logprob_zero_is_finite() -> None:
    loss, _, _ = preference_loss(
        "orpo",
        policy_chosen_logps=_t(0.0),
        policy_rejected_logps=_t(-3.0),
        chosen_lengths=torch.tensor([3]),
        rejected_lengths=torch.tensor([3]),
    )
    assert torch.isfinite(loss).all()


def test_preference_errors() -> None:
    batch = _pairs(seed=5)
    with pytest.raises(AlignRLError, match="sigmoid, ipo, hinge, robust, simpo, orpo"):
        preference_loss("dpo", **batch)
    no_ref = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    for kind in ("sigmoid", "ipo", "hinge", "robust"):
        with pytest.raises(AlignRLError, match="reference log-probs"):
            preference_loss(kind, **no_ref)
    with pytest.raises(AlignRLError, match="label_smoothing"):
        preference_loss("hinge", label_smoothing=0.1, **batch)
    with pytest.raises(AlignRLError, match="label_smoothing"):
        preference_loss("robust", label_smoothing=0.5, **batch)
    with pytest.raises(AlignRLError, match="beta"):
        preference_loss("ipo", beta=0.0, **batch)


# ----------------------------------------------------------------------------- Bradley–Terry


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coef", [0.0, 0.01])
def test_bradley_terry_reference(with_margin: bool, coef: float) -> None:
    g = torch.Generator().manual_seed(13)
    rc = torch.randn(8, generator=g, dtype=DT) * 2
    rr = torch.randn(8, generator=g, dtype=DT) * 2
    margin = torch.rand(8, generator=g, dtype=DT) if with_margin else None
    out = bradley_terry_loss(rc, rr, margin=margin, center_coef=coef)
    assert out.dim() == 0
    m = margin.tolist() if margin is not None else [0.0] * 8
    c, r = rc.tolist(), rr.tolist()
    expected = sum(_nls(c[i] - r[i] - m[i]) for i in range(8)) / 8
    expected += coef * sum((c[i] + r[i]) ** 2 for i in range(8)) / 8
    assert out.item() == pytest.approx(expected, rel=1e-12)


def test_bradley_terry_equal_rewards_is_ln2() -> None:
    r = _t(0.3, -1.0, 2.0)
    assert bradley_terry_loss(r, r.clone()).item() == pytest.approx(LN2, abs=1e-6)
