"""Data-parallel scaling on this machine: SFT-style update steps (log-prob forward, backward, AdamW step) on a
global batch, 1 process vs N processes (DDP or FSDP2), and the communication share.

    python bench/dist_scaling.py --mode none                       # 1 process (all cores)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/dist_scaling.py --mode ddp
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/dist_scaling.py --mode fsdp
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/dist_scaling.py --mode local  # no comm

`local` runs the same per-rank work with every collective removed (each rank updates its own unwrapped copy);
communication share = 1 - t(local) / t(ddp|fsdp): the step time that communication (and waiting for the
slower rank) adds. Prints one JSON line (rank 0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers.utils import logging as hf_logging

from alignrl import distributed as D
from alignrl.models import init_model, load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["none", "ddp", "fsdp", "local"], required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)  # global sequences per step
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dev = D.init("ddp" if args.mode != "none" else "none", args.device)
    path = None
    if D.is_main():
        path = tempfile.mkdtemp(prefix="scale-") + "/m"
        init_model(path, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, max_length=args.length)
    path = D.broadcast_object(path)
    lm = load_causal_lm(path, "float32", dev)
    n_params = sum(p.numel() for p in lm.parameters())
    pol = D.PolicyLogProbs(lm)
    if args.mode in ("ddp", "fsdp"):
        pol = D.wrap_model(pol, args.mode, dev)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 90, (args.batch, args.length), generator=g).to(dev)
    attn = torch.ones_like(ids)
    a, b = D.shard_bounds(args.batch)
    tm = attn[a:b, 1:]
    scale = D.grad_scale() if args.mode in ("ddp", "fsdp") else 1.0
    times = []
    for step in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        D.barrier()
        t0 = time.perf_counter()
        n = args.batch * (args.length - 1)
        lp, _ = pol(ids[a:b], attn[a:b], tm, start=1)
        (-lp.sum() / n * scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = D.all_reduce(time.perf_counter() - t0, "max")
        if step >= args.warmup:
            times.append(dt)
    t = sorted(times)[len(times) // 2]
    if D.is_main():
        tokens = args.batch * args.length
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "world_size": D.world_size(),
                    "threads_per_rank": torch.get_num_threads(),
                    "device": str(dev),
                    "params": n_params,
                    "global_tokens_per_step": tokens,
                    "median_step_s": round(t, 4),
                    "tokens_per_s": round(tokens / t, 1),
                }
            )
        )
    D.shutdown()


if __name__ == "__main__":
    main()
