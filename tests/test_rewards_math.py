"""Built-in verifiable rewards: GSM8K, \\boxed{} comparison, format rewards, DAPO overlong penalty."""

from __future__ import annotations

import sys

import pytest

from alignrl.errors import AlignRLError
from alignrl.rewards.math import (
    answers_match,
    boxed_reward,
    completion_text,
    extract_answer,
    extract_boxed,
    extract_gsm8k_reference,
    format_reward_factory,
    gsm8k_flexible,
    gsm8k_reward,
    gsm8k_strict,
    normalize_number,
    overlong_penalty_factory,
    soft_overlong_penalty,
    think_answer_format,
)


def _chat(text: str) -> list[dict[str, str]]:
    """A chat-format completion with one assistant message."""
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### $5", "5"),
        ("#### -3", "-3"),
        ("#### 2.50", "2.5"),
        ("first #### 1 then #### 2", "2"),
        ("42", "42"),
        (" $1,000 ", "1000"),
        ("#### ", None),
    ],
)
def test_extract_gsm8k_reference(answer: str, expected: str | None) -> None:
    assert extract_gsm8k_reference(answer) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 3 apples.\n#### 42", "42"),
        ("#### 1 and later #### 7", "7"),
        ("#### $1,000.00", "1000"),
        ("#### -12", "-12"),
        ("the answer is 42", None),
        ("", None),
    ],
)
def test_extract_answer_strict(text: str, expected: str | None) -> None:
    assert extract_answer(text, "strict") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 1,234.", "1234"),
        ("It was -5 degrees", "-5"),
        ("It costs $3.50 in total", "3.5"),
        ("10-5=5", "5"),
        ("so x = 42.0", "42"),
        ("the value is -0", "0"),
        ("about .5 of it", "0.5"),
        ("no digits here", None),
        ("#### 17 is what I think", "17"),
        ("1,2,3", "3"),
    ],
)
def test_extract_answer_flexible(text: str, expected: str | None) -> None:
    assert extract_answer(text, "flexible") == expected


def test_extract_answer_rejects_unknown_mode() -> None:
    with pytest.raises(AlignRLError, match="mode"):
        extract_answer("42", "fuzzy")


def test_normalize_number_and_matching() -> None:
    assert normalize_number("42.0") == normalize_number("42") == "42"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("1e3") == "1000"
    assert normalize_number("0.10") == "0.1"
    assert normalize_number("nan") is None
    assert normalize_number("1,2") is None  # a list, not a number with thousands separators
    assert normalize_number("12,345,678") == "12345678"
    assert normalize_number("1e999999999") is None
    assert normalize_number("12345678901234567890123456789.5") == "12345678901234567890123456789.5"
    assert answers_match("42.00", "42")
    assert answers_match("$1,000", "1000")
    assert not answers_match("41", "42")
    assert not answers_match(None, "42")
    assert answers_match("Paris", " Paris ")


def test_gsm8k_reward_modes_and_format_score() -> None:
    completions = [
        "Half of 144 is 72.\n#### 72",  # correct, strict format
        "So she sold 72 clips.",  # correct number, no #### line
        "#### 71",  # wrong, strict format present
        "no idea",  # nothing to extract
    ]
    answer = ["... #### 72"] * 4
    assert gsm8k_reward([""] * 4, completions, answer=answer) == [1.0, 1.0, 0.0, 0.0]
    assert gsm8k_reward([""] * 4, completions, answer=answer, mode="strict") == [1.0, 0.0, 0.0, 0.0]
    assert gsm8k_reward([""] * 4, completions, answer=answer, mode="strict", format_score=0.1) == [
        1.0,
        0.0,
        0.1,
        0.0,
    ]
    assert gsm8k_strict([""] * 4, completions, None, answer=answer) == [1.0, 0.0, 0.0, 0.0]
    assert gsm8k_flexible([""] * 4, completions, None, answer=answer) == [1.0, 1.0, 0.0, 0.0]
    assert gsm8k_strict.__name__ == "gsm8k_strict"
    assert gsm8k_flexible.__name__ == "gsm8k_flexible"


def test_gsm8k_reward_accepts_chat_completions_and_numeric_answers() -> None:
    completions = [_chat("#### 1,500"), _chat("I get 12.0 cookies")]
    assert gsm8k_reward(["q1", "q2"], completions, [[1], [2]], answer=[1500, "12"]) == [1.0, 1.0]


def test_gsm8k_reward_errors() -> None:
    with pytest.raises(AlignRLError, match="answer"):
        gsm8k_reward(["a", "b"], ["1", "2"], answer=["1"])
    with pytest.raises(AlignRLError, match="mode"):
        gsm8k_reward(["a"], ["1"], answer=["1"], mode="loose")


def test_completion_text_forms() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text(_chat("hi")) == "hi"
    multi = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert completion_text(multi) == "a"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]
    assert completion_text(parts) == "xy"
    assert completion_text([]) == ""
    with pytest.raises(AlignRLError):
        completion_text(42)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{\sqrt{2}}} done", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"$\boxed {x^{2}}$", "x^{2}"),
        (r"\boxed 5$", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and an unclosed \boxed{\frac{1}{2}", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_boxed_reward_fallback_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    completions = [
        r"The answer is $\boxed{\dfrac{1}{2}}$.",
        r"\boxed{0.5}",
        r"\boxed{\text{(B)}}",
        r"\boxed{3}",
        "I forgot to box it: 3",
        _chat(r"\boxed{1,000}"),
        r"\boxed{1,2}",
    ]
    answer = [r"\frac12", r"\frac{1}{2}", "(B)", "4", "3", "1000", "12"]
    assert boxed_reward([""] * 7, completions, answer=answer) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_boxed_reward_reference_with_solution_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)
    reference = r"We compute ... so the result is $\boxed{12}$."
    assert boxed_reward([""], [r"\boxed{12}"], answer=[reference]) == [1.0]
    assert boxed_reward([""], [r"\boxed{12}"], answer=[None]) == [0.0]


def test_boxed_reward_symbolic_with_math_verify() -> None:
    pytest.importorskip("math_verify")
    completions = [r"\boxed{x^2 + 2x}", r"\boxed{\frac{\sqrt{2}}{2}}", r"\boxed{3}"]
    answer = ["2x + x^2", r"\frac{1}{\sqrt{2}}", "4"]
    assert boxed_reward([""] * 3, completions, answer=answer) == [1.0, 1.0, 0.0]


def test_think_answer_format_and_factory() -> None:
    good = "<think>\nreasoning\n</think>\n<answer>42</answer>"
    assert think_answer_format(["", "", ""], [good, "<answer>42</answer>", _chat(good)]) == [1.0, 0.0, 1.0]
    assert think_answer_format.__name__ == "think_answer_format"
    only_digits = format_reward_factory(r"\d+", name="digits_only")
    assert only_digits(["", ""], ["123", "12a"]) == [1.0, 0.0]
    assert only_digits.__name__ == "digits_only"
    with pytest.raises(AlignRLError, match="pattern"):
        format_reward_factory("(unclosed")


def test_soft_overlong_penalty_boundaries() -> None:
    lengths = [0, 80, 81, 90, 99, 100, 101, 500]
    ids = [[7] * n for n in lengths]
    out = soft_overlong_penalty(
        [""] * len(ids), [""] * len(ids), ids, max_completion_length=100, overlong_cache=20
    )
    assert out == pytest.approx([0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0])


def test_overlong_penalty_factory() -> None:
    fn = overlong_penalty_factory(max_completion_length=10, overlong_cache=4)
    assert fn.__name__ == "soft_overlong_penalty"
    ids = [[1] * 6, [1] * 8, [1] * 10, [1] * 11]
    assert fn(prompts=[""] * 4, completions=[""] * 4, completion_ids=ids, answer=["x"] * 4) == pytest.approx(
        [0.0, -0.5, -1.0, -1.0]
    )
    with pytest.raises(AlignRLError, match="overlong_cache"):
        overlong_penalty_factory(10, 0)
    with pytest.raises(AlignRLError, match="overlong_cache"):
        overlong_penalty_factory(10, 11)
    with pytest.raises(AlignRLError, match="max_completion_length"):
        overlong_penalty_factory(0, 1)
    with pytest.raises(AlignRLError, match="completion_ids"):
        fn([""], [""], None)
