"""Kill-and-resume: a run SIGKILLed after a checkpoint (or while writing one) and resumed with resume=auto logs the
same metrics.jsonl values, step for step, as the uninterrupted run; SIGTERM saves a checkpoint and exits 143.

The killed run is a subprocess (`python KILLER train ALGO key=value ...`: the CLI with a hook that SIGKILLs the
process at a chosen point, so the kill lands at a known place without racing a fast run); the uninterrupted
reference and the resumed run are in-process (deterministic CPU settings: num_threads=1). To cover another
trainer, add a case to CASES.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignrl import checkpoint
from alignrl.cli import run_training
from alignrl.data import write_jsonl
from alignrl.envs import guess

KILLER = """
import os, signal, sys
import torch
from alignrl.trainers import loop

mode, at = os.environ["KILL_MODE"], int(os.environ["KILL_STEP"])
if mode == "save":  # SIGKILL while checkpoint-AT is being written: model files are there, state and marker not
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == at and "components" in obj:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
else:  # SIGKILL right after step AT was logged (later than the last checkpoint)
    real_log = loop.MetricsLogger.log
    def log(self, step, metrics):
        real_log(self, step, metrics)
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
    loop.MetricsLogger.log = log

from alignrl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _data(tmp_path: Path) -> dict[str, Path]:
    sft_rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]
    rl_rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    pref_rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(6) for b in range(6)
    ]
    write_jsonl(tmp_path / "rl.jsonl", rl_rows)
    write_jsonl(tmp_path / "pref.jsonl", pref_rows)
    write_jsonl(tmp_path / "guess.jsonl", guess.make_rows(30, 0))
    return {k: tmp_path / f"{k}.jsonl" for k in ("sft", "rl", "pref", "guess")}


# algo[-variant] -> (data key, overrides, kill mode, kill step); every case uses save_steps=2 and max_steps=5
CASES = {
    "grpo-multi_turn": (
        "guess",
        [
            "prompts_per_step=2",
            "num_generations=3",
            "max_completion_length=4",
            "max_turns=3",
            "max_episode_tokens=80",
            "environment=guess",
            "learning_rate=1e-3",
            "beta=0.04",
            "eval_file={guess}",
            "eval_steps=2",
        ],  # fmt: skip
        "log",
        3,
    ),
    "sft": (
        "sft",
        ["batch_size=8", "learning_rate=3e-3", "eval_fraction=0.1", "eval_steps=2", "lr_scheduler=cosine"],
        "save",  # killed while writing checkpoint-4: resume must use checkpoint-2
        4,
    ),
    "grpo": (
        "rl",
        [
            "prompts_per_step=3",
            "num_generations=3",
            "max_completion_length=5",
            "learning_rate=1e-3",
            "reward_funcs=[gsm8k]",
            "beta=0.04",
            "num_iterations=2",
            "micro_batch_size=4",
        ],
        "log",  # killed after logging step 3: resume uses checkpoint-2 and drops step 3's rows
        3,
    ),
    "dpo": ("pref", ["batch_size=4", "learning_rate=1e-3", "eval_fraction=0.2", "eval_steps=2"], "log", 3),
    "ppo": (
        "rl",
        [
            "prompts_per_step=4",
            "num_generations=2",
            "max_completion_length=5",
            "learning_rate=1e-3",
            "reward_funcs=[gsm8k]",
            "kl_coef=0.1",
        ],
        "log",
        3,
    ),
    "rm": ("pref", ["batch_size=4", "learning_rate=1e-3", "eval_fraction=0.2"], "save", 4),
}


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k == "step_time" or k.startswith("time/"))} for r in rows]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parent.parent / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_then_resume_matches_uninterrupted(case, request, tmp_path, restore_threads):
    data_key, extra, mode, at = CASES[case]
    tiny_model = request.getfixturevalue("turn_taker" if case.endswith("multi_turn") else "tiny_model")
    algo = case.partition("-")[0]
    data = _data(tmp_path)
    extra = [x.format(**data) for x in extra]
    common = [
        f"model={tiny_model}",
        f"train_file={data[data_key]}",
        "max_steps=5",
        "num_threads=1",
        "progress_bar=false",
        "save_steps=2",
        *extra,
    ]
    run_dir = tmp_path / "run"
    (tmp_path / "killer.py").write_text(KILLER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "killer.py"), "train", algo, *common, f"output_dir={run_dir}"],
        env={**_env(), "KILL_MODE": mode, "KILL_STEP": str(at)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint.latest_checkpoint(run_dir) == run_dir / "checkpoint-2"
    if mode == "save":  # the half-written checkpoint-4 is on disk (model files, no marker) and is ignored
        (partial,) = run_dir.glob(".checkpoint-4.tmp-*")
        assert (partial / "model.safetensors").is_file() and not (partial / checkpoint.MARKER).exists()
    else:
        assert _rows(run_dir / "metrics.jsonl")[-1]["step"] == at
    run_training(algo, None, [*common, f"output_dir={run_dir}", "resume=auto"])
    run_training(algo, None, [*common, f"output_dir={tmp_path / 'ref'}", "save_steps=0"])
    resumed, ref = _rows(run_dir / "metrics.jsonl"), _rows(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in ref][-5:] == [1, 2, 3, 4, 5]
    assert resumed == ref
    if case.endswith("multi_turn"):
        assert max(r.get("episode/turns", 0) for r in ref) > 1.5  # episodes of several turns
    if (tmp_path / "ref" / "samples.jsonl").stat().st_size:
        assert (run_dir / "samples.jsonl").read_text() == (tmp_path / "ref" / "samples.jsonl").read_text()
    assert not list(run_dir.glob(".checkpoint-*"))  # leftovers of the killed save are cleaned up


def test_sigterm_saves_checkpoint_and_exits_143(tiny_model, tmp_path):
    data = _data(tmp_path)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignrl.cli", "train", "sft", f"model={tiny_model}", f"train_file={data['sft']}"]
    cmd += [f"output_dir={run_dir}", "max_steps=100000", "save_steps=0", "batch_size=4", "progress_bar=false"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = _rows(metrics)[-1]["step"]
    assert checkpoint.latest_checkpoint(run_dir) == run_dir / f"checkpoint-{last}"
    assert "stopped by SIGTERM" in err and "resume=auto" in err
    assert not (run_dir / "final").exists()
