"""Demo stage: RLHF with PPO. A Bradley–Terry reward model learns from preference pairs sampled from the SFT model
(correct final answer preferred); PPO then maximises that reward model's score with a KL penalty to the SFT model,
with the critic initialised from the reward model. The answer-match check is never seen by PPO: it is only used to
measure held-out accuracy before and after.
"""

from __future__ import annotations

import json

from alignrl.config import load_config
from alignrl.demo import DemoContext
from alignrl.demo.pairs import build_pairs, train_reward_model
from alignrl.trainers import ppo

PPO_STEPS = 20


def rm_score(ctx: DemoContext, model_dir: str, rm_dir: str) -> float:
    """Mean reward-model score of the model's greedy completions on the held-out prompts (`alignrl eval`)."""
    from alignrl.evaluation import evaluate_model

    return evaluate_model(model_dir, ctx.data("test"), [rm_dir], max_new_tokens=24, batch_size=250).mean_reward


def run(ctx: DemoContext) -> list[tuple[str, str]]:
    sft_dir = ctx.sft_model()
    rm_dir = train_reward_model(ctx, sft_dir, build_pairs(ctx, sft_dir))
    acc_sft, score_sft = ctx.accuracy(sft_dir), rm_score(ctx, sft_dir, rm_dir)
    ctx.log(f"SFT held-out accuracy {acc_sft:.1%}, reward-model score {score_sft:+.2f}; PPO on the reward model")
    out = ctx.root / "ppo"
    cfg = load_config(ppo.PPOConfig, None, [
        f"model={sft_dir}", f"train_file={ctx.data('rl')}", f"output_dir={out}",
        "overwrite_output_dir=true", f"seed={ctx.seed}",
        f"reward_funcs=[{rm_dir}]", "missing_eos_penalty=1.0", "prompts_per_step=128", "num_generations=1",
        "max_completion_length=24", "temperature=1.0", "learning_rate=1e-4", "kl_coef=1.0",
        "num_ppo_epochs=2", "num_mini_batches=2", f"max_steps={ctx.steps(PPO_STEPS, 2)}", "logging_steps=1",
    ])  # fmt: skip
    final = str(ppo.train(cfg))
    acc_rl, score_rl = ctx.accuracy(final), rm_score(ctx, final, rm_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = sum(r["objective/kl"] for r in rows[-3:]) / len(rows[-3:])
    n = len(ctx.task.test)
    return [
        (f"held-out ({n} problems, greedy)", "accuracy   RM score"),
        ("SFT", f"{acc_sft:7.1%}   {score_sft:+7.2f}"),
        ("SFT + PPO", f"{acc_rl:7.1%}   {score_rl:+7.2f}"),
        ("change", f"{100 * (acc_rl - acc_sft):+.1f} points, RM score {score_rl - score_sft:+.2f}"),
        ("KL(PPO ‖ SFT) per completion, last steps", f"{kl:.2f} nats"),
    ]
