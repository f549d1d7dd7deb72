"""Every example config loads into its algorithm's config class (unknown keys or wrong types would fail)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from alignrl.cli import ALGORITHMS
from alignrl.config import load_config

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))


def _algo(path: Path) -> str:
    stem = path.stem
    if stem in ("dapo", "dr_grpo", "gspo") or stem.startswith("grpo"):
        return "grpo"
    return stem.split("_")[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads(path):
    algo = _algo(path)
    assert algo in ALGORITHMS, f"{path.name}: no algorithm {algo}"
    module, cls = ALGORITHMS[algo]
    cfg = load_config(getattr(importlib.import_module(module), cls), str(path))
    assert cfg.model
