"""Demo stage: a Bradley–Terry reward model on preference pairs sampled from the SFT model."""

from __future__ import annotations

from alignrl.demo import DemoContext
from alignrl.demo.pairs import build_pairs, last_metrics, train_reward_model


def run(ctx: DemoContext) -> list[tuple[str, str]]:
    sft_dir = ctx.sft_model()
    pairs = build_pairs(ctx, sft_dir)
    train_reward_model(ctx, sft_dir, pairs)
    m = last_metrics(ctx.root / "rm")
    before, after = m["first"].get("eval_accuracy", 0.0), m["last"].get("eval_accuracy", 0.0)
    return [
        (f"held-out pair accuracy ({pairs.n_eval} pairs)", ""),
        ("untrained score head", f"{before:.1%}"),
        ("reward model", f"{after:.1%}"),
        ("preference pairs (train)", str(pairs.n_train)),
    ]
