"""The time of one decode token step: a forced-length rollout of a bench model through `alignrl.generation`.

    python -m bench.decode_step [--model 4m] [--rows 32] [--tokens 128] [--precision fp32|bf16] [--reps 4]

R random 12-token prompts, T sampled tokens each at temperature 1 (the EOS id lies outside the vocabulary, so every
row runs to T), float32 weights, bf16 autocast with --precision bf16. Prints one JSON line: each repetition's
seconds (the first holds oneDNN's warm-up) and the median of the others per token step. For an A/B against another
checkout, run it again with PYTHONPATH=<that checkout>/src, alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignrl.generation import SamplingParams, generate
from alignrl.models import load_causal_lm
from bench.setup import build_model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="4m", help="a bench.setup size (tiny, 1m, 4m, 30m) or smollm2")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_causal_lm(str(build_model(Path(tmp), a.model)))
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (a.rows, 12), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(a.tokens, temperature=1.0, autocast=torch.bfloat16 if a.precision == "bf16" else None)
    seconds = []
    for _ in range(max(a.reps, 2)):
        t0 = time.perf_counter()
        ro = generate(model, ids, torch.ones_like(ids), params, [vocab + 1], 0)
        seconds.append(time.perf_counter() - t0)
        assert ro.completion_ids.shape == (a.rows, a.tokens)
    out = {"model": a.model, "rows": a.rows, "tokens": a.tokens, "precision": a.precision,
           "rollout_s": [round(s, 4) for s in seconds],
           "ms_per_token_step": round(1e3 * statistics.median(seconds[1:]) / a.tokens, 3)}  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
