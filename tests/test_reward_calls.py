"""Reward functions are called as TRL's GRPOTrainer calls them (issue #15 item 3): keywords only, every dataset
column, `trainer_state`, `log_metric` and `log_extra`, and `async def` functions awaited concurrently."""

from __future__ import annotations

import asyncio
import json
import textwrap

import pytest

from alignrl.cli import main
from alignrl.data import write_jsonl
from alignrl.errors import AlignRLError
from alignrl.rewards import RewardFunctions, required_columns

PROMPTS = ["sort 2 1", "sort 3 1 2"]
COMPLETIONS = ["1 2", "1 3 2"]
IDS = [[5, 6, 7], [8, 9]]
COLUMNS = {"answer": ["1 2", "1 2 3"], "solution": ["1 2", "1 3 2"]}


def _fns(tmp_path, source: str, name: str = "f", columns=("prompt", *COLUMNS), **kw) -> RewardFunctions:
    """RewardFunctions for function `name` of a reward file holding `source`."""
    path = tmp_path / "r.py"
    path.write_text(textwrap.dedent(source))
    return RewardFunctions([f"{path}:{name}"], None, set(columns), "data.jsonl", **kw)


def _score(fns: RewardFunctions, completions=COMPLETIONS) -> list[float]:
    return fns.score(PROMPTS, list(completions), IDS, dict(COLUMNS))[:, 0].tolist()


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f(completions, **kw):\n    return [float(len(c)) for c in completions]", [3.0, 5.0]),
        (
            "def f(prompts, completions, answer, **kwargs):\n"
            "    return [float(c == a) for c, a in zip(completions, answer)]",
            [1.0, 0.0],
        ),
        (
            "def f(completions, solution, **kwargs):\n"
            "    return [float(c == s) for c, s in zip(completions, solution)]",
            [1.0, 1.0],
        ),
        (
            "def f(*, completions, answer, solution, **kw):\n"
            "    return [float(a == s) for a, s in zip(answer, solution)]",
            [1.0, 0.0],
        ),
        ("def f(completion_ids, **kw):\n    return [float(len(i)) for i in completion_ids]", [3.0, 2.0]),
        ("def f(prompts, **kw):\n    return [float(len(p)) for p in prompts]", [8.0, 10.0]),
        (
            "class F:\n    def __call__(self, completions, answer, **kw):\n        return [1.0] * len(answer)\nf = F()",
            [1.0, 1.0],
        ),
    ],
    ids=[
        "completions",
        "prompts-completions-answer",
        "completions-solution",
        "keyword-only",
        "ids",
        "prompts",
        "callable",
    ],  # fmt: skip
)
def test_trl_signatures(tmp_path, source, expected):
    assert _score(_fns(tmp_path, source)) == expected


def test_only_keywords_and_every_column_but_prompt(tmp_path):
    fns = _fns(
        tmp_path,
        """
        SEEN = []
        def f(*args, **kwargs):
            SEEN.append((args, sorted(kwargs)))
            return [0.0] * len(kwargs["completions"])
        """,
    )
    _score(fns)
    seen = fns.fns[0][1].__globals__["SEEN"]
    assert seen == [
        ((), sorted(["prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra", *COLUMNS]))
    ]


def test_trainer_state_has_the_global_step(tmp_path):
    fns = _fns(
        tmp_path,
        """
        def f(completions, trainer_state, **kw):
            return [float(trainer_state.global_step) / trainer_state.max_steps] * len(completions)
        """,
    )
    fns.set_step(3, 4)
    assert _score(fns) == [0.75, 0.75]
    with pytest.raises(AttributeError):
        fns.state.global_step = 9  # read-only to reward functions: the trainer owns the step


def test_log_metric_and_log_extra_are_collected(tmp_path):
    fns = _fns(
        tmp_path,
        """
        def f(completions, log_metric, log_extra, **kw):
            log_metric("mean_length", sum(len(c) for c in completions) / len(completions))
            log_extra("length", [len(c) for c in completions])
            return [1.0] * len(completions)
        """,
    )
    _score(fns)
    _score(fns, ["1", "1 2 3 4 5"])
    metrics, extra = fns.take_logged()
    assert metrics == {"mean_length": 4.5}  # averaged over the calls since the last take, as TRL does per step
    assert extra == {"length": [3, 5, 1, 9]}
    assert fns.take_logged() == ({}, {})


def test_log_metric_needs_a_number(tmp_path):
    fns = _fns(tmp_path, "def f(completions, log_metric, **kw):\n    log_metric('m', 'high')\n    return [1.0, 1.0]")
    with pytest.raises(AlignRLError, match=r"^reward function f: log_metric\('m', 'high'\): not a number$"):
        _score(fns)


def test_conversational_completions(tmp_path):
    fns = _fns(
        tmp_path,
        """
        def f(prompts, completions, **kw):
            return [float(p[-1]["role"] == "user" and c[0]["role"] == "assistant" and c[0]["content"] == "1 2")
                    for p, c in zip(prompts, completions)]
        """,
    )
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    assert fns.score(prompts, completions, IDS, dict(COLUMNS))[:, 0].tolist() == [1.0, 0.0]


ASYNC = """
import asyncio
EVENTS = {}  # per event loop: one score() call
async def _both_started(me, other):
    events = EVENTS.setdefault(asyncio.get_running_loop(), {"a": asyncio.Event(), "b": asyncio.Event()})
    events[me].set()
    await events[other].wait()  # returns only while the other function runs at the same time
async def a(completions, **kw):
    await _both_started("a", "b")
    return [1.0] * len(completions)
async def b(completions, answer, **kw):
    await _both_started("b", "a")
    return [2.0 if c == x else None for c, x in zip(completions, answer)]
def sync(completions, **kw):
    return [3.0] * len(completions)
class Awaitable:
    def __call__(self, completions, **kw):
        return asyncio.sleep(0, result=[4.0] * len(completions))
awaitable = Awaitable()
async def slow(completions, **kw):
    await asyncio.sleep(30)
async def blocks(completions, **kw):
    import time
    time.sleep(30)
async def fails(completions, **kw):
    raise SystemExit(3)
"""


def _async_fns(tmp_path, *names: str, timeout: float = 10.0) -> RewardFunctions:
    path = tmp_path / "r.py"
    path.write_text(ASYNC)
    return RewardFunctions([f"{path}:{n}" for n in names], None, {"prompt", *COLUMNS}, "d", timeout=timeout)


def test_async_functions_are_awaited_concurrently(tmp_path):
    fns = _async_fns(tmp_path, "a", "sync", "b", "awaitable")
    raw = fns.score(PROMPTS, COMPLETIONS, IDS, dict(COLUMNS))
    assert raw[:, [0, 1, 3]].tolist() == [[1.0, 3.0, 4.0], [1.0, 3.0, 4.0]]
    assert raw[0, 2] == 2.0 and raw[1, 2].isnan()
    raw = fns.score(PROMPTS, COMPLETIONS, IDS, dict(COLUMNS))  # a fresh event loop each call
    assert raw[0, 0] == 1.0


def test_async_functions_inside_a_running_event_loop(tmp_path):
    fns = _async_fns(tmp_path, "a", "b")

    async def notebook_cell():
        return fns.score(PROMPTS, COMPLETIONS, IDS, dict(COLUMNS))

    assert asyncio.run(notebook_cell())[0].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("name", ["slow", "blocks"])
def test_async_timeout_names_the_function(tmp_path, name):
    fns = _async_fns(tmp_path, "a", name, "b", timeout=0.5)
    with pytest.raises(AlignRLError, match=rf"^reward function {name} did not return within 0.5 s \(reward_timeout\)"):
        fns.score(PROMPTS, COMPLETIONS, IDS, dict(COLUMNS))


def test_async_error_names_the_function(tmp_path):
    fns = _async_fns(tmp_path, "a", "fails", "b")
    with pytest.raises(AlignRLError, match=r"^reward function fails raised SystemExit: 3$"):
        fns.score(PROMPTS, COMPLETIONS, IDS, dict(COLUMNS))


@pytest.mark.parametrize(
    "source, message",
    [
        ("def f(completions, solution, **kwargs):\n    return []", "reward function f needs column 'solution'"),
        ("def f(prompts, completions, answer, **kw):\n    return []", "reward function f needs column 'answer'"),
        ("def f(*, completions, solution, **kw):\n    return []", "reward function f needs column 'solution'"),
        ("def f(completions, prompt, **kw):\n    return []", "parameter 'prompt'"),
        ("def f(prompts, completions, completion_ids):\n    return []", "does not accept keyword 'trainer_state'"),
        ("def f(completions, /, **kw):\n    return []", "takes 'completions' positionally"),
    ],
)
def test_startup_check_follows_the_call(tmp_path, source, message):
    with pytest.raises(AlignRLError, match=message) as e:
        _fns(tmp_path, source, columns=("prompt",))
    assert "\n" not in str(e.value)


def test_required_columns():
    def f(prompts, completions, answer, trainer_state, log_metric, *, solution, hint=None, **kwargs):
        return []

    def g(completions, solution, **kwargs):
        return []

    assert required_columns(f) == ["answer", "solution"]
    assert required_columns(g) == ["solution"]


def test_grpo_runs_a_trl_style_reward_function(tiny_model, tmp_path):
    write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"sort {a} 1", "answer": f"1 {a}"} for a in range(2, 6)])
    (tmp_path / "r.py").write_text(
        textwrap.dedent(
            """
            def sort_reward(prompts, completions, answer, **kwargs):
                kwargs["log_metric"]("step_seen", kwargs["trainer_state"].global_step)
                kwargs["log_extra"]("wanted", list(answer))
                return [float(c.strip() == a) for c, a in zip(completions, answer)]
            """
        )
    )
    out = tmp_path / "out"
    args = ["train", "grpo", f"model={tiny_model}", f"train_file={tmp_path / 'rl.jsonl'}", f"output_dir={out}",
            "max_steps=2", "prompts_per_step=2", "num_generations=2", "max_completion_length=3",
            "progress_bar=false", f"reward_funcs=[{tmp_path / 'r.py'}:sort_reward]"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # trainer_state counts the updates done before the step, as TRL's global_step does; log_metric reaches metrics
    assert [(r["step"], r["step_seen"]) for r in rows] == [(1, 0.0), (2, 1.0)]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["wanted"].startswith("1 ") for s in samples)  # log_extra columns


def test_trl_reward_functions(tmp_path):
    pytest.importorskip("trl")
    fns = RewardFunctions(["trl.rewards:think_format_reward"], None, {"prompt"}, "d")
    completions = [[{"role": "assistant", "content": c}] for c in ["<think>\nhm\n</think>\n1 2", "1"]]
    assert fns.score(PROMPTS, completions, IDS, {})[:, 0].tolist() == [1.0, 0.0]
    (tmp_path / "r.py").write_text(
        "from trl.rewards import get_soft_overlong_punishment\n"
        "overlong = get_soft_overlong_punishment(max_completion_len=3, soft_punish_cache=1)\n"
    )
    fns = RewardFunctions([f"{tmp_path / 'r.py'}:overlong"], None, {"prompt"}, "d")
    assert fns.score(PROMPTS, COMPLETIONS, IDS, {})[:, 0].tolist() == [-1.0, 0.0]


def test_trl_accuracy_reward_and_its_log_extra():
    pytest.importorskip("trl")
    pytest.importorskip("math_verify")
    fns = RewardFunctions(["trl.rewards:accuracy_reward"], None, {"prompt", "solution"}, "d")
    completions = [[{"role": "assistant", "content": f"So \\boxed{{{c}}}"}] for c in ["\\frac{1}{2}", "3"]]
    raw = fns.score(PROMPTS, completions, IDS, {"solution": ["0.5", "4"]})
    assert raw[:, 0].tolist() == [1.0, 0.0]
    assert fns.take_logged()[1]["solution"] == ["0.5", "4"]  # accuracy_reward logs its columns with log_extra
