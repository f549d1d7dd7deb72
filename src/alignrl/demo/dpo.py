"""Demo stage: DPO on preference pairs sampled from the SFT model (a correct answer preferred over a wrong one)."""

from __future__ import annotations

from alignrl.config import load_config
from alignrl.demo import DemoContext
from alignrl.demo.pairs import build_pairs, last_metrics
from alignrl.trainers import dpo


def run(ctx: DemoContext) -> list[tuple[str, str]]:
    sft_dir = ctx.sft_model()
    acc_sft = ctx.accuracy(sft_dir)
    ctx.log(f"SFT held-out accuracy {acc_sft:.1%}")
    pairs = build_pairs(ctx, sft_dir)
    ctx.log(f"DPO on {pairs.n_train} pairs")
    cfg = load_config(dpo.DPOConfig, None, [
        f"model={sft_dir}", f"train_file={pairs.train}", f"eval_file={pairs.eval}", f"output_dir={ctx.root / 'dpo'}",
        "overwrite_output_dir=true",
        f"seed={ctx.seed}", "loss_type=sigmoid", "beta=0.5", "batch_size=32", "eval_batch_size=128",
        "max_length=64", "learning_rate=1e-4", "warmup_steps=10", "lr_scheduler=cosine",
        f"max_steps={ctx.steps(80, 2)}", f"logging_steps={ctx.steps(5, 1)}", "on_bad_row=skip",
    ])  # fmt: skip
    final = str(dpo.train(cfg))
    m = last_metrics(ctx.root / "dpo")
    acc_dpo = ctx.accuracy(final)
    n = len(ctx.task.test)
    before, after = m["first"].get("eval_rewards/accuracies", 0.0), m["last"].get("eval_rewards/accuracies", 0.0)
    return [
        (f"held-out exact-match accuracy ({n} problems, greedy)", ""),
        ("SFT", f"{acc_sft:.1%}"),
        ("SFT + DPO", f"{acc_dpo:.1%}"),
        ("change", f"{100 * (acc_dpo - acc_sft):+.1f} points"),
        (f"held-out preference accuracy ({pairs.n_eval} pairs)", f"{before:.1%} -> {after:.1%}"),
        ("preference pairs (train)", str(pairs.n_train)),
    ]
