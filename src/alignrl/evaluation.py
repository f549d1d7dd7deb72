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
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from alignrl import distributed as dist
from alignrl.data import Rows, load_rows, require_columns
from alignrl.errors import AlignRLError
from alignrl.generation import SamplingParams
from alignrl.models import check_model_dir, load_causal_lm, load_tokenizer, resolve_device, resolve_model_path
from alignrl.rewards import RewardFunctions
from alignrl.rollout import NativeEngine, RolloutEngine, score_rows


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
    episodes: dict[str, float] = field(default_factory=dict)  # multi-turn: turns, tool calls, reward parts (means)


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
    environment: str | None = None,
    tools: list[str] | None = None,
    max_turns: int = 0,
    rollout_engine: str = "native",
    vllm_kv_cache_gib: float | None = None,
) -> EvalResult:
    """Score greedy (and, with pass_k ≥ 1, sampled) completions of every prompt in `data_path`; with an
    `environment` or `tools`, each sample is a multi-turn episode (max_new_tokens per assistant turn). The
    completions come from `rollout_engine`: alignrl's decoder (native) or vLLM in this process (vllm)."""
    checks = {
        "--max-new-tokens": (max_new_tokens >= 1, "≥ 1"),
        "--max-prompt-length": (max_prompt_length >= 1, "≥ 1"),
        "--batch-size": (batch_size >= 1, "≥ 1"),
        "--pass-k": (pass_k >= 0, "≥ 0"),
        "--temperature": (temperature > 0, "> 0"),
        "--limit": (limit >= 0, "≥ 0"),
        "--max-turns": (max_turns >= 0, "≥ 0"),
        "--rollout-engine": (rollout_engine in ("native", "vllm"), "native or vllm"),
    }
    for name, (ok, rule) in checks.items():
        if not ok:
            raise AlignRLError(f"{name}: must be {rule}")
    data = load_rows(data_path)
    if limit:
        data = data.subset(range(min(limit, len(data))))
    from alignrl.episodes import build_interaction, reward_functions

    options = SimpleNamespace(environment=environment, tools=tools or [], max_turns=max_turns, max_episode_tokens=0,
                              max_completion_length=max_new_tokens, tool_timeout=10.0)  # fmt: skip
    interaction = build_interaction(options)
    if interaction is None:
        if not reward_funcs:
            raise AlignRLError("--reward-funcs: give at least one reward function (or --environment / --tools)")
        require_columns(data, ["prompt"])
    env_name = interaction.name if interaction else None
    fns = reward_functions(reward_funcs, None, set(data.rows[0]), data_path, env_name, max_steps=1)
    dev = resolve_device(device)
    engine: RolloutEngine
    if rollout_engine == "vllm":
        from alignrl.engines.vllm_engine import VLLMEngine

        if vllm_kv_cache_gib is not None and vllm_kv_cache_gib <= 0:
            raise AlignRLError("--vllm-kv-cache-gib: must be > 0")
        check_model_dir(model_path, "--model")
        path = resolve_model_path(model_path, "--model")
        tokenizer = tokenizer or load_tokenizer(model_path, "--model")
        # the KV cache sized for this evaluation's sequences, not the model's whole context
        episode = interaction.max_episode_tokens if interaction else max_new_tokens
        engine = VLLMEngine(path, tokenizer, dtype=dtype, max_model_len=max_prompt_length + episode,
                            kv_cache_gib=vllm_kv_cache_gib, device=dev)  # fmt: skip
    else:
        if model is None:
            model = load_causal_lm(model_path, dtype, dev, "--model").eval()
        tokenizer = tokenizer or load_tokenizer(model_path, "--model")
        engine = NativeEngine(model, tokenizer, dev)
    try:
        sums, _ = eval_sums(engine, tokenizer, data, fns, max_new_tokens=max_new_tokens,
                            max_prompt_length=max_prompt_length, batch_size=batch_size, threshold=threshold,
                            pass_k=pass_k, temperature=temperature, device=dev, seed=seed,
                            interaction=interaction)  # fmt: skip
    finally:
        if rollout_engine == "vllm":
            engine.close()  # type: ignore[attr-defined]
    m = eval_metrics(sums, fns.names, pass_k)
    return EvalResult(
        model=model_path,
        data=data_path,
        reward_funcs=list(reward_funcs) + ([env_name] if env_name else []),
        prompts=len(data),
        mean_reward=m["reward"],
        accuracy=m["accuracy"],
        threshold=threshold,
        per_function={name: _finite(m[f"rewards/{name}/mean"]) for name in fns.names},
        pass_k=pass_k,
        pass_at_k=m.get(f"pass@{pass_k}"),
        temperature=temperature if pass_k else None,
        episodes={k: v for k, v in m.items() if k.startswith(("episode/", "env/"))},
    )


def eval_sums(
    engine: RolloutEngine,
    tokenizer,
    data: Rows,
    fns: RewardFunctions,
    *,
    max_new_tokens: int,
    max_prompt_length: int = 1024,
    batch_size: int = 32,
    threshold: float = 1.0,
    pass_k: int = 0,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    first_index: int = 0,
    interaction: Any = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sums over the prompts of `data` (a process's share, added over processes by the caller; `first_index` is
    the share's start in the whole set) and the greedy completions as sample rows."""
    wheres = [data.where(i) for i in range(len(data))]
    greedy = score_rows(engine, tokenizer, data.rows, fns, SamplingParams(max_new_tokens, 0.0), batch_size=batch_size,
                        max_prompt_length=max_prompt_length, device=device, seed=seed, wheres=wheres,
                        first_index=first_index, interaction=interaction)  # fmt: skip
    sums = {
        "prompts": float(len(data)),
        "reward": float(greedy.rewards.sum()),
        "solved": float((greedy.rewards >= threshold).sum()),
        "completion_length": float(greedy.lengths.sum()),
    }
    for j, name in enumerate(fns.names):
        applies = ~greedy.raw[:, j].isnan()
        sums[f"rewards/{name}/sum"] = float(greedy.raw[applies, j].sum())
        sums[f"rewards/{name}/count"] = float(applies.sum())
    for key, values in greedy.episode_stats.items():  # multi-turn: means over episodes, as in training
        sums[f"{key}/sum"] = float(values.sum())
    if pass_k >= 1:
        sampled = score_rows(engine, tokenizer, data.rows, fns, SamplingParams(max_new_tokens, temperature),
                             repeats=pass_k, batch_size=batch_size, max_prompt_length=max_prompt_length,
                             device=device, seed=seed, wheres=wheres, first_index=first_index,
                             interaction=interaction)  # fmt: skip
        hits = (sampled.rewards.view(len(data), pass_k) >= threshold).sum(1).tolist()
        sums["pass_at_k"] = sum(pass_at_k(pass_k, int(c), pass_k) for c in hits)
    samples = [
        {"eval": True, "prompt": p, "completion": c, "reward": float(r)}
        for p, c, r in zip(greedy.prompts, greedy.completions, greedy.rewards.tolist())
    ]
    return sums, samples


def eval_set(cfg: Any, env_name: str | None = None) -> tuple[Rows | None, RewardFunctions | None]:
    """An online trainer's held-out set (eval_file) and the reward functions it is scored with (eval_reward_funcs,
    else reward_funcs with their weights), checked against its columns before training."""
    if not cfg.eval_file:
        return None, None
    data = load_rows(cfg.eval_file)
    if env_name is None:
        require_columns(data, ["prompt"])
    specs = cfg.eval_reward_funcs or cfg.reward_funcs or []
    weights = None if cfg.eval_reward_funcs else cfg.reward_weights
    from alignrl.episodes import reward_functions

    fns = reward_functions(specs, weights, set(data.rows[0]), cfg.eval_file, env_name, timeout=cfg.reward_timeout,
                           max_steps=cfg.max_steps)  # fmt: skip
    return data, fns


def evaluate_online(
    engine: Callable[[], AbstractContextManager[RolloutEngine]],
    tokenizer,
    data: Rows | None,
    fns: RewardFunctions | None,
    cfg: Any,
    device: torch.device,
    step: int,
    interaction: Any = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out evaluation inside an online trainer (GRPO, PPO), when one is due (an eval_file, and step 0, every
    eval_steps or the last step; else nothing): every rank scores its share of `data` through the trainer's
    rollout engine (`engine()`, with the policy's current weights); returns the `eval/...` metrics (what
    `alignrl eval` gives on the same model and file, with max_new_tokens = max_completion_length, pass@k at the
    sampling temperature) and every greedy completion as a sample row."""
    due = step == 0 or (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps
    if data is None or fns is None or not due:
        return {}, []
    a, b = dist.shard_bounds(len(data))
    with engine() as sampler:
        sums, samples = eval_sums(
            sampler, tokenizer, data.subset(range(a, b)), fns, max_new_tokens=cfg.max_completion_length,
            max_prompt_length=cfg.max_prompt_length, pass_k=cfg.eval_pass_k, temperature=cfg.temperature,
            device=device, seed=cfg.seed, first_index=a, interaction=interaction,
        )  # fmt: skip
    keys = sorted(set(dist.all_gather_objects(list(sums)))) if dist.is_dist() else list(sums)  # reward parts vary
    sums = {k: dist.all_reduce(sums.get(k, 0.0)) for k in keys}
    metrics = {f"eval/{k}": v for k, v in eval_metrics(sums, fns.names, cfg.eval_pass_k).items()}
    return metrics, dist.all_gather_objects(samples)


def eval_metrics(sums: dict[str, float], names: list[str], pass_k: int) -> dict[str, float]:
    """Means from `eval_sums` (NaN for a reward function that never applied)."""
    n = max(sums["prompts"], 1.0)
    out = {"reward": sums["reward"] / n, "accuracy": sums["solved"] / n}
    out["completion_length"] = sums["completion_length"] / n
    for name in names:
        count = sums[f"rewards/{name}/count"]
        out[f"rewards/{name}/mean"] = sums[f"rewards/{name}/sum"] / count if count else math.nan
    if pass_k >= 1:
        out[f"pass@{pass_k}"] = sums["pass_at_k"] / n
    for key in sums:
        if key.startswith(("episode/", "env/")):
            out[key.removesuffix("/sum")] = sums[key] / n
    return out


def _finite(x: float) -> float | None:
    """None for NaN (a function that never applied): JSON has no NaN."""
    return None if math.isnan(x) else x


def report(result: EvalResult, json_path: str | None = None) -> str:
    """The table printed on stdout (and the JSON file written when asked)."""
    rows = [("model", result.model), ("data", f"{result.data} ({result.prompts} prompts)"),
            ("mean reward (greedy)", f"{result.mean_reward:.4f}"),
            (f"accuracy (greedy, reward ≥ {result.threshold:g})", f"{result.accuracy:.1%}")]  # fmt: skip
    rows += [(f"  {name} (mean)", "n/a" if v is None else f"{v:.4f}") for name, v in result.per_function.items()]
    rows += [(f"  {name} (mean per episode)", f"{v:.4f}") for name, v in result.episodes.items()]
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
