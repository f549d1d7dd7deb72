"""GRPO on a code task end to end: the built-in `code` reward runs every sampled completion in the sandbox."""

from __future__ import annotations

import json
import os
import signal

import pytest

from alignrl.config import load_config
from alignrl.data import write_jsonl
from alignrl.rewards import RewardFunctions
from alignrl.rewards import code as code_mod
from alignrl.trainers import grpo, sft

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the code sandbox needs a POSIX system")

# small function-writing specs; the tiny char-level model first memorises their solutions with a short SFT
TASKS = [
    ("f(x)=x+1:", "def f(x):return x+1", ["assert f(1) == 2", "assert f(-1) == 0"]),
    ("f(x)=2*x:", "def f(x):return 2*x", ["assert f(3) == 6", "assert f(0) == 0"]),
    ("f(x)=-x:", "def f(x):return -x", ["assert f(2) == -2", "assert f(0) == 0"]),
]


def test_hostile_completions_get_zero_and_leave_the_caller_alone(tmp_path):
    marker = tmp_path / "pwned"
    hostile = [
        f"import os\nos.system('touch {marker}')\ndef f(x):return x+1",
        f"open({str(marker)!r}, 'w').write('x')\ndef f(x):return x+1",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef f(x):return x+1",
        "def f(x):return x+1",  # the honest one still scores
    ]
    fns = RewardFunctions(["code"], None, {"tests"}, "data")
    raw = fns.score(["p"] * 4, hostile, [[1]] * 4, {"tests": [TASKS[0][2]] * 4})
    assert raw[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert not marker.exists()
    os.kill(os.getpid(), 0)  # still here
    assert signal.getsignal(signal.SIGINT) is not None


def test_grpo_on_code_task_uses_sandboxed_reward(tiny_model, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": c} for p, c, _ in TASKS])
    # plus an unseen spec that the memorised programs pass only in part (fractional rewards)
    square = {"prompt": "f(x)=x*x:", "tests": ["assert f(0) == 0", "assert f(1) == 1", "assert f(2) == 4"]}
    write_jsonl(tmp_path / "code.jsonl", [{"prompt": p, "tests": t} for p, _, t in TASKS] + [square])
    base = [f"model={tiny_model}", "progress_bar=false", "save_steps=0"]
    sft_model = sft.train(
        load_config(
            sft.SFTConfig,
            None,
            [*base, f"train_file={tmp_path / 'sft.jsonl'}", f"output_dir={tmp_path / 'sft'}", "max_steps=40"]
            + ["batch_size=3", "learning_rate=1e-2"],
        )
    )
    calls = []
    real = code_mod._run_sandboxed

    def counting(code, tests, **kw):
        calls.append(code)
        return real(code, tests, **kw)

    monkeypatch.setattr(code_mod, "_run_sandboxed", counting)
    cfg = load_config(
        grpo.GRPOConfig,
        None,
        [
            f"model={sft_model}",
            f"train_file={tmp_path / 'code.jsonl'}",
            f"output_dir={tmp_path / 'grpo'}",
            "progress_bar=false",
            "reward_funcs=[code]",
            "prompts_per_step=2",
            "num_generations=4",
            "max_completion_length=24",
            "learning_rate=1e-4",
            "max_steps=2",
        ],
    )
    grpo.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["rewards/code/mean"] <= 1.0 and 0.0 <= r["reward"] <= 1.0
        assert r["rewards/none_applicable"] == 0.0
    assert calls  # completions really went through the sandbox
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert all(0.0 <= s["reward"] <= 1.0 for s in samples)
    # after the short SFT, most samples are (near-)correct programs: the sandbox gave real passes
    assert max(r["rewards/code/mean"] for r in rows) > 0.2, rows
