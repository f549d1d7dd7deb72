"""Real-model demo (`alignrl demo --model smollm2`): GRPO with LoRA on SmolLM2-135M-Instruct, a pretrained chat model
with a BPE tokenizer and the ChatML template, on small additions asked in plain English.

The instruct model knows the sums but rarely says them plainly: asked "What is 17 + 6? Give only the final
number.", it mostly starts to explain ("To solve this problem, we need to find...") and runs out of tokens before
the answer. GRPO with the answer-match reward (the last number of the completion against the reference) and a
completion budget of a few tokens rewards the samples that answer at once; held-out accuracy under `alignrl eval`
(greedy) rises. Nothing but the reward teaches it: no SFT, no preference labels.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from alignrl.config import load_config
from alignrl.data import write_jsonl
from alignrl.evaluation import evaluate_model
from alignrl.pretrained import smollm2
from alignrl.trainers import grpo

QUESTION = "What is {a} + {b}? Give only the final number."
EVAL_TOKENS = 32  # greedy completion budget of the before/after evaluation
STEPS = 30


def make_task(seed: int, n_test: int = 200) -> tuple[list[dict], list[dict]]:
    """(train, test) chat prompts for a + b with 0 ≤ a < 50, 0 ≤ b < 10, split without overlap."""
    pairs = [(a, b) for a in range(50) for b in range(10)]
    random.Random(seed).shuffle(pairs)

    def row(a: int, b: int) -> dict:
        return {"prompt": [{"role": "user", "content": QUESTION.format(a=a, b=b)}], "answer": str(a + b)}

    return [row(a, b) for a, b in pairs[n_test:]], [row(a, b) for a, b in pairs[:n_test]]


def run(out: str, seed: int = 0, quick: bool = False, rollout_engine: str = "native") -> list[tuple[str, str]]:
    """Evaluate SmolLM2, train it with GRPO + LoRA, evaluate the result; returns the table rows."""
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[demo {time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    root = Path(out) / "smollm2"
    model = str(smollm2())  # converted from the package's GGUF file on first use
    train, test = make_task(seed)
    if quick:
        test = test[:16]
    write_jsonl(root / "data" / "train.jsonl", train)
    write_jsonl(root / "data" / "test.jsonl", test)
    test_file = str(root / "data" / "test.jsonl")
    log(f"SmolLM2-135M-Instruct ({model}): held-out accuracy before training")
    before = evaluate_model(model, test_file, ["gsm8k"], max_new_tokens=EVAL_TOKENS, batch_size=100)
    log(f"before: {before.accuracy:.1%}; GRPO with LoRA and the answer-match reward")
    cfg = load_config(grpo.GRPOConfig, None, [
        f"model={model}", f"train_file={root / 'data' / 'train.jsonl'}", f"output_dir={root / 'grpo'}",
        "overwrite_output_dir=true", f"seed={seed}", "reward_funcs=[gsm8k]", "lora_r=16", "lora_alpha=32",
        "lora_target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "learning_rate=2e-4",
        "prompts_per_step=8", "num_generations=8", "max_completion_length=16", "temperature=1.0", "beta=0.0",
        "autocast=bfloat16", f"max_steps={2 if quick else STEPS}", "logging_steps=1",
        f"rollout_engine={rollout_engine}",
    ])  # fmt: skip
    final = str(grpo.train(cfg))
    log("held-out accuracy after training")
    after = evaluate_model(final, test_file, ["gsm8k"], max_new_tokens=EVAL_TOKENS, batch_size=100)
    return [
        (f"held-out accuracy ({len(test)} additions, greedy, `alignrl eval`)", ""),
        ("SmolLM2-135M-Instruct", f"{before.accuracy:.1%}"),
        ("+ GRPO with LoRA", f"{after.accuracy:.1%}"),
        ("change", f"{100 * (after.accuracy - before.accuracy):+.1f} points"),
    ]
