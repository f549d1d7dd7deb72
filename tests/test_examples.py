"""Every example config loads into its algorithm's config class (unknown keys or wrong types would fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignrl.algorithms import ALGORITHMS
from alignrl.config import load_config

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))


def _algo(path: Path) -> str:
    """The algorithm an example is for: its name, or the longest registered prefix (GRPO variants: grpo)."""
    if path.stem in ("dapo", "dr_grpo", "gspo"):
        return "grpo"
    return max((a for a in ALGORITHMS if path.stem.startswith(a)), key=len, default=path.stem)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads(path):
    algo = _algo(path)
    assert algo in ALGORITHMS, f"{path.name}: no algorithm {algo}"
    cfg = load_config(ALGORITHMS[algo].load()[1], str(path))
    assert cfg.model
