"""The demo task: two-digit addition with a short worked solution, "47+38=" -> "7+8=15;4+3+1=8;85" (units, then tens
with the carry, then the answer). The SFT data come from a careless teacher who, on problems that need a
carry, usually forgets it ("7+8=15;4+3=7;75"). SFT imitates the teacher, so greedy decoding gets most
carry problems wrong, but the correct step keeps real probability. RL with a verifiable answer-match
reward on the final number (GRPO) finds and reinforces it: held-out accuracy rises well above SFT's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


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
