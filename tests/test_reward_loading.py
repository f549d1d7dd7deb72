from __future__ import annotations

import math

import pytest

from alignrl.errors import AlignRLError
from alignrl.rewards import RewardFunctions, load_reward_function


def _write(tmp_path, body: str) -> str:
    p = tmp_path / "my_rewards.py"
    p.write_text(body)
    return str(p)


def test_builtin_and_file_and_module(tmp_path):
    name, fn = load_reward_function("gsm8k")
    assert name == "gsm8k" and fn([""], ["so 42"], [[1]], answer=["#### 42"]) == [1.0]
    path = _write(
        tmp_path,
        "def length(prompts, completions, completion_ids, **kw):\n"
        "    return [float(len(c)) for c in completions]\n",
    )
    name, fn = load_reward_function(f"{path}:length")
    assert name == "length" and fn(["p"], ["abc"], [[1]]) == [3.0]
    assert load_reward_function("alignrl.rewards.math:gsm8k_strict")[0] == "gsm8k_strict"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonsense", "not a built-in"),
        ("missing_file.py:f", "file missing_file.py not found"),
        ("no.such.module:f", "cannot import 'no.such.module'"),
        ("alignrl.rewards.math:nope", "has no function 'nope'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(AlignRLError, match=message):
        load_reward_function(spec)


def test_missing_column_named_at_startup():
    with pytest.raises(AlignRLError, match="reward function gsm8k needs column 'answer', which data.jsonl"):
        RewardFunctions(["gsm8k"], None, {"prompt"}, "data.jsonl")


def test_raising_function_gives_one_line(tmp_path):
    path = _write(
        tmp_path, "def boom(prompts, completions, completion_ids, **kw):\n    raise ValueError('bad')\n"
    )
    fns = RewardFunctions([f"{path}:boom"], None, {"prompt"}, "d")
    with pytest.raises(AlignRLError, match="reward function boom raised ValueError: bad"):
        fns.score(["p"], ["c"], [[1]], {})


def test_wrong_count_and_type(tmp_path):
    path = _write(
        tmp_path,
        "def short(prompts, completions, completion_ids, **kw):\n    return [1.0]\n"
        "def text(prompts, completions, completion_ids, **kw):\n    return ['x'] * len(prompts)\n",
    )
    with pytest.raises(AlignRLError, match="reward function short returned 1 values for 2 completions"):
        RewardFunctions([f"{path}:short"], None, set(), "d").score(["a", "b"], ["c", "d"], [[1], [2]], {})
    with pytest.raises(AlignRLError, match="reward function text returned 'x'"):
        RewardFunctions([f"{path}:text"], None, set(), "d").score(["a"], ["c"], [[1]], {})


def test_none_excludes_function_for_that_sample(tmp_path):
    path = _write(
        tmp_path,
        "def a(prompts, completions, completion_ids, **kw):\n    return [1.0, None]\n"
        "def b(prompts, completions, completion_ids, **kw):\n    return [2.0, 3.0]\n",
    )
    fns = RewardFunctions([f"{path}:a", f"{path}:b"], [0.5, 2.0], set(), "d")
    raw = fns.score(["p", "q"], ["c", "d"], [[1], [2]], {})
    assert math.isnan(raw[1, 0])
    assert fns.combine(raw).tolist() == [0.5 * 1.0 + 2.0 * 2.0, 2.0 * 3.0]


def test_weights_count_checked():
    with pytest.raises(AlignRLError, match="reward_weights: 2 weights for 1 reward functions"):
        RewardFunctions(["gsm8k"], [1.0, 2.0], {"answer"}, "d")
