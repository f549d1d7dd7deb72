"""`alignrl eval`: a model on a prompt file with reward functions -> greedy accuracy and optional pass@k.

Greedy completions are scored with the reward functions (summed with `weights`, as in training): the mean reward
and the share of prompts whose reward reaches `threshold` (accuracy, for a 0/1 answer check). With `pass_k` ≥ 1,
k completions per prompt are also sampled at `temperature`; pass@k is the unbiased estimate
1 - C(n-c, k)/C(n, k) from n = k samples of which c reach the threshold (Chen et al. 2021), i.e. the share of
prompts with at least one success.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignrl.data import load_rows, require_columns
from alignrl.errors import AlignRLError
from alignrl.generation import SamplingParams
from alignrl.models import load_causal_lm, load_tokenizer, resolve_device
from alignrl.rewards import RewardFunctions
from alignrl.rollout import score_rows


@dataclass
class EvalResult:
    """What `alignrl eval` prints and writes as JSON."""

    model: str
    data: str
    reward_funcs: list[str]
    prompts: int
    mean_reward: float
    accuracy: float  # share of prompts whose greedy reward reaches the threshold
    threshold: float
    per_function: dict[str, float | None] = field(default_factory=dict)  # mean greedy reward per function
    pass_k: int = 0
    pass_at_k: float | None = None
    temperature: float | None = None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c successes: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_model(
    model_path: str,
    data_path: str,
    reward_funcs: list[str],
    *,
    max_new_tokens: int = 256,
    max_prompt_length: int = 1024,
    batch_size: int = 32,
    threshold: float = 1.0,
    pass_k: int = 0,
    temperature: float = 1.0,
    limit: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    seed: int = 0,
    model: torch.nn.Module | None = None,
    tokenizer=None,
) -> EvalResult:
    """Score greedy (and, with pass_k ≥ 1, sampled) completions of every prompt in `data_path`."""
    checks = {
        "--max-new-tokens": (max_new_tokens >= 1, "≥ 1"),
        "--max-prompt-length": (max_prompt_length >= 1, "≥ 1"),
        "--batch-size": (batch_size >= 1, "≥ 1"),
        "--pass-k": (pass_k >= 0, "≥ 0"),
        "--temperature": (temperature > 0, "> 0"),
        "--limit": (limit >= 0, "≥ 0"),
    }
    for name, (ok, rule) in checks.items():
        if not ok:
            raise AlignRLError(f"{name}: must be {rule}")
    data = load_rows(data_path)
    if limit:
        data = data.subset(range(min(limit, len(data))))
    require_columns(data, ["prompt"])
    fns = RewardFunctions(reward_funcs, None, set(data.rows[0]), data_path)
    fns.set_step(0, 1)  # trainer_state for functions that read it (no training here)
    dev = resolve_device(device)
    if model is None:
        model = load_causal_lm(model_path, dtype, dev, "--model").eval()
        tokenizer = load_tokenizer(model_path, "--model")
    greedy, per_fn = _score(model, tokenizer, data, fns, 1, SamplingParams(max_new_tokens, 0.0), batch_size,
                            max_prompt_length, dev, seed)  # fmt: skip
    result = EvalResult(
        model=model_path,
        data=data_path,
        reward_funcs=list(reward_funcs),
        prompts=len(data),
        mean_reward=float(greedy.mean()),
        accuracy=float((greedy >= threshold).float().mean()),
        threshold=threshold,
        per_function=per_fn,
    )
    if pass_k >= 1:
        sampled, _ = _score(model, tokenizer, data, fns, pass_k, SamplingParams(max_new_tokens, temperature),
                            batch_size, max_prompt_length, dev, seed)  # fmt: skip
        hits = (sampled.view(len(data), pass_k) >= threshold).sum(1).tolist()
        result.pass_k, result.temperature = pass_k, temperature
        result.pass_at_k = sum(pass_at_k(pass_k, int(c), pass_k) for c in hits) / len(data)
    return result


def _score(model, tokenizer, data, fns, repeats, params, batch_size, max_prompt_length, device, seed):
    """Combined rewards [N * repeats] (prompt-major) and the mean per reward function (NaN-aware: None skipped)."""
    rewards, raw = score_rows(
        model, tokenizer, data.rows, fns, params, repeats=repeats, batch_size=batch_size,
        max_prompt_length=max_prompt_length, device=device, seed=seed, wheres=[data.where(i) for i in range(len(data))],
    )  # fmt: skip
    return rewards, {name: _finite(float(raw[:, j].nanmean())) for j, name in enumerate(fns.names)}


def _finite(x: float) -> float | None:
    """None for NaN (a function that never applied): JSON has no NaN."""
    return None if math.isnan(x) else x


def report(result: EvalResult, json_path: str | None = None) -> str:
    """The table printed on stdout (and the JSON file written when asked)."""
    rows = [("model", result.model), ("data", f"{result.data} ({result.prompts} prompts)"),
            ("mean reward (greedy)", f"{result.mean_reward:.4f}"),
            (f"accuracy (greedy, reward ≥ {result.threshold:g})", f"{result.accuracy:.1%}")]  # fmt: skip
    rows += [(f"  {name} (mean)", "n/a" if v is None else f"{v:.4f}") for name, v in result.per_function.items()]
    if result.pass_at_k is not None:
        rows.append((f"pass@{result.pass_k} (temperature {result.temperature:g})", f"{result.pass_at_k:.1%}"))
    width = max(len(r[0]) for r in rows) + 2
    if json_path:
        path = Path(json_path)
        if path.is_dir():
            raise AlignRLError(f"--json: {json_path} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)
