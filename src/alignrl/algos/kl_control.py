"""KL-penalty coefficient controllers: fixed, and Ziegler et al.'s adaptive (proportional) controller."""

from __future__ import annotations

import math

from alignrl.errors import AlignRLError

__all__ = ["AdaptiveKLController", "FixedKLController"]


def _positive(name: str, x: float) -> float:
    x = float(x)
    if not (math.isfinite(x) and x > 0):
        raise AlignRLError(f"{name} must be a finite number > 0, got {x}")
    return x


class FixedKLController:
    """Constant KL coefficient: `value` never changes."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept so fixed and adaptive controllers are interchangeable)."""

    def state_dict(self) -> dict[str, float]:
        """{"value": β} as plain floats, for checkpoints."""
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore `value` from state_dict()."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): err = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + err·n_steps/horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = _positive("target KL", target)
        self.horizon = _positive("KL horizon", horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """β ← β·(1 + clip(current_kl/target − 1, −0.2, 0.2)·n_steps/horizon)."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """{"value", "target", "horizon"} as plain floats, for checkpoints."""
        return {"value": float(self.value), "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore value (and target/horizon when present) from state_dict()."""
        self.value = float(state["value"])
        if "target" in state:
            self.target = _positive("target KL", state["target"])
        if "horizon" in state:
            self.horizon = _positive("KL horizon", state["horizon"])
