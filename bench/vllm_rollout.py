"""Rollouts on vLLM against the native engine, on the 30M bench model and SmolLM2-135M-Instruct (fp32, EOS
outside the vocabulary so that every completion has exactly --tokens tokens): one rollout batch's decode tokens/s
(alternating, medians), then GRPO's step and generation time with each engine (medians over the steps after the
first, which holds vLLM's start-up). vLLM's start-up and one full weight push are timed on their own. Runs in the
vLLM venv:

    .venv-vllm/bin/python -m bench.vllm_rollout [--rows 32] [--tokens 64] [--reps 3] [--grpo-steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignrl.engines.vllm_engine import VLLMEngine
from alignrl.generation import SamplingParams
from alignrl.models import load_causal_lm, load_tokenizer
from alignrl.rollout import NativeEngine
from bench.setup import build_model, write_prompts


def rollout_speed(model_dir: Path, prompts: list[list[int]], tokens: int, reps: int) -> dict:
    """Decode tokens/s of one batch on each engine, vLLM's start-up and a full weight push."""
    tok = load_tokenizer(str(model_dir))
    native = NativeEngine(load_causal_lm(str(model_dir)).eval(), tok)
    t0 = time.perf_counter()
    vllm = VLLMEngine(model_dir, tok, max_model_len=max(map(len, prompts)) + tokens, kv_cache_gib=1.0)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    vllm.load_weights(native.model.state_dict().items())
    push = time.perf_counter() - t0
    params = SamplingParams(tokens, 1.0)
    seeds = list(range(len(prompts)))
    engines = {"native": native, "vllm": vllm}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for e in engines.values():
        e.generate(prompts, params, seeds)  # warm-up
    for _ in range(reps):
        for name, e in engines.items():
            t0 = time.perf_counter()
            r = e.generate(prompts, params, seeds)
            times[name].append(time.perf_counter() - t0)
            assert int(r.completion_mask.sum()) == len(prompts) * tokens, "every completion must have all tokens"
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "startup_s": startup,
        "weight_push_s": push,
        "rollout_s": medians,
        "tokens_per_s": {k: len(prompts) * tokens / v for k, v in medians.items()},
        "speedup": medians["native"] / medians["vllm"],
        "all": times,
    }


def grpo_steps(model_dir: Path, prompts: Path, engine: str, tokens: int, steps: int, out: Path) -> dict:
    """Medians of step_time and time/generation over steps 2..N of a GRPO run with `engine`."""
    args = [f"model={model_dir}", f"train_file={prompts}", "reward_funcs=[bench.setup:digit_reward]",
            f"output_dir={out}", f"max_steps={steps}", "prompts_per_step=8", "num_generations=4",
            f"max_completion_length={tokens}", "learning_rate=1e-5", "beta=0.0", "progress_bar=false",
            f"rollout_engine={engine}", "vllm_kv_cache_gib=1.0", "overwrite_output_dir=true"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alignrl.cli", "train", "grpo", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:]
    return {
        "wall_s": wall,
        "first_step_s": rows[0]["step_time"],
        "step_s": statistics.median(m["step_time"] for m in later),
        "generation_s": statistics.median(m["time/generation"] for m in later),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grpo-steps", type=int, default=5)
    ap.add_argument("--models", default="30m,smollm2")
    ap.add_argument("--part", default="rollout,grpo")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="alignrl-vllm-bench-"))
    prompts_file = write_prompts(root)
    texts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()][: args.rows]
    results: dict = {"rows": args.rows, "tokens": args.tokens, "threads": torch.get_num_threads()}
    for size in args.models.split(","):
        model_dir = build_model(root, size)
        tok = load_tokenizer(str(model_dir))
        prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
        cell: dict = {}
        if "rollout" in args.part:  # in a child: one in-process vLLM engine per process
            code = (f"import json; from pathlib import Path; from bench.vllm_rollout import rollout_speed; "
                    f"print(json.dumps(rollout_speed(Path({str(model_dir)!r}), {prompts!r}, {args.tokens}, "
                    f"{args.reps})))")  # fmt: skip
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            cell["rollout"] = json.loads(proc.stdout.strip().splitlines()[-1])
        if "grpo" in args.part:
            cell["grpo"] = {
                e: grpo_steps(model_dir, prompts_file, e, args.tokens, args.grpo_steps, root / f"{size}-{e}")
                for e in ("native", "vllm")
            }
        results[size] = cell
        print(json.dumps({size: cell}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
