"""One benchmark workload in its own process (so peak RSS is clean): `python -m bench.worker SPEC.json OUT.json`.

SPEC keys: lib (alignrl|trl), algo (grpo|ppo|dpo|sft|rm), model, data, out_dir, precision (fp32|bf16), steps,
warmup, optional lora (rank; alpha = 2·rank, q/k/v/o) and per algo: prompts, G, length, beta, natural (grpo);
prompts, length, natural (ppo: alignrl only, TRL 1.16 has no PPO trainer); batch, max_length, beta (dpo);
batch, max_length (sft, rm). Writes per-step wall times (warm-up steps dropped), generation/rollout/update
times, completion lengths, the RSS before training and the process's peak RSS. A SPEC holding a list of specs
runs them one after another in this process (the smoke test: one interpreter start per library; peak RSS is
then the process's so far) and writes a list of results.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space. Not ru_maxrss:
    Linux carries the parent's peak into a child started by vfork + exec (as subprocess does), so a parent that
    once held more than the workload (e.g. bench.grid's bandwidth buffers) would set every worker's figure."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_lengths(spec: dict, lengths: list[float]) -> None:
    """Forced-length cells: every completion ran to max_completion_length (the never-EOS model)."""
    if not spec.get("natural"):
        assert all(v == spec["length"] for v in lengths), f"completions not full length: {lengths}"


def _alignrl_common(spec: dict) -> dict:
    """alignrl config fields shared by every workload (the twin of `_trl_common`)."""
    lora = {"lora_r": spec["lora"], "lora_alpha": 2 * spec["lora"]} if spec.get("lora") else {}
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
        **lora,
    )


def _timed_rows(spec: dict) -> list[dict]:
    """The timed steps (after warm-up) of an alignrl run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] > spec["warmup"] and "step_time" in r]


def _alignrl_online(spec: dict, trainer, cfg) -> dict:
    """Train a GRPO/PPO config; per-step times of its phases from metrics.jsonl."""
    base = rss_now()
    trainer.train(cfg)
    rows = _timed_rows(spec)
    lengths = [r["completion_length/mean"] for r in rows]
    _check_lengths(spec, lengths)
    return {
        "step": [r["step_time"] for r in rows],
        "generation": [r["time/generation"] for r in rows],
        "rollout": [r["time/generation"] + r.get("time/reference", 0.0) + r.get("time/values", 0.0) for r in rows],
        "update": [r["time/update"] for r in rows],
        "completion_length": lengths,
        "rss_before": base,
    }


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
    return _alignrl_online(spec, grpo, cfg)


def run_alignrl_ppo(spec: dict) -> dict:
    from alignrl.trainers import ppo

    cfg = ppo.PPOConfig(
        **_alignrl_common(spec),
        prompts_per_step=spec["prompts"],
        num_generations=1,
        max_completion_length=spec["length"],
        reward_funcs=["bench.setup:digit_reward"],
        log_completions=0,
    )
    return _alignrl_online(spec, ppo, cfg)


def _alignrl_offline(spec: dict, trainer, cfg) -> dict:
    """Train a DPO/SFT/RM config; per-step times from metrics.jsonl and the whole train() call's time."""
    base = rss_now()
    t0 = time.perf_counter()
    trainer.train(cfg)
    total = time.perf_counter() - t0
    return {"step": [r["step_time"] for r in _timed_rows(spec)], "rss_before": base, "total": total}


def run_alignrl_dpo(spec: dict) -> dict:
    from alignrl.trainers import dpo

    cfg = dpo.DPOConfig(
        **_alignrl_common(spec),
        batch_size=spec["batch"] // spec.get("accum", 1),  # same pairs per optimizer step as TRL's batch
        gradient_accumulation_steps=spec.get("accum", 1),
        **({"eval_batch_size": spec["ref_batch"]} if "ref_batch" in spec else {}),  # pairs per reference forward
        beta=spec["beta"],
        max_length=spec["max_length"],
    )
    return _alignrl_offline(spec, dpo, cfg)


def run_alignrl_sft(spec: dict) -> dict:
    from alignrl.trainers import sft

    cfg = sft.SFTConfig(**_alignrl_common(spec), batch_size=spec["batch"], max_length=spec["max_length"])
    return _alignrl_offline(spec, sft, cfg)


def run_alignrl_rm(spec: dict) -> dict:
    from alignrl.trainers import rm

    cfg = rm.RMConfig(**_alignrl_common(spec), batch_size=spec["batch"], max_length=spec["max_length"])
    return _alignrl_offline(spec, rm, cfg)


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


def _trl_trainer(spec: dict, trainer_cls, args, head: str = "causal", **kw):
    """A TRL trainer on the spec's model (float32 weights), tokenizer and JSONL rows, with a LoRA adapter when
    the spec has one (a reward model's `score` head then trains fully, as alignrl's)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if head == "score":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    if spec.get("lora"):
        from peft import LoraConfig

        kw["peft_config"] = LoraConfig(
            r=spec["lora"], lora_alpha=2 * spec["lora"], lora_dropout=0.0, target_modules=LORA_TARGETS,
            task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM",
        )  # fmt: skip
    return trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, **kw)


def run_trl_grpo(spec: dict) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from bench.setup import digit_reward

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
    trainer = _trl_trainer(spec, GRPOTrainer, args, reward_funcs=digit_reward)
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
    _check_lengths(spec, lengths)
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


def _trl_offline(spec: dict, trainer) -> dict:
    """Train a TRL DPO/SFT/reward trainer; per-step times by callback and the whole train() call's time."""
    clock = _Clock()
    trainer.add_callback(clock.callback())
    base = rss_now()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return {"step": clock.steps[spec["warmup"] :], "rss_before": base, "total": total}


def run_trl_dpo(spec: dict) -> dict:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **_trl_common(spec),
        per_device_train_batch_size=spec["batch"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
    )
    return _trl_offline(spec, _trl_trainer(spec, DPOTrainer, args))


def run_trl_sft(spec: dict) -> dict:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_trl_common(spec),
        per_device_train_batch_size=spec["batch"],
        max_length=spec["max_length"],
        completion_only_loss=True,  # loss on completion + EOS, as alignrl's prompt/completion rows
        packing=False,
    )
    return _trl_offline(spec, _trl_trainer(spec, SFTTrainer, args))


def run_trl_rm(spec: dict) -> dict:
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**_trl_common(spec), per_device_train_batch_size=spec["batch"], max_length=spec["max_length"])
    return _trl_offline(spec, _trl_trainer(spec, RewardTrainer, args, head="score"))


RUNNERS = {
    ("alignrl", "grpo"): run_alignrl_grpo,
    ("trl", "grpo"): run_trl_grpo,
    ("alignrl", "ppo"): run_alignrl_ppo,
    ("alignrl", "dpo"): run_alignrl_dpo,
    ("trl", "dpo"): run_trl_dpo,
    ("alignrl", "sft"): run_alignrl_sft,
    ("trl", "sft"): run_trl_sft,
    ("alignrl", "rm"): run_alignrl_rm,
    ("trl", "rm"): run_trl_rm,
}


def run(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = RUNNERS[(spec["lib"], spec["algo"])](spec)
    result["peak_rss"] = peak_rss()
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = [run(s) for s in spec] if isinstance(spec, list) else run(spec)
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
