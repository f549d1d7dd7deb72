"""The embedded demo: from nothing to SFT to RL on a synthetic arithmetic task, with a before/after table.

Task: two-digit addition with a short worked solution, "47+38=" -> "7+8=15;4+3+1=8;85" (units, then tens
with the carry, then the answer). The SFT data come from a careless teacher who, on problems that need a
carry, usually forgets it ("7+8=15;4+3=7;75"). SFT imitates the teacher, so greedy decoding gets most
carry problems wrong, but the correct step keeps real probability. RL with a verifiable answer-match
reward on the final number (GRPO) finds and reinforces it: held-out accuracy rises well above SFT's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from alignrl.data import load_rows, write_jsonl
from alignrl.errors import AlignRLError


@dataclass
class DemoTask:
    sft: list[dict]
    rl: list[dict]
    test: list[dict]


FORGET_CARRY = 0.65  # how often the teacher drops the carry on problems that need one


def worked_solution(a: int, b: int, rng: random.Random | None = None) -> str:
    """The teacher's solution; with `rng`, a carry is forgotten with probability FORGET_CARRY."""
    a0, a1, b0, b1 = a % 10, a // 10, b % 10, b // 10
    units = a0 + b0
    if units < 10:
        return f"{a0}+{b0}={units};{a1}+{b1}={a1 + b1};{a + b}"
    if rng is not None and rng.random() < FORGET_CARRY:
        return f"{a0}+{b0}={units};{a1}+{b1}={a1 + b1};{a + b - 10}"
    return f"{a0}+{b0}={units};{a1}+{b1}+1={a1 + b1 + 1};{a + b}"


def make_task(seed: int = 0, n_test: int = 500) -> DemoTask:
    """All a+b with 0 ≤ a, b < 100: a held-out test set; noisy worked solutions for the rest."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    test, train = pairs[:n_test], pairs[n_test:]

    def row(a: int, b: int) -> dict:
        return {"prompt": f"{a}+{b}=", "answer": str(a + b)}

    sft = [{"prompt": f"{a}+{b}=", "completion": worked_solution(a, b, rng)} for a, b in train]
    return DemoTask(sft=sft, rl=[row(a, b) for a, b in train], test=[row(a, b) for a, b in test])


def _accuracy(model_dir: str, rows: list[dict]) -> float:
    from alignrl.models import load_causal_lm, load_tokenizer
    from alignrl.rewards import RewardFunctions
    from alignrl.rollout import evaluate

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    fns = RewardFunctions(["gsm8k"], None, set(rows[0]), "demo test set")
    return evaluate(model, tok, rows, fns, max_new_tokens=24, batch_size=250)


def run_demo(algo: str, out: str, seed: int = 0, quick: bool = False) -> dict[str, float]:
    """Run the demo pipeline and print a before/after table; returns the measured figures."""
    import torch

    from alignrl.config import load_config
    from alignrl.models import init_model
    from alignrl.trainers import grpo, sft

    if algo not in ("grpo",):
        raise AlignRLError(f"--algo: {algo!r} is not available in the demo (choose from grpo)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    root = Path(out)
    task = make_task(seed)
    write_jsonl(root / "data/sft.jsonl", task.sft)
    write_jsonl(root / "data/rl.jsonl", task.rl)
    write_jsonl(root / "data/test.jsonl", task.test)
    load_rows(str(root / "data/test.jsonl"))  # same loader as users' data

    print(f"[demo] creating a tiny model in {root / 'model'}", flush=True)
    init_model(root / "model", hidden_size=128, num_layers=4, num_heads=4, max_length=64, seed=seed)

    print("[demo] SFT on noisy teacher data", flush=True)
    sft_cfg = load_config(
        sft.SFTConfig,
        None,
        [
            f"model={root / 'model'}",
            f"train_file={root / 'data/sft.jsonl'}",
            f"output_dir={root / 'sft'}",
            f"seed={seed}",
            "batch_size=64",
            "max_length=32",
            "learning_rate=1e-3",
            "warmup_steps=50",
            "lr_scheduler=cosine",
            f"max_steps={20 if quick else 1200}",
            "weight_decay=0.01",
            "progress_bar=true",
            "logging_steps=50",
        ],
    )
    sft_dir = str(sft.train(sft_cfg))
    acc_sft = _accuracy(sft_dir, task.test)
    print(f"[demo] SFT held-out accuracy {acc_sft:.1%} ({time.perf_counter() - t0:.0f}s)", flush=True)

    print(f"[demo] {algo.upper()} with the answer-match reward", flush=True)
    rl_cfg = load_config(
        grpo.GRPOConfig,
        None,
        [
            f"model={sft_dir}",
            f"train_file={root / 'data/rl.jsonl'}",
            f"output_dir={root / algo}",
            f"seed={seed}",
            "reward_funcs=[gsm8k]",
            "prompts_per_step=32",
            "num_generations=8",
            "max_completion_length=24",
            "learning_rate=2e-4",
            "temperature=1.0",
            "beta=0.0",
            f"max_steps={3 if quick else 60}",
            "logging_steps=10",
        ],
    )
    rl_dir = str(grpo.train(rl_cfg))
    acc_rl = _accuracy(rl_dir, task.test)
    wall = time.perf_counter() - t0
    print()
    print(f"  held-out exact-match accuracy ({len(task.test)} problems, greedy)")
    print(f"  {'model':<12}{'accuracy':>10}")
    print(f"  {'SFT':<12}{acc_sft:>10.1%}")
    print(f"  {algo.upper():<12}{acc_rl:>10.1%}")
    print(f"  change      {100 * (acc_rl - acc_sft):+9.1f} points   (total {wall:.0f}s)")
    return {"sft_accuracy": acc_sft, "rl_accuracy": acc_rl, "wall_seconds": wall}
