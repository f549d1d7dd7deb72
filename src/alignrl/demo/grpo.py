"""Demo stage: GRPO with the answer-match reward on top of the SFT model."""

from __future__ import annotations

from alignrl.config import load_config
from alignrl.demo import DemoContext
from alignrl.trainers import grpo


def run(ctx: DemoContext) -> list[tuple[str, str]]:
    sft_dir = ctx.sft_model()
    acc_sft = ctx.accuracy(sft_dir)
    ctx.log(f"SFT held-out accuracy {acc_sft:.1%}; GRPO with the answer-match reward")
    cfg = load_config(grpo.GRPOConfig, None, [
        f"model={sft_dir}", f"train_file={ctx.data('rl')}", f"output_dir={ctx.root / 'grpo'}",
        "overwrite_output_dir=true", f"seed={ctx.seed}",
        "reward_funcs=[gsm8k]", "prompts_per_step=32", "num_generations=8", "max_completion_length=24",
        "learning_rate=2e-4", "temperature=1.0", "beta=0.0", f"max_steps={ctx.steps(60, 3)}", "logging_steps=1",
        f"rollout_engine={ctx.rollout_engine}",
    ])  # fmt: skip
    acc_rl = ctx.accuracy(str(grpo.train(cfg)))
    n = len(ctx.task.test)
    return [
        (f"held-out exact-match accuracy ({n} problems, greedy)", ""),
        ("SFT", f"{acc_sft:.1%}"),
        ("SFT + GRPO", f"{acc_rl:.1%}"),
        ("change", f"{100 * (acc_rl - acc_sft):+.1f} points"),
    ]
