"""The rate of a decode step's projections: the fused decoder's own pre-packed weights, R rows per product.

    python -m bench.decode_matmul [--model 30m] [--rows 32] [--precision fp32|bf16] [--reps 30]

Times the q/k/v, o, gate/up and down products of every layer plus the lm head, as one token step calls them
(`streamed`: each layer's weights in turn, read from memory), and the first layer's products repeated once per
layer (`hot`: the same FLOPs on weights that stay in cache), against this machine's 2048² matmul rate
(`bench.compare.matmul_flops`). Medians of --reps; prints one JSON line. The hot rate bounds what any decode step
of R rows can reach through these products, however its other ops are arranged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignrl.decode import FastDecoder
from alignrl.models import load_causal_lm
from bench.compare import matmul_flops
from bench.setup import build_model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="30m", help="a bench.setup size (1m, 4m, 30m) or smollm2")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model = load_causal_lm(str(build_model(Path(tmp), a.model))).eval()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=a.precision == "bf16"):
        fast = FastDecoder.build(model, 64, a.rows)
        assert fast is not None, f"{a.model}: not a model the fused decoder covers"
        c = model.config
        hidden, inter, d = c.hidden_size, c.intermediate_size, fast.head_dim
        shapes = [(hidden, (fast.n_heads + 2 * fast.n_kv) * d), (fast.n_heads * d, hidden), (hidden, 2 * inter),
                  (inter, hidden)]  # fmt: skip
        # (qkv, o, gate_up, down) of each layer with their (in, out) widths
        layers = [list(zip((layer[1], layer[2], layer[4], layer[5]), shapes)) for layer in fast.layers]
        head = (fast.head, (hidden, c.vocab_size))
        inputs = {n: torch.randn(a.rows, n, dtype=dtype) for n in (hidden, fast.n_heads * d, inter)}

        def run(step: list) -> float:
            t0 = time.perf_counter()
            for proj, (n_in, _) in step:
                proj(inputs[n_in])
            return time.perf_counter() - t0

        streamed = [p for layer in layers for p in layer] + [head]
        hot = [p for _ in layers for p in layers[0]] + [head]
        flops = sum(2 * a.rows * n_in * n_out for _, (n_in, n_out) in streamed)
        times = {}
        for name, step in (("streamed", streamed), ("hot", hot)):
            run(step)
            times[name] = statistics.median(run(step) for _ in range(a.reps))
    rate = matmul_flops(a.precision, 2048)
    assert flops == 2 * a.rows * weights, (flops, weights)  # every projection and the lm head, once
    out = {"model": a.model, "rows": a.rows, "precision": a.precision, "gflop_per_step": flops / 1e9,
           "matmul_2048_gflop_s": rate / 1e9}  # fmt: skip
    for name, t in times.items():
        out |= {f"{name}_ms": 1e3 * t, f"{name}_gflop_s": flops / t / 1e9, f"{name}_of_2048_rate": flops / t / rate}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
