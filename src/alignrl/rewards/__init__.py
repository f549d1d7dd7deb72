"""Reward functions with TRL's signature `f(prompts, completions, completion_ids, **columns) -> list[float|None]`,
loaded by name (`gsm8k`), `package.module:function` or `path/to/file.py:function`, and combined by weight."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import signal
import threading
from collections.abc import Callable, Sequence
from math import nan  # not `import math`: the submodule alignrl.rewards.math would shadow it
from pathlib import Path
from typing import Any

import torch

from alignrl.errors import AlignRLError

RewardFn = Callable[..., list]

BUILTIN_REWARDS = {
    "gsm8k": "alignrl.rewards.math:gsm8k_flexible",
    "gsm8k_strict": "alignrl.rewards.math:gsm8k_strict",
    "boxed": "alignrl.rewards.math:boxed_reward",
    "think_format": "alignrl.rewards.math:think_answer_format",
    "code": "alignrl.rewards.code:code_reward",
}


def load_reward_function(spec: str) -> tuple[str, RewardFn]:
    """Resolve a reward spec to (name, callable); a model directory (with config.json) is a reward model."""
    if (Path(spec) / "config.json").is_file():
        from alignrl.rewards.reward_model import RewardModelScorer

        return RewardModelScorer.name_for(spec), RewardModelScorer(spec)
    target = BUILTIN_REWARDS.get(spec, spec)
    module_part, sep, fn_name = target.rpartition(":")
    if not sep or not module_part or not fn_name:
        raise AlignRLError(
            f"reward_funcs: {spec!r} is not a built-in ({', '.join(BUILTIN_REWARDS)}), "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise AlignRLError(f"reward_funcs: {spec!r}: file {module_part} not found")
        mod_spec = importlib.util.spec_from_file_location(f"alignrl_user_reward_{path.stem}", path)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - user code, SystemExit included
            raise AlignRLError(
                f"reward_funcs: importing {module_part} failed: {type(e).__name__}: {e}"
            ) from None
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise AlignRLError(f"reward_funcs: cannot import {module_part!r} ({e})") from None
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - user code, SystemExit included
            raise AlignRLError(f"reward_funcs: importing {module_part} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise AlignRLError(f"reward_funcs: {module_part} has no function {fn_name!r}")
    return (spec if spec in BUILTIN_REWARDS else fn_name), fn


def required_columns(fn: RewardFn) -> list[str]:
    """Keyword parameters without defaults beyond (prompts, completions, completion_ids)."""
    params = list(inspect.signature(fn).parameters.values())
    out = []
    for i, p in enumerate(params):
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty:
            continue
        if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and i >= 3):
            out.append(p.name)
    return out


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class _RealInterrupt(KeyboardInterrupt):
    """A Ctrl-C during a reward call (re-raised as the interrupt it is, not reported as the function's error)."""


class RewardTimeout(BaseException):
    """Raised inside a reward call that ran past its time limit. A BaseException, so that user code's
    `except Exception` does not swallow it."""


# The watchdog's signal: a real-time signal nothing else in the process uses (math_verify and user code keep
# SIGALRM, torchrun its SIGTERM/SIGUSR handling).
_WATCHDOG_SIGNAL = getattr(signal, "SIGRTMIN", signal.SIGUSR2) + 5


def call_with_timeout(fn: Callable[..., Any], timeout: float, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on this thread, or TimeoutError once it has run `timeout` seconds (0: no limit). A
    watchdog thread sends the main thread a signal whose handler raises RewardTimeout inside the call, which
    also interrupts blocking waits; the call keeps the main thread (its signal.alarm, CUDA device, grad mode).
    Off the main thread, where Python cannot deliver signals, the call has no limit."""
    if not timeout or threading.current_thread() is not threading.main_thread():
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _RealInterrupt(*e.args) from None
    active = [True]

    def on_signal(signum: int, frame: Any) -> None:
        if active[0]:
            raise RewardTimeout

    previous = signal.signal(_WATCHDOG_SIGNAL, on_signal)
    main = threading.main_thread().ident
    watchdog = threading.Timer(timeout, lambda: active[0] and signal.pthread_kill(main, _WATCHDOG_SIGNAL))
    watchdog.daemon = True
    watchdog.start()
    try:
        result = fn(*args, **kwargs)
        active[0] = False
        return result
    except RewardTimeout:
        raise TimeoutError from None
    except KeyboardInterrupt as e:
        raise _RealInterrupt(*e.args) from None
    finally:
        active[0] = False
        watchdog.cancel()
        signal.signal(_WATCHDOG_SIGNAL, previous)


def check_sampling_options(cfg: Any) -> None:
    """Sampling options shared by the online trainers: temperature > 0, top_p in (0, 1], top_k ≥ 0, and the
    reward-call timeout ≥ 0."""
    if cfg.temperature <= 0:
        raise AlignRLError(f"temperature: must be > 0 for RL sampling, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise AlignRLError(f"top_p: must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise AlignRLError(f"top_k: must be ≥ 0 (0 = off), got {cfg.top_k}")
    if cfg.reward_timeout < 0:
        raise AlignRLError(f"reward_timeout: must be ≥ 0 seconds (0 = no limit), got {cfg.reward_timeout}")


class RewardFunctions:
    """Several reward functions scored together: [N, F] raw rewards (NaN for None) and their weighted sum."""

    def __init__(
        self,
        specs: Sequence[str],
        weights: Sequence[float] | None,
        columns: set[str],
        data_name: str,
        timeout: float = 0.0,
    ):
        """`timeout` > 0: seconds one call may take before the run stops with an error naming the function."""
        self.timeout = timeout
        if not specs:
            raise AlignRLError("reward_funcs: at least one reward function is required")
        if weights and len(weights) != len(specs):
            raise AlignRLError(f"reward_weights: {len(weights)} weights for {len(specs)} reward functions")
        self.fns: list[tuple[str, RewardFn]] = []
        for spec in specs:
            name, fn = load_reward_function(spec)
            missing = [c for c in required_columns(fn) if c not in columns]
            if missing:
                raise AlignRLError(
                    f"reward function {name} needs column {missing[0]!r}, which {data_name} does not have"
                )
            self.fns.append((name, fn))
        self.weights = torch.tensor(list(weights) if weights else [1.0] * len(specs), dtype=torch.float32)
        self.configured = len(self.fns)  # functions added later (a length penalty) are not a reward signal
        self.unrewarded = [0, 0]  # samples scored since take_unrewarded() without a number from any of them, all

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.fns]

    def add(self, name: str, fn: RewardFn, weight: float = 1.0) -> None:
        """Add a reward function built in code (e.g. the overlong penalty)."""
        self.fns.append((name, fn))
        self.weights = torch.cat([self.weights, torch.tensor([weight])])

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: dict[str, list],
    ) -> torch.Tensor:
        """Raw rewards [N, F]; None becomes NaN (that function does not apply to that sample)."""
        n = len(completions)
        out = torch.full((n, len(self.fns)), nan)
        for j, (name, fn) in enumerate(self.fns):
            try:
                values = call_with_timeout(fn, self.timeout, prompts, completions, completion_ids, **columns)
            except (AlignRLError, _RealInterrupt):
                raise
            except KeyError as e:
                raise AlignRLError(
                    f"reward function {name} raised KeyError {e} (a missing dataset column?)"
                ) from None
            except TimeoutError:
                raise AlignRLError(
                    f"reward function {name} did not return within {self.timeout:g} s (reward_timeout); raise "
                    "reward_timeout if it is only slow"
                ) from None
            except BaseException as e:  # noqa: BLE001 - user code (SystemExit too): report it in one line
                raise AlignRLError(f"reward function {name} raised {type(e).__name__}: {e}") from None
            if not isinstance(values, (list, tuple)) or len(values) != n:
                got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
                raise AlignRLError(f"reward function {name} returned {got} values for {n} completions")
            for i, v in enumerate(values):
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise AlignRLError(
                        f"reward function {name} returned {v!r} (not a number or None) at index {i}"
                    )
                if abs(v) == float("inf"):  # NaN is kept: it means "does not apply", like None
                    raise AlignRLError(f"reward function {name} returned {v} at index {i} (not finite)")
                if abs(v) > _FLOAT32_MAX:
                    raise AlignRLError(
                        f"reward function {name} returned {v!r} at index {i}: beyond the float32 range (±3.4e38)"
                    )
                out[i, j] = float(v)
        self.unrewarded[0] += int(out[:, : self.configured].isnan().all(dim=1).sum())
        self.unrewarded[1] += n
        return out

    def take_unrewarded(self) -> tuple[int, int]:
        """(samples no configured function gave a number, samples scored) since the last call."""
        counts, self.unrewarded = tuple(self.unrewarded), [0, 0]
        return counts  # type: ignore[return-value]

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions, ignoring NaN (None) entries; a sample with no applicable function gets 0."""
        return torch.nansum(raw * self.weights.to(raw.device), dim=1)
