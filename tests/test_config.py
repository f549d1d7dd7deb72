from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from alignrl.config import TrainConfig, load_config, parse_overrides
from alignrl.errors import AlignRLError


@dataclass
class Cfg(TrainConfig):
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)
    weights: list[float] | None = None


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 1e-4\nmode: b\nnames: [x, y]\n")
    cfg = load_config(Cfg, str(p), ["max_steps=7", "weights=[1, 0.5]", "names=p,q"])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.mode == "b" and cfg.max_steps == 7
    assert cfg.weights == [1.0, 0.5] and cfg.names == ["p", "q"]


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rat: 1e-4\n")
    with pytest.raises(AlignRLError, match=r"c\.yaml: unknown key 'learning_rat'"):
        load_config(Cfg, str(p))


def test_unknown_override():
    with pytest.raises(AlignRLError, match="unknown option 'max_step'"):
        load_config(Cfg, None, ["max_step=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_steps=ten", "max_steps: expected an integer"),
        ("max_steps=1.5", "max_steps: expected an integer"),
        ("mode=c", "mode: must be one of a, b"),
        ("progress_bar=maybe", "progress_bar: expected true or false"),
        ("learning_rate=fast", "learning_rate: expected a number"),
        ("novalue", "expected key=value"),
    ],
)
def test_wrong_types(override, message):
    with pytest.raises(AlignRLError, match=message):
        load_config(Cfg, None, [override])


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(AlignRLError, match=r"bad\.yaml line \d+: invalid YAML"):
        load_config(Cfg, str(p))


def test_parse_overrides_yaml_scalars():
    assert parse_overrides(["a=1", "b=true", "c=x", "d=[1,2]"]) == {"a": 1, "b": True, "c": "x", "d": [1, 2]}


def test_grpo_micro_batch_size_must_not_be_negative():
    from alignrl.trainers.grpo import GRPOConfig

    with pytest.raises(AlignRLError, match="micro_batch_size: must be ≥ 0"):
        load_config(GRPOConfig, None, ["model=m", "micro_batch_size=-1"])
