"""Built-in verifiable rewards: GSM8K answers, \\boxed{} answers, output format, DAPO overlong penalty.

Every reward function uses TRL's signature ``f(prompts, completions, completion_ids, **columns)``: extra
dataset columns (e.g. ``answer``) arrive as keyword lists aligned with ``prompts``; one float per completion.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from alignrl.errors import AlignRLError

RewardFn = Callable[..., list[float]]

__all__ = [
    "RewardFn",
    "answers_match",
    "boxed_reward",
    "completion_text",
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k_reference",
    "format_reward_factory",
    "gsm8k_flexible",
    "gsm8k_reward",
    "gsm8k_strict",
    "normalize_number",
    "overlong_penalty_factory",
    "soft_overlong_penalty",
    "think_answer_format",
]

# A number as written in prose: optional sign (not glued to a preceding word/digit, so "10-5" is not "-5"),
# optional "$", digits with proper thousands commas or plain digits, optional decimals; or ".5".
_DIGITS = r"\$?\s?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(r"(?:(?<![\w.)])-\s?)?" + _DIGITS)
_STRICT_RE = re.compile(r"####\s*(-?\s?" + _DIGITS + ")")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_WHITESPACE = re.compile(r"\s+")


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or the content of the last message of a chat completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, Sequence) and not isinstance(completion, (bytes, bytearray)):
        if not completion:
            return ""
        last = completion[-1]
        if isinstance(last, dict) and "content" in last:
            content = last["content"]
            if isinstance(content, str):
                return content
            if isinstance(content, Sequence):  # multimodal parts: [{"type": "text", "text": ...}]
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return "" if content is None else str(content)
        if isinstance(last, dict) and "text" in last:
            return str(last["text"])
        if all(isinstance(p, str) for p in completion):
            return "".join(completion)
    if completion is None:
        return ""
    kind = type(completion).__name__
    raise AlignRLError(f"unsupported completion type {kind}: expected a string or a list of messages")


def normalize_number(text: str) -> str | None:
    """Canonical decimal form of a number such as "1,234", "$5", "-0", "42.0" or "1e3"; None otherwise."""
    cleaned = _WHITESPACE.sub("", text.replace("$", "").replace("\u2212", "-")).rstrip(".")
    if "," in cleaned:  # only thousands separators: "1,234" is a number, "1,2" is not
        if not _THOUSANDS_RE.fullmatch(cleaned):
            return None
        cleaned = cleaned.replace(",", "")
    if not _PLAIN_NUMBER_RE.fullmatch(cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite() or abs(value.adjusted()) > 1000:  # refuse to expand "1e999999999"
        return None
    digits = format(value, "f")  # exact, unlike normalize(), which rounds to the context precision
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return "0" if digits in ("-0", "") else digits


def _clean_answer(text: str) -> str | None:
    """Strip commas, "$" and whitespace; numbers come back in canonical form, other text as-is."""
    number = normalize_number(text)
    if number is not None:
        return number
    cleaned = text.replace(",", "").replace("$", "").strip()
    return cleaned or None


def extract_gsm8k_reference(answer: str) -> str | None:
    """The reference answer after the last "####" (or the whole text if absent), cleaned and normalised."""
    if answer is None:
        return None
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return _clean_answer(text)


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """Answer in a completion: strict reads the last "#### N", flexible the last number in the text."""
    if mode not in ("strict", "flexible"):
        raise AlignRLError(f"unknown answer extraction mode {mode!r}: expected 'strict' or 'flexible'")
    text = completion_text(text)
    pattern = _STRICT_RE if mode == "strict" else _NUMBER_RE
    matches = pattern.findall(text)
    if not matches:
        return None
    return normalize_number(matches[-1])


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """True when both answers exist and are equal: numerically if both are numbers, else as strings."""
    if predicted is None or reference is None:
        return False
    a, b = normalize_number(predicted), normalize_number(reference)
    if a is not None and b is not None:
        return Decimal(a) == Decimal(b)
    return _clean_answer(predicted) == _clean_answer(reference)


def _column(name: str, values: Any, n: int) -> list[Any]:
    """A dataset column as a list of length n (a scalar is broadcast)."""
    if values is None:
        raise AlignRLError(f"reward function needs a dataset column {name!r}, which is missing")
    if isinstance(values, (str, bytes, int, float)):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise AlignRLError(f"column {name!r} has {len(values)} values for {n} completions")
    return values


def gsm8k_reward(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    answer: list[Any],
    mode: str = "flexible",
    format_score: float = 0.0,
    **kwargs: Any,
) -> list[float]:
    """GSM8K reward: 1.0 on a correct answer, else format_score when a "#### N" line is present, else 0.0."""
    if mode not in ("strict", "flexible"):
        raise AlignRLError(f"unknown gsm8k mode {mode!r}: expected 'strict' or 'flexible'")
    refs = _column("answer", answer, len(completions))
    rewards: list[float] = []
    for completion, ref in zip(completions, refs, strict=True):
        text = completion_text(completion)
        reference = extract_gsm8k_reference(str(ref)) if ref is not None else None
        predicted = extract_answer(text, mode)
        if answers_match(predicted, reference):
            rewards.append(1.0)
        elif extract_answer(text, "strict") is not None:
            rewards.append(float(format_score))
        else:
            rewards.append(0.0)
    return rewards


def gsm8k_strict(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    answer: list[Any],
    **kwargs: Any,
) -> list[float]:
    """GSM8K reward reading the last "#### N" of each completion."""
    kwargs.pop("mode", None)
    return gsm8k_reward(prompts, completions, completion_ids, answer=answer, mode="strict", **kwargs)


def gsm8k_flexible(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    answer: list[Any],
    **kwargs: Any,
) -> list[float]:
    """GSM8K reward reading the last number of each completion."""
    kwargs.pop("mode", None)
    return gsm8k_reward(prompts, completions, completion_ids, answer=answer, mode="flexible", **kwargs)


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces included); None if absent."""
    text = completion_text(text)
    starts = list(re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s)", text))
    if not starts:
        return None
    match = starts[-1]
    if match.group(1) != "{":  # "\boxed 5": the next token up to whitespace or "$"
        token = re.match(r"[^\s$]+", text[match.end() :])
        return token.group(0) if token else None
    end = _closing_brace(text, match.end())
    return None if end is None else text[match.end() : end].strip()


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the "}" closing the group opened just before `start`; None if it is never closed."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_LATEX_DROP = re.compile(r"\\left|\\right|\\displaystyle|\\!|\\,|\\;|\\:|\\ |\$|\^\{?\\circ\}?|\\%|%")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$|^(-?)\\[dt]?frac(\d)(\d)$")


def _normalize_latex(text: str) -> str:
    """Loose textual normal form of a LaTeX answer for the fallback comparison."""
    text = _LATEX_TEXT.sub(r"\1", text)
    text = _LATEX_DROP.sub("", text)
    text = text.replace("dfrac", "frac").replace("tfrac", "frac")
    text = _WHITESPACE.sub("", text).rstrip(".")
    while text.startswith("{") and _closing_brace(text, 1) == len(text) - 1:
        text = text[1:-1]
    return text


def _as_fraction(text: str) -> Fraction | None:
    """Exact value of a plain number, "a/b" or \\frac{a}{b}; None when it is not one of these."""
    number = normalize_number(text)
    if number is not None:
        return Fraction(Decimal(number))
    try:
        m = _LATEX_FRAC.match(text)
        if m:
            groups = m.groups()
            sign, num, den = groups[0:3] if groups[1] is not None else groups[3:6]
            if int(den) != 0:
                value = Fraction(int(num), int(den))
                return -value if sign else value
        m = re.fullmatch(r"(-?\d+)/(-?\d+)", text)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except ValueError:  # integers longer than Python's int-parsing digit limit
        return None
    return None


def _fallback_equal(predicted: str, reference: str) -> bool:
    """String/numeric equivalence used when math_verify is not installed."""
    a, b = _normalize_latex(predicted), _normalize_latex(reference)
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fb is not None and fa == fb


def _math_verify_equal(predicted: str, reference: str) -> bool | None:
    """Symbolic equivalence via math_verify; None when math_verify is unavailable or fails."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math_verify's timeouts use SIGALRM, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    predicted, reference = predicted.replace("$", ""), reference.replace("$", "")
    try:
        gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math_verify raises assorted sympy/timeout errors on odd input
        return None


def boxed_reward(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    answer: list[Any],
    **kwargs: Any,
) -> list[float]:
    """1.0 when the last \\boxed{} equals the reference (symbolically if math_verify is installed), else 0."""
    refs = _column("answer", answer, len(completions))
    rewards: list[float] = []
    for completion, ref in zip(completions, refs, strict=True):
        predicted = extract_boxed(completion_text(completion))
        reference = None if ref is None else str(ref).strip()
        if reference and "\\boxed" in reference:
            reference = extract_boxed(reference)
        if not predicted or not reference:
            rewards.append(0.0)
            continue
        if _fallback_equal(predicted, reference):
            rewards.append(1.0)
            continue
        verdict = _math_verify_equal(predicted, reference)
        rewards.append(1.0 if verdict else 0.0)
    return rewards


def format_reward_factory(pattern: str, name: str = "format_reward") -> RewardFn:
    """Reward function giving 1.0 when the whole completion matches `pattern` (re.DOTALL), else 0.0."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise AlignRLError(f"invalid format reward pattern {pattern!r}: {exc}") from None

    def format_reward(
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """1.0 for each completion matching the format pattern, else 0.0."""
        return [1.0 if compiled.fullmatch(completion_text(c)) else 0.0 for c in completions]

    format_reward.__name__ = name
    format_reward.__qualname__ = name
    return format_reward


think_answer_format = format_reward_factory(
    r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", name="think_answer_format"
)


def _check_overlong_args(max_completion_length: int, overlong_cache: int) -> None:
    """Validate the DAPO overlong-penalty lengths."""
    if not isinstance(max_completion_length, int) or max_completion_length <= 0:
        raise AlignRLError(f"max_completion_length must be a positive integer, got {max_completion_length!r}")
    if not isinstance(overlong_cache, int) or not 0 < overlong_cache <= max_completion_length:
        raise AlignRLError(
            f"overlong_cache must be an integer in (0, max_completion_length={max_completion_length}], "
            f"got {overlong_cache!r}"
        )


def soft_overlong_penalty(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None,
    *,
    max_completion_length: int,
    overlong_cache: int,
    **kwargs: Any,
) -> list[float]:
    """DAPO soft overlong penalty: 0 up to Lmax-Lcache, linear down to -1 at Lmax, -1 beyond."""
    _check_overlong_args(max_completion_length, overlong_cache)
    if completion_ids is None:
        raise AlignRLError("soft_overlong_penalty needs completion_ids (token ids of each completion)")
    if len(completion_ids) != len(completions):
        raise AlignRLError(f"got {len(completion_ids)} completion_ids for {len(completions)} completions")
    safe = max_completion_length - overlong_cache
    rewards: list[float] = []
    for ids in completion_ids:
        length = len(ids)
        if length <= safe:
            rewards.append(0.0)
        elif length <= max_completion_length:
            rewards.append((safe - length) / overlong_cache)
        else:
            rewards.append(-1.0)
    return rewards


def overlong_penalty_factory(max_completion_length: int, overlong_cache: int) -> RewardFn:
    """Soft overlong penalty with the lengths bound, as a TRL reward function."""
    _check_overlong_args(max_completion_length, overlong_cache)

    def overlong_penalty(
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """DAPO soft overlong penalty for the bound max_completion_length and overlong_cache."""
        kwargs.pop("max_completion_length", None)
        kwargs.pop("overlong_cache", None)
        return soft_overlong_penalty(
            prompts,
            completions,
            completion_ids,
            max_completion_length=max_completion_length,
            overlong_cache=overlong_cache,
            **kwargs,
        )

    overlong_penalty.__name__ = "soft_overlong_penalty"
    overlong_penalty.__qualname__ = "soft_overlong_penalty"
    return overlong_penalty
