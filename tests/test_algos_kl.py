"""KL estimators against python-float formulas and the sanity values of docs/algorithms.md."""

from __future__ import annotations

import math

import pytest
import torch

from alignrl.algos.kl import KL_ESTIMATORS, kl_estimate
from alignrl.errors import AlignRLError

DT = torch.float64


def _ref(estimator: str, logp: float, ref_logp: float) -> float:
    lr = ref_logp - logp
    if estimator == "k1":
        return -lr
    if estimator == "k2":
        return 0.5 * lr * lr
    return math.exp(lr) - lr - 1.0


def test_registry_names() -> None:
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_matches_formula(estimator: str) -> None:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 7, generator=g, dtype=DT) * 5
    ref_logp = logp + torch.randn(4, 7, generator=g, dtype=DT)
    out = kl_estimate(logp, ref_logp, estimator)
    assert out.shape == logp.shape and out.dtype == DT
    for i in range(4):
        for j in range(7):
            expected = _ref(estimator, logp[i, j].item(), ref_logp[i, j].item())
            assert out[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert torch.equal(KL_ESTIMATORS[estimator](logp, ref_logp), out)


def test_default_is_k3() -> None:
    logp = torch.tensor([-1.0, -2.0], dtype=DT)
    ref = torch.tensor([-1.5, -0.5], dtype=DT)
    assert torch.equal(kl_estimate(logp, ref), kl_estimate(logp, ref, "k3"))
    assert not torch.allclose(kl_estimate(logp, ref), kl_estimate(logp, ref, "k1"))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_zero_when_policy_equals_reference(estimator: str) -> None:
    logp = -torch.rand(3, 5, generator=torch.Generator().manual_seed(1), dtype=DT) * 10
    assert torch.equal(kl_estimate(logp, logp.clone(), estimator), torch.zeros_like(logp))


def test_k3_nonnegative_and_k1_can_be_negative() -> None:
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(1000, generator=g, dtype=DT)
    ref = torch.randn(1000, generator=g, dtype=DT)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()


def test_k3_accurate_for_tiny_log_ratio() -> None:
    # exp(l) − l − 1 ≈ l²/2 for tiny l; a naive exp(l) − 1 − l loses every digit here
    lr = 1e-9
    out = kl_estimate(torch.tensor([0.0], dtype=DT), torch.tensor([lr], dtype=DT), "k3")
    assert out.item() == pytest.approx(lr * lr / 2, rel=1e-6, abs=0.0)


@pytest.mark.parametrize("mu", [0.3, 0.7])
def test_monte_carlo_gaussians(mu: float) -> None:
    """Samples from q = N(0,1) = π_θ, p = N(μ,1) = π_ref: E[k1] = E[k3] = KL(q‖p) = μ²/2."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2_000_000, generator=g, dtype=DT)
    logq = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    logp = -0.5 * (x - mu) ** 2 - 0.5 * math.log(2 * math.pi)
    kl_true = mu * mu / 2
    k1 = kl_estimate(logq, logp, "k1").mean().item()
    k3 = kl_estimate(logq, logp, "k3").mean().item()
    k2 = kl_estimate(logq, logp, "k2").mean().item()
    assert k1 == pytest.approx(kl_true, abs=3e-3)
    assert k3 == pytest.approx(kl_true, abs=3e-3)
    # k2 is biased: with l = μx − μ²/2, E[½l²] = μ²/2 + μ⁴/8
    assert k2 == pytest.approx(kl_true + mu**4 / 8, abs=3e-3)
    # k3 has lower variance than k1 (the point of the estimator)
    assert kl_estimate(logq, logp, "k3").var() < kl_estimate(logq, logp, "k1").var()


@pytest.mark.parametrize("bad", ["k4", "K3", "", "low_var_kl"])
def test_unknown_estimator(bad: str) -> None:
    t = torch.zeros(2, dtype=DT)
    with pytest.raises(AlignRLError, match="k1, k2, k3"):
        kl_estimate(t, t, bad)
