"""Sampling with a LoRA adapter on SmolLM2-135M-Instruct: the fused decoder (adapter merged into its weights once
per rollout) against stepping peft's layers, alternating, medians.

    python -m bench.lora_decode [--rows 16] [--tokens 32] [--rank 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import alignrl.decode as decode
from alignrl.data import pad_batch
from alignrl.generation import SamplingParams, generate
from alignrl.models import apply_lora, load_causal_lm, load_tokenizer
from alignrl.pretrained import smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    path = str(smollm2())
    tok = load_tokenizer(path)
    model = apply_lora(load_causal_lm(path), args.rank, 2 * args.rank, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    messages = [{"role": "user", "content": "What is 17 + 6? Give only the final number."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids, mask = pad_batch([tok(text, add_special_tokens=False).input_ids] * args.rows, tok.pad_token_id, left=True)
    params = SamplingParams(args.tokens, 1.0)
    never = [len(tok) + 1]  # an EOS id outside the vocabulary: every row samples all `tokens`

    def rollout() -> float:
        t0 = time.perf_counter()
        generate(model, ids, mask, params, never, tok.pad_token_id, seeds=list(range(args.rows)))
        return time.perf_counter() - t0

    build = decode.FastDecoder.build
    times: dict[str, list[float]] = {"fused": [], "peft": []}
    rollout()  # warm-up
    for _ in range(args.reps):
        decode.FastDecoder.build = build
        times["fused"].append(rollout())
        decode.FastDecoder.build = staticmethod(lambda *a: None)
        times["peft"].append(rollout())
    decode.FastDecoder.build = build
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"rows": args.rows, "tokens": args.tokens, "rank": args.rank, "threads": torch.get_num_threads(),
                      "seconds": medians, "ratio": medians["fused"] / medians["peft"], "all": times}))  # fmt: skip


if __name__ == "__main__":
    main()
