"""`alignrl demo --env NAME`: a tiny model learns to act in a built-in environment.

From nothing: the environment's module makes task rows and example conversations of an imperfect scripted policy
(`make_rows`, `sft_rows`); SFT on those conversations (loss on the assistant turns), then GRPO through the
environment (multi-turn episodes, rewarded by the environment); held-out success (greedy episodes, `alignrl eval
--environment NAME`) before and after, and one held-out episode before and after.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from alignrl.data import write_jsonl
from alignrl.envs import BUILTIN_ENVS
from alignrl.errors import AlignRLError


@dataclass
class EnvDemo:
    """The sizes and settings of one environment's demo."""

    sft_rows: int = 4000
    sft_steps: int = 600
    sft_batch_size: int = 64
    sft_learning_rate: float = 1e-3
    max_length: int = 192  # model positions and SFT sequence length (characters)
    max_prompt_length: int = 48  # the first messages (characters)
    max_completion_length: int = 8  # per assistant turn
    grpo_steps: int = 60
    prompts_per_step: int = 16
    num_generations: int = 8
    learning_rate: float = 2e-4


# the environments with a demo (the others are tasks to train on: their scripted data is there, their demo sizes are
# not tuned: each `code` episode runs the sandbox, ~50 ms an attempt, which alone makes a step ~20 s here)
SETTINGS = {"guess": EnvDemo()}


def env_module(name: str) -> ModuleType:
    """The module of a built-in environment with a demo (its data makers live next to it)."""
    if name not in SETTINGS:
        raise AlignRLError(f"--env: {name!r} has no demo (choose from {', '.join(SETTINGS)})")
    return importlib.import_module(BUILTIN_ENVS[name].partition(":")[0])


def _episode_text(sample: dict[str, Any]) -> str:
    """One logged episode as lines of `role: content`."""
    turns = list(sample["prompt"]) + list(sample["completion"])
    return "\n".join(f"    {m['role']}: {m['content']}" for m in turns if m["role"] != "system")


def _first_eval_episode(run_dir: Path, step: int) -> str:
    """The first held-out episode logged at `step` of a run (samples.jsonl)."""
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        if sample.get("eval") and sample["step"] == step:
            return _episode_text(sample)
    return "    (none logged)"


def run_env_demo(name: str, out: str, seed: int = 0, quick: bool = False) -> list[tuple[str, str]]:
    """SFT then GRPO through environment `name`; prints and returns the before/after table."""
    from alignrl.config import load_config
    from alignrl.demo import print_table
    from alignrl.models import init_model
    from alignrl.trainers import grpo, sft

    module, settings = env_module(name), SETTINGS[name]
    t0 = time.perf_counter()
    root = Path(out) / f"env-{name}"
    data = {k: str(root / "data" / f"{k}.jsonl") for k in ("sft", "rl", "test")}

    def log(msg: str) -> None:
        print(f"[demo {time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    write_jsonl(data["sft"], module.sft_rows(20 * 64 if quick else settings.sft_rows, seed + 2))
    write_jsonl(data["rl"], module.make_rows(2000, seed))
    write_jsonl(data["test"], module.make_rows(200, seed + 1))
    log(f"creating a tiny model in {root / 'model'}")
    init_model(root / "model", hidden_size=128, num_layers=4, num_heads=4, max_length=settings.max_length,
               intermediate_size=256, seed=seed, overwrite=True)  # fmt: skip
    log(f"SFT on the scripted policy's {name} conversations")
    sft_cfg = load_config(sft.SFTConfig, None, [
        f"model={root / 'model'}", f"train_file={data['sft']}", f"output_dir={root / 'sft'}", f"seed={seed}",
        f"batch_size={settings.sft_batch_size}", f"max_length={settings.max_length}",
        f"learning_rate={settings.sft_learning_rate}", "warmup_steps=50",
        "lr_scheduler=cosine", f"max_steps={2 if quick else settings.sft_steps}", "weight_decay=0.01",
        "logging_steps=20", "overwrite_output_dir=true",
    ])  # fmt: skip
    sft_dir = str(sft.train(sft_cfg))
    log(f"GRPO through the {name} environment (held-out success evaluated before and after)")
    steps = 2 if quick else settings.grpo_steps
    cfg = load_config(grpo.GRPOConfig, None, [
        f"model={sft_dir}", f"train_file={data['rl']}", f"eval_file={data['test']}", f"output_dir={root / 'grpo'}",
        "overwrite_output_dir=true", f"seed={seed}", f"environment={name}",
        f"prompts_per_step={settings.prompts_per_step}", f"num_generations={settings.num_generations}",
        f"max_completion_length={settings.max_completion_length}", f"max_prompt_length={settings.max_prompt_length}",
        f"max_episode_tokens={settings.max_length - settings.max_prompt_length}",
        f"learning_rate={settings.learning_rate}",
        "temperature=1.0", "beta=0.0", f"max_steps={steps}", "logging_steps=1", f"eval_steps={steps}",
        "log_completions=2",
    ])  # fmt: skip
    grpo.train(cfg)
    records = [json.loads(line) for line in (root / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/env/success" in r]
    before, after = evals[0], evals[-1]
    rows = [
        (f"held-out success ({len(module.make_rows(200, seed + 1))} episodes, greedy)", ""),
        ("SFT", f"{before['eval/env/success']:.1%}"),
        ("SFT + GRPO", f"{after['eval/env/success']:.1%}"),
        ("change", f"{100 * (after['eval/env/success'] - before['eval/env/success']):+.1f} points"),
        ("turns per episode (SFT → GRPO)", f"{before['eval/episode/turns']:.2f} → {after['eval/episode/turns']:.2f}"),
    ]
    wall = time.perf_counter() - t0
    print_table(rows, wall)
    print(f"\n  a held-out episode, SFT:\n{_first_eval_episode(root / 'grpo', 0)}")
    print(f"\n  the same episode, SFT + GRPO:\n{_first_eval_episode(root / 'grpo', steps)}")
    print(f"\nreport: {write_report_env(root)}")
    return rows + [("wall time", f"{wall:.0f}s")]


def write_report_env(root: Path) -> Path:
    """`alignrl report` of the demo's SFT and GRPO runs."""
    from alignrl.report import make_report

    runs = [root / d for d in ("grpo", "sft") if (root / d / "metrics.jsonl").is_file()]
    return make_report(runs, root / "report.html", title=f"alignrl demo --env {root.name.removeprefix('env-')}")
