"""Reward functions, called as TRL calls them (`f(prompts=, completions=, completion_ids=, trainer_state=,
log_metric=, log_extra=, **columns) -> list[float|None]`, sync or async), loaded by name (`gsm8k`),
`package.module:function` or `path/to/file.py:function`, and combined by weight."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import nan  # not `import math`: the submodule alignrl.rewards.math would shadow it
from pathlib import Path
from types import ModuleType
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


def _run_reward_file(path: Path, shown: str, option: str = "reward_funcs") -> ModuleType:
    """Run a user's file as a module of its own (not in sys.modules); any error is one line naming it."""
    mod_spec = importlib.util.spec_from_file_location(f"alignrl_user_reward_{path.stem}", path)
    assert mod_spec and mod_spec.loader
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - user code, SystemExit included
        raise AlignRLError(f"{option}: importing {shown} failed: {type(e).__name__}: {e}") from None
    return module


def load_object(option: str, spec: str, files: dict[Path, ModuleType] | None = None, what: str = "function") -> Any:
    """The object `spec` names ('package.module:name' or 'path/to/file.py:name'; None if the module lacks it); a
    file runs as a module of its own, once per `files` cache; any failure is one line naming `option`."""
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise AlignRLError(f"{option}: {spec!r} is not 'package.module:{what}' or 'path/to/file.py:{what}'")
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise AlignRLError(f"{option}: {spec!r}: file {module_part} not found")
        files = {} if files is None else files
        key = path.resolve()
        module = files[key] = files.get(key) or _run_reward_file(path, module_part, option)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise AlignRLError(f"{option}: cannot import {module_part!r} ({e})") from None
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - user code, SystemExit included
            raise AlignRLError(f"{option}: importing {module_part} failed: {type(e).__name__}: {e}") from None
    return getattr(module, name, None)


def load_named(
    option: str, spec: str, builtins: dict[str, Any], what: str, files: dict[Path, ModuleType] | None = None
) -> tuple[str, Any]:
    """(name, callable) of a built-in (its value: the object or its 'module:name') or of a user's
    `package.module:NAME` / `path/to/file.py:NAME` (its name: NAME); every failure is one line naming `option`."""
    target = builtins.get(spec, spec)
    if not isinstance(target, str):
        return spec, target
    module_part, sep, name = target.rpartition(":")
    if not sep or not module_part or not name:
        raise AlignRLError(
            f"{option}: {spec!r} is not a built-in ({', '.join(builtins)}), 'package.module:{what}' or "
            f"'path/to/file.py:{what}'"
        )
    obj = load_object(option, target, files, what)
    if not callable(obj):
        raise AlignRLError(f"{option}: {module_part} has no {what.lower()} {name!r}")
    return (spec if spec in builtins else name), obj


def load_reward_function(spec: str, files: dict[Path, ModuleType] | None = None) -> tuple[str, RewardFn]:
    """Resolve a reward spec to (name, callable); a model directory (with config.json) is a reward model. `files`
    keeps the reward files already run, so that functions from one file share its module (as imported ones do)."""
    from alignrl.models import is_gguf

    if is_gguf(spec) or (Path(spec) / "config.json").is_file():
        from alignrl.rewards.reward_model import RewardModelScorer

        return RewardModelScorer.name_for(spec), RewardModelScorer(spec)
    return load_named("reward_funcs", spec, BUILTIN_REWARDS, "function", files)


# What every call passes besides the dataset columns, as TRL's GRPOTrainer does.
CALL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
# Dataset columns TRL does not pass on (the prompt arrives as `prompts`).
UNPASSED_COLUMNS = ("prompt", "completion", "completion_ids")


def _parameters(fn: RewardFn) -> list[inspect.Parameter] | None:
    """fn's parameters, or None when Python cannot tell (some builtins): then nothing is checked up front."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def required_columns(fn: RewardFn) -> list[str]:
    """Parameters without defaults that a call fills only from dataset columns (not one of CALL_KEYWORDS)."""
    return [
        p.name
        for p in _parameters(fn) or []
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in CALL_KEYWORDS
    ]


def passed_columns(columns: Iterable[str]) -> list[str]:
    """The dataset columns a reward call passes as keywords."""
    return [c for c in columns if c not in UNPASSED_COLUMNS and c not in CALL_KEYWORDS]


def signature_problem(fn: RewardFn, columns: set[str], data_name: str) -> str | None:
    """Why calling fn with CALL_KEYWORDS and the passed columns would fail, found before the run starts."""
    params = _parameters(fn)
    if params is None:
        return None
    for p in params:
        if p.kind == p.POSITIONAL_ONLY and p.default is p.empty:
            return f"takes {p.name!r} positionally only; reward functions get keyword arguments, as in TRL"
    passed = [*CALL_KEYWORDS, *passed_columns(columns)]
    for name in required_columns(fn):
        if name in UNPASSED_COLUMNS:
            return f"needs parameter {name!r}, which is not passed (as in TRL: the prompt arrives as `prompts`)"
        if name not in passed:
            return f"needs column {name!r}, which {data_name} does not have"
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        extra = [k for k in passed if k not in accepted]
        if extra:
            return f"does not accept keyword {extra[0]!r}, which every call passes (as in TRL): add **kwargs"
    return None


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
    """Options shared by the online trainers: temperature > 0, top_p in (0, 1], top_k ≥ 0, the reward-call timeout
    and eval_pass_k ≥ 0."""
    if cfg.temperature <= 0:
        raise AlignRLError(f"temperature: must be > 0 for RL sampling, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise AlignRLError(f"top_p: must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise AlignRLError(f"top_k: must be ≥ 0 (0 = off), got {cfg.top_k}")
    if cfg.reward_timeout < 0:
        raise AlignRLError(f"reward_timeout: must be ≥ 0 seconds (0 = no limit), got {cfg.reward_timeout}")
    if cfg.eval_pass_k < 0:
        raise AlignRLError(f"eval_pass_k: must be ≥ 0, got {cfg.eval_pass_k}")


@dataclass(frozen=True)
class TrainerStateView:
    """What reward functions read as `trainer_state` (under TRL, transformers' TrainerState), e.g. for rewards
    shaped by training progress. Frozen: the trainer sets a new one each step (RewardFunctions.set_step)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float | None = None


def _call_error(name: str, e: BaseException, timeout: float) -> BaseException:
    """The one-line error for reward function `name` having raised e (an AlignRLError or real interrupt as is)."""
    if isinstance(e, (AlignRLError, _RealInterrupt)):
        return e
    if isinstance(e, (TimeoutError, RewardTimeout)):
        return AlignRLError(
            f"reward function {name} did not return within {timeout:g} s (reward_timeout); raise reward_timeout "
            "if it is only slow"
        )
    if isinstance(e, KeyError):
        return AlignRLError(f"reward function {name} raised KeyError {e} (a missing dataset column?)")
    return AlignRLError(f"reward function {name} raised {type(e).__name__}: {e}")


def _await_all(awaitables: Sequence[Awaitable[Any]], timeout: float) -> list[tuple[bool, Any]]:
    """Await the async reward calls concurrently in a fresh event loop, as TRL does with asyncio.gather. Each result
    is (True, value) or (False, what it raised); one still running after `timeout` seconds (0: no limit) raised
    TimeoutError. On the main thread the watchdog also stops a call that blocks the loop."""
    results: list[tuple[bool, Any]] = [(False, TimeoutError())] * len(awaitables)

    async def settle(k: int, awaitable: Awaitable[Any]) -> None:
        try:
            results[k] = (True, await awaitable)
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except BaseException as e:  # noqa: BLE001 - user code (SystemExit too): the caller reports it in one line
            results[k] = (False, e)

    async def run_all() -> None:
        tasks = [asyncio.ensure_future(settle(k, a)) for k, a in enumerate(awaitables)]
        _, late = await asyncio.wait(tasks, timeout=timeout or None)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop runs in this thread
        try:
            call_with_timeout(asyncio.run, timeout, run_all())
        except TimeoutError:
            pass  # the watchdog stopped the loop: the calls that had not finished keep their TimeoutError
        return results
    with ThreadPoolExecutor(1) as pool:  # called from a running loop (a notebook): asyncio.run needs another thread
        pool.submit(asyncio.run, run_all()).result()
    return results


class RewardFunctions:
    """Several reward functions scored together: [N, F] raw rewards (NaN for None) and their weighted sum. Each is
    called as TRL's GRPOTrainer calls it, so a function written for TRL runs unchanged: keyword arguments only
    (CALL_KEYWORDS and every dataset column but the prompt), `async def` ones awaited concurrently."""

    def __init__(
        self,
        specs: Sequence[str],
        weights: Sequence[float] | None,
        columns: set[str],
        data_name: str,
        timeout: float = 0.0,
        max_steps: int = 0,
        required: bool = True,
    ):
        """`timeout` > 0: seconds one call may take before the run stops with an error naming the function;
        `max_steps`: the run's length, which reward functions see in `trainer_state`; `required`: at least one."""
        self.timeout = timeout
        if not specs and required:
            raise AlignRLError("reward_funcs: at least one reward function is required")
        if weights and len(weights) != len(specs):
            raise AlignRLError(f"reward_weights: {len(weights)} weights for {len(specs)} reward functions")
        self.fns: list[tuple[str, RewardFn]] = []
        files: dict[Path, ModuleType] = {}
        for spec in specs:
            name, fn = load_reward_function(spec, files)
            problem = signature_problem(fn, columns, data_name)
            if problem:
                raise AlignRLError(f"reward function {name} {problem}")
            self.fns.append((name, fn))
        self.weights = torch.tensor(list(weights) if weights else [1.0] * len(specs), dtype=torch.float32)
        self.configured = len(self.fns)  # functions added later (a length penalty) are not a reward signal
        self.unrewarded = [0, 0]  # samples scored since take_unrewarded() without a number from any of them, all
        self.state = TrainerStateView(0, max_steps)
        self._metrics: dict[str, list[float]] = {}  # log_metric values since take_logged()
        self._extra: dict[str, list[Any]] = {}  # log_extra columns since take_logged()

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.fns]

    def add(self, name: str, fn: RewardFn, weight: float = 1.0) -> None:
        """Add a reward function built in code (e.g. the overlong penalty)."""
        self.fns.append((name, fn))
        self.weights = torch.cat([self.weights, torch.tensor([weight])])

    def set_step(self, global_step: int, max_steps: int, epoch: float | None = None) -> None:
        """The training step reward functions see as `trainer_state`."""
        self.state = TrainerStateView(global_step, max_steps, epoch)

    def start_step(self, global_step: int, max_steps: int) -> None:
        """At the start of a training step: set `trainer_state` and forget what earlier calls (an evaluation)
        counted and logged, so that the step's unrewarded count and logged metrics are its own."""
        self.set_step(global_step, max_steps)
        self.take_unrewarded()
        self.take_logged()

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: dict[str, list],
    ) -> torch.Tensor:
        """Raw rewards [N, F]; None becomes NaN (that function does not apply to that sample). Synchronous
        functions run in order, then the async ones together."""
        n = len(completions)
        out = torch.full((n, len(self.fns)), nan)
        passed = {k: columns[k] for k in passed_columns(columns)}
        calls = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=self.state)
        pending: list[tuple[int, str, Awaitable[Any]]] = []
        try:
            for j, (name, fn) in enumerate(self.fns):
                logs = {"log_metric": self._metric_logger(name), "log_extra": self._extra_logger(name)}
                try:
                    values = call_with_timeout(fn, self.timeout, **passed, **calls, **logs)
                except BaseException as e:  # noqa: BLE001 - user code (SystemExit too): report it in one line
                    raise _call_error(name, e, self.timeout) from None
                if inspect.isawaitable(values):
                    pending.append((j, name, values))
                else:
                    self._store(out, j, name, values)
            results = _await_all([a for _, _, a in pending], self.timeout) if pending else []
        finally:
            for _, _, awaitable in pending:  # no "never awaited" warnings when a synchronous function failed
                getattr(awaitable, "close", lambda: None)()
        for (j, name, _), (ok, values) in zip(pending, results):
            if not ok:
                raise _call_error(name, values, self.timeout) from None
            self._store(out, j, name, values)
        if self.configured:  # (no configured function: nothing to be missing)
            self.unrewarded[0] += int(out[:, : self.configured].isnan().all(dim=1).sum())
            self.unrewarded[1] += n
        return out

    def _store(self, out: torch.Tensor, j: int, name: str, values: Any) -> None:
        """Check what function j returned (one number or None per completion, finite, within float32), then put
        it in column j of `out`."""
        n = out.shape[0]
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise AlignRLError(f"reward function {name} returned {got} values for {n} completions")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise AlignRLError(f"reward function {name} returned {v!r} (not a number or None) at index {i}")
            if abs(v) == float("inf"):  # NaN is kept: it means "does not apply", like None
                raise AlignRLError(f"reward function {name} returned {v} at index {i} (not finite)")
            if abs(v) > _FLOAT32_MAX:
                raise AlignRLError(
                    f"reward function {name} returned {v!r} at index {i}: beyond the float32 range (±3.4e38)"
                )
            out[i, j] = float(v)

    def _metric_logger(self, name: str) -> Callable[[str, float], None]:
        """`log_metric(key, value)` for function `name`: a scalar averaged into the step's metrics, as in TRL."""

        def log_metric(key: str, value: float) -> None:
            try:
                number = float(value)
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
                raise AlignRLError(f"reward function {name}: log_metric({key!r}, {value!r}): not a number") from None
            self._metrics.setdefault(str(key), []).append(number)

        return log_metric

    def _extra_logger(self, name: str) -> Callable[[str, list], None]:
        """`log_extra(column, values)` for function `name`: per-completion values for the logged samples."""

        def log_extra(column: str, values: list) -> None:
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise AlignRLError(
                    f"reward function {name}: log_extra({column!r}, {values!r}): needs a list, one value per completion"
                )
            self._extra.setdefault(str(column), []).extend(values)

        return log_extra

    def take_logged(self) -> tuple[dict[str, float], dict[str, list[Any]]]:
        """(mean of each `log_metric` name, `log_extra` columns) since the last call: the trainer adds them to the
        step's metrics and logged samples."""
        metrics = {k: sum(v) / len(v) for k, v in self._metrics.items()}
        extra, self._metrics, self._extra = self._extra, {}, {}
        return metrics, extra

    def take_unrewarded(self) -> tuple[int, int]:
        """(samples no configured function gave a number, samples scored) since the last call."""
        counts, self.unrewarded = tuple(self.unrewarded), [0, 0]
        return counts  # type: ignore[return-value]

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions, ignoring NaN (None) entries; a sample with no applicable function gets 0."""
        return torch.nansum(raw * self.weights.to(raw.device), dim=1)
