"""Sampling at natural lengths on SmolLM2-135M-Instruct: the arithmetic questions as conversations, G answers each,
ended by the model's own end-of-turn token, seeded (the same tokens on any version of the decoder, up to float
rounding).

    python -m bench.natural_decode [--prompts 4] [--group 8] [--tokens 128] [--reps 3]

Prints, per repetition (each with its own seeds; the first includes oneDNN's warm-up), the rollout's seconds, its
mean answer length and its width. For an A/B against another checkout, run it again with
PYTHONPATH=<that checkout>/src, alternating.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import alignrl
from alignrl.data import pad_batch
from alignrl.generation import SamplingParams, generate
from alignrl.models import load_causal_lm, load_tokenizer
from alignrl.pretrained import smollm2
from alignrl.rollout import encode_prompts, eos_ids
from bench.setup import write_chat_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    path = str(smollm2())
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [json.loads(line) for line in write_chat_prompts(Path(tmp)).read_text().splitlines()]
    rows = rows[: args.prompts]
    ids = encode_prompts(rows, tok, max_prompt_length=10**6, wheres=[f"prompt {i}" for i in range(len(rows))])
    seqs = [i for i in ids for _ in range(args.group)]
    pad = tok.pad_token_id or 0
    prompt_ids, prompt_mask = pad_batch(seqs, pad, left=True)
    params = SamplingParams(args.tokens, temperature=1.0)
    eos = eos_ids(tok, model)
    out = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        seeds = range(100 * rep, 100 * rep + len(seqs))
        ro = generate(model, prompt_ids, prompt_mask, params, eos, pad, seeds=seeds)
        seconds = time.perf_counter() - t0
        mean = ro.completion_mask.sum().item() / len(seqs)
        out.append({"s": round(seconds, 2), "mean_len": round(mean, 1), "width": ro.completion_ids.shape[1]})
    print(json.dumps({"alignrl": alignrl.__file__, "threads": torch.get_num_threads(), "rollouts": out}))


if __name__ == "__main__":
    main()
