"""Shared benchmark inputs: model directories, prompt data and the reward function, identical for both libraries."""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignrl.models import init_model, load_tokenizer

# name -> (hidden_size, layers, heads); character vocab (100 tokens), untied lm head, intermediate 4h
SIZES = {"4m": (256, 5, 4), "30m": (512, 10, 8), "tiny": (32, 1, 2)}
NEVER_EOS = "<never>"


def build_model(root: Path, size: str, never_eos: bool = True) -> Path:
    """A Llama from alignrl.models.init_model; with never_eos its EOS id lies outside the model's vocab.

    An EOS that cannot be sampled makes both libraries generate exactly max_completion_length tokens per
    completion (equal work on both sides, asserted by the worker). DPO appends EOS to responses, so it uses
    the plain directory (never_eos=False).
    """
    out = root / (f"model_{size}" if never_eos else f"model_{size}_plain")
    if (out / "config.json").is_file():
        return out
    h, n_layers, heads = SIZES[size]
    init_model(out, hidden_size=h, num_layers=n_layers, num_heads=heads, max_length=1024, seed=0)
    if not never_eos:
        return out
    tok = load_tokenizer(str(out))
    tok.add_special_tokens({"eos_token": NEVER_EOS})
    tok.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):
        p = out / name
        cfg = json.loads(p.read_text())
        cfg["eos_token_id"] = tok.eos_token_id
        p.write_text(json.dumps(cfg, indent=2))
    return out


def write_prompts(root: Path, n: int = 64, seed: int = 0) -> Path:
    """Arithmetic prompts of equal length (12 characters), one JSONL row each with a `prompt` column."""
    path = root / "prompts.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    rows = [{"prompt": f"{rng.randint(100, 999)}+{rng.randint(100, 999)}=? a:"} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_pairs(root: Path, seq_len: int, n: int = 64, seed: int = 0) -> Path:
    """DPO rows (prompt, chosen, rejected) whose prompt+response is seq_len characters (= tokens) long."""
    path = root / f"pairs_{seq_len}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    p_len = seq_len // 4
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice(alphabet) for _ in range(p_len))
        chosen = "".join(rng.choice(alphabet) for _ in range(seq_len - p_len))
        rejected = "".join(rng.choice(alphabet) for _ in range(seq_len - p_len))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def digit_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """Fraction of digit characters in the completion (TRL's reward signature; cheap, with spread in a group)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(sum(ch.isdigit() for ch in text) / max(1, len(text)))
    return out
