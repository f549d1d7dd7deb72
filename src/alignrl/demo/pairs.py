"""Demo preference data and reward model, shared by the DPO, RM and PPO demo stages.

`build_pairs` samples completions from the SFT model itself and prefers a correct final answer over an
incorrect one for the same prompt (train pairs from training prompts, eval pairs from the held-out test
prompts). `train_reward_model` trains a Bradley–Terry reward model on them. Both are cached in the demo
directory and reused by later runs with the same settings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from alignrl.data import write_jsonl
from alignrl.demo import DemoContext
from alignrl.demo.task import worked_solution

SAMPLES_PER_PROMPT = 8  # completions sampled per prompt at temperature 1
PAIRS_PER_PROMPT = 2  # at most this many (correct, incorrect) pairs per prompt
TRAIN_PROMPTS = 2000  # training prompts sampled (of the task's RL prompts)
EVAL_PROMPTS = 500  # held-out prompts (the test set) for eval pairs
RM_STEPS = 150


@dataclass
class PairPaths:
    """JSONL files of {"prompt", "chosen", "rejected"} rows and their row counts."""

    train: str
    eval: str
    n_train: int
    n_eval: int


def _cached(marker: Path, key: dict) -> bool:
    return marker.is_file() and json.loads(marker.read_text()) == key


def sample_pairs(
    ctx: DemoContext, sft_dir: str, rows: list[dict], samples: int, pairs_per_prompt: int, seed: int
) -> list[dict]:
    """Sample `samples` completions per row from the model; pair distinct correct and incorrect ones. With
    --quick (an SFT model of a few steps, which rarely finishes an answer), a prompt without such a pair gets the
    worked solution against the same with a wrong final answer, so that the quick demo runs end to end."""
    import torch

    from alignrl.generation import SamplingParams
    from alignrl.models import load_causal_lm, load_tokenizer
    from alignrl.rewards import RewardFunctions
    from alignrl.rollout import NativeEngine, sample_and_score

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok, model = load_tokenizer(sft_dir), load_causal_lm(sft_dir).eval()
    fns = RewardFunctions(["gsm8k"], None, set(rows[0]), "demo prompts")
    params = SamplingParams(max_new_tokens=24, temperature=1.0)
    out = []
    per_batch = max(1, 512 // samples)
    for s in range(0, len(rows), per_batch):
        chunk = rows[s : s + per_batch]
        wheres = [f"row {s + i + 1}" for i in range(len(chunk))]
        scored = sample_and_score(NativeEngine(model, tok), tok, chunk, wheres, fns, params, repeats=samples,
                                  max_prompt_length=32, device=torch.device("cpu"))  # fmt: skip
        truncated = scored.rollout.truncated.tolist()
        for i, row in enumerate(chunk):
            good, bad = [], []
            for j in range(i * samples, (i + 1) * samples):
                text = scored.completions[j]
                if truncated[j] or not text.strip():
                    continue
                bucket = good if scored.rewards[j] > 0.5 else bad
                if text not in bucket:
                    bucket.append(text)
            rng.shuffle(good)
            rng.shuffle(bad)
            for k in range(min(pairs_per_prompt, max(len(good), len(bad)) if good and bad else 0)):
                out.append({"prompt": row["prompt"], "chosen": good[k % len(good)], "rejected": bad[k % len(bad)]})
            if ctx.quick and not (good and bad):
                a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
                right = worked_solution(a, b)
                wrong = right[: right.rindex(";") + 1] + str(a + b + 1)
                out.append({"prompt": row["prompt"], "chosen": right, "rejected": wrong})
    return out


def build_pairs(
    ctx: DemoContext,
    sft_dir: str,
    n_train: int | None = None,
    samples: int = SAMPLES_PER_PROMPT,
    pairs_per_prompt: int = PAIRS_PER_PROMPT,
) -> PairPaths:
    """Preference pairs from the SFT model's own samples (correct answer preferred), cached in ROOT/pairs."""
    n_train = n_train or ctx.steps(TRAIN_PROMPTS, 48)
    n_eval = ctx.steps(EVAL_PROMPTS, 48)
    root = ctx.root / "pairs"
    key = {"seed": ctx.seed, "sft": sft_dir, "n_train": n_train, "n_eval": n_eval, "samples": samples,
           "pairs_per_prompt": pairs_per_prompt}  # fmt: skip
    marker = root / "demo.json"
    paths = PairPaths(str(root / "train.jsonl"), str(root / "eval.jsonl"), 0, 0)
    if _cached(marker, key):
        paths.n_train = sum(1 for _ in open(paths.train))
        paths.n_eval = sum(1 for _ in open(paths.eval))
        ctx.log(f"reusing preference pairs in {root} ({paths.n_train} train, {paths.n_eval} eval)")
        return paths
    ctx.log(f"sampling {samples} completions per prompt from the SFT model for preference pairs")
    train = sample_pairs(ctx, sft_dir, ctx.task.rl[:n_train], samples, pairs_per_prompt, ctx.seed)
    evals = sample_pairs(ctx, sft_dir, ctx.task.test[:n_eval], samples, 1, ctx.seed + 1)
    write_jsonl(paths.train, train)
    write_jsonl(paths.eval, evals)
    marker.write_text(json.dumps(key))
    paths.n_train, paths.n_eval = len(train), len(evals)
    ctx.log(f"{len(train)} train pairs from {n_train} prompts, {len(evals)} held-out pairs from {n_eval} prompts")
    return paths


def train_reward_model(
    ctx: DemoContext, sft_dir: str, pairs: PairPaths | None = None, steps: int | None = None
) -> str:
    """A Bradley–Terry reward model on the demo pairs, initialised from the SFT model (cached in ROOT/rm)."""
    from alignrl.config import load_config
    from alignrl.trainers import rm

    pairs = pairs or build_pairs(ctx, sft_dir)
    steps = steps or ctx.steps(RM_STEPS, 2)
    final = ctx.root / "rm" / "final"
    marker = ctx.root / "rm" / "demo.json"
    key = {"seed": ctx.seed, "sft": sft_dir, "train": pairs.train, "n_train": pairs.n_train, "steps": steps}
    if (final / "config.json").is_file() and _cached(marker, key):
        ctx.log(f"reusing reward model {final}")
        return str(final)
    ctx.log(f"training a reward model on {pairs.n_train} pairs")
    cfg = load_config(rm.RMConfig, None, [
        f"model={sft_dir}", f"train_file={pairs.train}", f"eval_file={pairs.eval}", f"output_dir={ctx.root / 'rm'}",
        "overwrite_output_dir=true",
        f"seed={ctx.seed}", "batch_size=32", "eval_batch_size=128", "max_length=64", "learning_rate=1e-4",
        "warmup_steps=20", "lr_scheduler=cosine", f"max_steps={steps}", "center_rewards_coefficient=0.01",
        f"logging_steps={ctx.steps(5, 1)}", "on_bad_row=skip",
    ])  # fmt: skip
    out = str(rm.train(cfg))
    marker.write_text(json.dumps(key))
    return out


def last_metrics(run_dir: str | Path) -> dict:
    """The last metrics row with evaluation results of a run directory, and the first (step 0) one."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    return {"first": evals[0] if evals else {}, "last": evals[-1] if evals else {}}
