"""Fixed and adaptive (Ziegler et al.) KL controllers."""

from __future__ import annotations

import pytest

from alignrl.algos.kl_control import AdaptiveKLController, FixedKLController
from alignrl.errors import AlignRLError


def test_fixed_controller() -> None:
    c = FixedKLController(0.05)
    for kl in (0.0, 10.0, 1e6):
        c.update(kl, 256)
    assert c.value == 0.05
    state = c.state_dict()
    assert state == {"value": 0.05} and all(type(v) is float for v in state.values())
    d = FixedKLController(1.0)
    d.load_state_dict(state)
    assert d.value == 0.05


def test_adaptive_trajectory_by_hand() -> None:
    """init 0.1, target 6, horizon 10000; each step: err = clip(KL/6 − 1, ±0.2), β *= 1 + err·n/10000."""
    c = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    steps = [
        # (kl, n_steps, expected β after)
        (12.0, 256, 0.1 * 1.00512),  # err = +1 → clipped to +0.2: 1 + 0.2·256/1e4
        (6.0, 256, 0.1 * 1.00512),  # err = 0: unchanged
        (3.0, 512, 0.1 * 1.00512 * 0.98976),  # err = −0.5 → −0.2: 1 − 0.2·512/1e4
        (6.6, 1000, 0.1 * 1.00512 * 0.98976 * 1.01),  # err = +0.1 (inside the clip): 1 + 0.1·0.1
        (5.4, 2000, 0.1 * 1.00512 * 0.98976 * 1.01 * 0.98),  # err = −0.1: 1 − 0.1·0.2
    ]
    for kl, n, expected in steps:
        c.update(kl, n)
        assert c.value == pytest.approx(expected, rel=1e-12)
    assert c.value == pytest.approx(0.098468032997376, rel=1e-12)


def test_adaptive_state_round_trip() -> None:
    a = AdaptiveKLController(0.2, target=1.0, horizon=500)
    a.update(3.0, 64)
    state = a.state_dict()
    assert all(type(v) is float for v in state.values())
    b = AdaptiveKLController(9.9, target=7.0, horizon=3)
    b.load_state_dict(state)
    assert b.state_dict() == state
    for kl in (0.5, 1.1, 4.0):
        a.update(kl, 64)
        b.update(kl, 64)
    assert a.value == b.value
    assert a.value != pytest.approx(0.2)


@pytest.mark.parametrize("target,horizon", [(0.0, 100), (-1.0, 100), (1.0, 0), (float("nan"), 10)])
def test_adaptive_invalid(target: float, horizon: float) -> None:
    with pytest.raises(AlignRLError):
        AdaptiveKLController(0.1, target=target, horizon=horizon)
