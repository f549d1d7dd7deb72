"""One benchmark workload in its own process (so peak RSS is clean): `python -m bench.worker SPEC.json OUT.json`.

SPEC keys: lib (alignrl|trl), algo (grpo|dpo), model, data, out_dir, precision (fp32|bf16), steps, warmup, and
per algo: prompts, G, length, beta (grpo); batch, beta (dpo). Writes per-step wall times (warm-up steps
dropped), generation/rollout/update times, the RSS before training and the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _alignrl_common(spec: dict) -> dict:
    """alignrl config fields shared by every workload (the twin of `_trl_common`)."""
    return dict(
        model=spec["model"],
        output_dir=spec["out_dir"],
        train_file=spec["data"],
        device="cpu",
        seed=0,
        learning_rate=1e-6,
        lr_scheduler="constant",
        max_steps=spec["warmup"] + spec["steps"],
        autocast="bfloat16" if spec["precision"] == "bf16" else "none",
        progress_bar=False,
    )


def _timed_rows(spec: dict) -> list[dict]:
    """The timed steps (after warm-up) of an alignrl run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] > spec["warmup"] and "step_time" in r]


def run_alignrl_grpo(spec: dict) -> dict:
    from alignrl.trainers import grpo

    cfg = grpo.GRPOConfig(
        **_alignrl_common(spec),
        prompts_per_step=spec["prompts"],
        num_generations=spec["G"],
        max_prompt_length=512,
        max_completion_length=spec["length"],
        temperature=1.0,
        reward_funcs=["bench.setup:digit_reward"],
        beta=spec["beta"],
        loss_aggregation="token_mean",
        scale_rewards="group",
        log_completions=0,
        micro_batch_size=spec.get("micro_batch", 0),
    )
    base = rss_now()
    grpo.train(cfg)
    rows = _timed_rows(spec)
    lengths = [r["completion_length/mean"] for r in rows]
    assert all(v == spec["length"] for v in lengths), f"completions not full length: {lengths}"
    return {
        "step": [r["step_time"] for r in rows],
        "generation": [r["time/generation"] for r in rows],
        "rollout": [r["time/generation"] + r.get("time/reference", 0.0) for r in rows],
        "update": [r["time/update"] for r in rows],
        "completion_length": lengths,
        "rss_before": base,
    }


class _Clock:
    """Wall time of each optimizer step and of wrapped trainer methods within it (TRL side)."""

    def __init__(self):
        self.steps, self.parts, self._t0, self._cur = [], [], 0.0, {}

    def wrap(self, obj, name: str, key: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._cur[key] = self._cur.get(key, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._cur = {}
                clock._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.steps.append(time.perf_counter() - clock._t0)
                clock.parts.append(dict(clock._cur))

        return CB()


def _trl_common(spec: dict) -> dict:
    return dict(
        output_dir=spec["out_dir"],
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=spec["precision"] == "bf16",
        fp16=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        gradient_accumulation_steps=1,
    )


def run_trl_grpo(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bench.setup import digit_reward

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    n = spec["prompts"] * spec["G"]
    args = GRPOConfig(
        **_trl_common(spec),
        per_device_train_batch_size=n,
        num_generations=spec["G"],
        max_completion_length=spec["length"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        num_iterations=1,
        disable_dropout=True,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=digit_reward, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    clock = _Clock()
    clock.wrap(trainer, "_generate", "generation")
    clock.wrap(trainer, "_generate_and_score_completions", "rollout")
    lengths: list[float] = []
    orig = trainer._generate_and_score_completions

    def capture(*a, **k):
        out = orig(*a, **k)
        lengths.append(float(out["completion_mask"].sum(-1).float().mean()))
        return out

    trainer._generate_and_score_completions = capture
    trainer.add_callback(clock.callback())
    base = rss_now()
    trainer.train()
    w = spec["warmup"]
    assert all(v == spec["length"] for v in lengths), f"completions not full length: {lengths}"
    parts = clock.parts[w:]
    steps = clock.steps[w:]
    return {
        "step": steps,
        "generation": [p.get("generation", 0.0) for p in parts],
        "rollout": [p.get("rollout", 0.0) for p in parts],
        "update": [s - p.get("rollout", 0.0) for s, p in zip(steps, parts)],
        "completion_length": lengths[w:],
        "rss_before": base,
    }


def run_alignrl_dpo(spec: dict) -> dict:
    from alignrl.trainers import dpo

    cfg = dpo.DPOConfig(
        **_alignrl_common(spec),
        batch_size=spec["batch"] // spec.get("accum", 1),  # same pairs per optimizer step as TRL's batch
        gradient_accumulation_steps=spec.get("accum", 1),
        eval_batch_size=spec.get("ref_batch", 32),  # pairs per forward of the one-off reference pass
        beta=spec["beta"],
        max_length=spec["max_length"],
    )
    base = rss_now()
    t0 = time.perf_counter()
    dpo.train(cfg)
    total = time.perf_counter() - t0
    rows = _timed_rows(spec)
    return {"step": [r["step_time"] for r in rows], "rss_before": base, "total": total}


def run_trl_dpo(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = DPOConfig(
        **_trl_common(spec),
        per_device_train_batch_size=spec["batch"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    clock = _Clock()
    trainer.add_callback(clock.callback())
    base = rss_now()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return {"step": clock.steps[spec["warmup"] :], "rss_before": base, "total": total}


RUNNERS = {
    ("alignrl", "grpo"): run_alignrl_grpo,
    ("trl", "grpo"): run_trl_grpo,
    ("alignrl", "dpo"): run_alignrl_dpo,
    ("trl", "dpo"): run_trl_dpo,
}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = RUNNERS[(spec["lib"], spec["algo"])](spec)
    result["peak_rss"] = peak_rss()
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
