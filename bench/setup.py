"""Shared benchmark inputs: model directories, prompt data and the reward function, identical for both libraries."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from alignrl.models import init_model, load_tokenizer

# name -> (hidden_size, layers, heads); character vocab (100 tokens), untied lm head, intermediate 4h
SIZES = {"1m": (128, 4, 4), "4m": (256, 5, 4), "30m": (512, 10, 8), "tiny": (32, 1, 2)}
PRETRAINED = ("smollm2",)  # SmolLM2-135M-Instruct (alignrl.pretrained.smollm2), BPE vocabulary of 49152
NEVER_EOS = "<never>"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


def build_model(root: Path, size: str, never_eos: bool = True) -> Path:
    """A model directory: a Llama from alignrl.models.init_model (SIZES) or SmolLM2-135M-Instruct ("smollm2");
    with never_eos its EOS id lies outside the model's vocab.

    An EOS that cannot be sampled makes both libraries generate exactly max_completion_length tokens per
    completion (equal work on both sides, asserted by the worker). DPO appends EOS to responses, so it uses
    the plain directory (never_eos=False). SmolLM2's never-EOS directory links the pretrained weights.
    """
    if size in PRETRAINED and not never_eos:
        from alignrl.pretrained import smollm2

        return smollm2()
    out = root / (f"model_{size}" if never_eos else f"model_{size}_plain")
    if (out / "config.json").is_file():
        return out
    if size in PRETRAINED:
        src = build_model(root, size, never_eos=False)
        out.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix == ".safetensors":
                (out / f.name).symlink_to(f)
            else:
                shutil.copy(f, out / f.name)
    else:
        h, n_layers, heads = SIZES[size]
        init_model(out, hidden_size=h, num_layers=n_layers, num_heads=heads, max_length=1024, seed=0)
        if not never_eos:
            return out
    tok = load_tokenizer(str(out))
    tok.add_special_tokens({"eos_token": NEVER_EOS})  # the next id: one past the model's vocabulary
    tok.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):
        p = out / name
        cfg = json.loads(p.read_text()) if p.is_file() else {}
        cfg["eos_token_id"] = tok.eos_token_id
        p.write_text(json.dumps(cfg, indent=2))
    return out


def _write_sums(path: Path, n: int, seed: int, row: Callable[[int, int], dict]) -> Path:
    """`path` with one JSONL row per sum of two random 3-digit numbers (the same sums for the same n and seed)."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    rows = [row(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(root: Path, n: int = 64, seed: int = 0) -> Path:
    """Arithmetic prompts of equal length (12 characters), one JSONL row each with a `prompt` column."""
    return _write_sums(root / "prompts.jsonl", n, seed, lambda a, b: {"prompt": f"{a}+{b}=? a:"})


def write_chat_prompts(root: Path, n: int = 64, seed: int = 0) -> Path:
    """The arithmetic questions of `write_prompts` as one-turn conversations (TRL's conversational `prompt`
    column): an instruction-tuned model answers them and stops at its own end-of-turn token."""
    return _write_sums(root / "prompts_chat.jsonl", n, seed,
                       lambda a, b: {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]})  # fmt: skip


def word_pieces(tokenizer) -> list[str]:
    """Strings that are one token each and stay one token each when concatenated: ' word' tokens of a
    byte-level BPE vocabulary (its pre-tokenizer splits text before every space)."""
    pieces = []
    for i in sorted(tokenizer.get_vocab().values()):
        word = tokenizer.decode([i])
        if word[:1] == " " and word[1:].isalpha() and word[1:].islower() and 3 <= len(word) <= 9:
            if tokenizer(word, add_special_tokens=False).input_ids == [i]:
                pieces.append(word)
    return pieces[:4000]


def write_pairs(root: Path, seq_len: int, n: int = 64, seed: int = 0, prompt_len: int | None = None,
                tokenizer=None, tag: str = "") -> Path:  # fmt: skip
    """DPO/RM rows (prompt, chosen, rejected) whose prompt+response is seq_len tokens long (prompt: prompt_len,
    default seq_len // 4): characters of the benchmark models' character vocabulary, or with a BPE `tokenizer`
    one-token words of it (`tag` names that vocabulary in the file name)."""
    p_len = seq_len // 4 if prompt_len is None else prompt_len
    name = f"pairs_{seq_len}" + ("" if prompt_len is None else f"_p{p_len}") + (f"_{tag}" if tag else "")
    path = root / f"{name}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    pieces = list(ALPHABET) if tokenizer is None else word_pieces(tokenizer)

    def text(k: int) -> str:
        return "".join(rng.choice(pieces) for _ in range(k))

    rows = [{"prompt": text(p_len), "chosen": text(seq_len - p_len), "rejected": text(seq_len - p_len)}
            for _ in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sft(pairs: Path) -> Path:
    """SFT rows (prompt, completion) from a pairs file: each prompt with its chosen response."""
    path = pairs.with_name(pairs.name.replace("pairs_", "sft_", 1))
    if not path.is_file():
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    return path


def digit_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """Fraction of digit characters in the completion (TRL's reward signature; cheap, with spread in a group)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(sum(ch.isdigit() for ch in text) / max(1, len(text)))
    return out
