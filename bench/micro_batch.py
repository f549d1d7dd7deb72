"""The token budget per forward/backward (micro_batch_tokens): time and peak memory of one policy update's passes
(log-probs over the completion tokens, backward) for a batch split at several budgets; each cell in its own
subprocess so that its peak RSS is its own.

    python -m bench.micro_batch [--reps 2] [--out bench/results/micro_batch.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BUDGETS = (1024, 2048, 4096, 8192, 0)  # 0: the whole batch in one pass
# (model, rows, prompt tokens, completion tokens): GRPO-shaped batches
WORKLOADS = (
    ("4m", 64, 12, 8),
    ("4m", 32, 12, 128),
    ("30m", 32, 12, 128),
    ("smollm2", 16, 40, 64),
)


def model_dir(name: str, root: Path) -> str:
    if name == "smollm2":
        from alignrl.pretrained import smollm2

        return str(smollm2())
    from bench.setup import build_model

    return str(build_model(root, name, never_eos=False))


def cell(path: str, rows: int, prompt: int, completion: int, budget: int, reps: int) -> dict:
    """Median seconds of the update passes at `budget`, and this process's peak RSS."""
    from alignrl.data import split_by_tokens
    from alignrl.logprobs import token_logprobs
    from alignrl.models import load_causal_lm
    from bench.worker import peak_rss, rss_now

    torch.manual_seed(0)
    model = load_causal_lm(path)
    model.train()
    vocab = model.config.vocab_size
    # completion lengths spread over [completion / 2, completion], as a trained task's natural lengths
    lengths = [completion // 2 + (i * (completion // 2)) // max(rows - 1, 1) for i in range(rows)]
    ids = torch.randint(0, vocab, (rows, prompt + completion))
    attn = torch.ones_like(ids)
    target = torch.zeros(rows, completion, dtype=torch.long)
    for i, n in enumerate(lengths):
        target[i, :n] = 1
        attn[i, prompt + n :] = 0
    parts = split_by_tokens([prompt + n for n in lengths], budget)
    n_tok = float(target.sum())
    rss_before = rss_now()
    times = []
    for _ in range(reps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        for p in parts:
            logp, _ = token_logprobs(model, ids[p], attn[p], target[p], start=prompt)
            (-(logp * target[p]).sum() / n_tok).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return {"seconds": statistics.median(times[1:]), "passes": len(parts),
            "peak_rss_mb": peak_rss() / 2**20, "rss_before_mb": rss_before / 2**20}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="bench/results/micro_batch.json")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(cell(**spec)))
        return
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows, prompt, completion in WORKLOADS:
            path = model_dir(name, Path(tmp))
            reps = 1 if name == "smollm2" else args.reps
            for budget in BUDGETS:
                spec = {"path": path, "rows": rows, "prompt": prompt, "completion": completion, "budget": budget,
                        "reps": reps}  # fmt: skip
                out = subprocess.run([sys.executable, "-m", "bench.micro_batch", "--cell", json.dumps(spec)],
                                     capture_output=True, text=True, check=True).stdout  # fmt: skip
                row = {"model": name, "rows": rows, "prompt": prompt, "completion": completion, "budget": budget,
                       **json.loads(out.strip().splitlines()[-1])}  # fmt: skip
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    facts = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "cpu": platform.processor() or platform.machine()}  # fmt: skip
    Path(args.out).write_text(json.dumps({"machine": facts, "rows": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
