"""GRPO and its variants (DAPO, Dr. GRPO, GSPO, RLOO): group-relative advantages, no critic.

One step: sample G completions for each of `prompts_per_step` prompts, score them, normalise rewards within
each group into advantages, then take `num_iterations` clipped policy-gradient updates on that batch.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from alignrl import checkpoint, rundir
from alignrl import distributed as dist
from alignrl.algos.advantages import ADVANTAGE_ESTIMATORS
from alignrl.algos.kl import kl_estimate
from alignrl.algos.policy_loss import aggregate_loss, clipped_policy_loss
from alignrl.algos.utils import masked_mean
from alignrl.config import TrainConfig
from alignrl.data import infinite_batches, load_rows, require_columns
from alignrl.errors import AlignRLError
from alignrl.evaluation import eval_set, evaluate_online
from alignrl.generation import Rollout, SamplingParams
from alignrl.models import adapter_disabled, is_peft
from alignrl.rewards import RewardFunctions, check_sampling_options
from alignrl.rollout import ScoredRollout, check_prompt_lengths, sample_and_score
from alignrl.trainers import loop


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO options on top of the shared ones (defaults follow TRL where it has the option)."""

    learning_rate: float = 1e-6
    prompts_per_step: int = 8  # distinct prompts per rollout batch
    num_generations: int = 8  # G: completions per prompt
    max_prompt_length: int = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_funcs: list[str] = field(default_factory=lambda: ["gsm8k"])
    reward_weights: list[float] | None = None
    reward_timeout: float = 600.0  # seconds one reward-function call may take before the run stops; 0: no limit
    advantage_estimator: Literal["grpo", "rloo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    importance_sampling: Literal["token", "sequence"] = "token"
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    num_iterations: int = 1  # policy updates per rollout batch
    micro_batch_size: int = 0  # > 0: sequences per forward/backward (overrides micro_batch_tokens); 0: by tokens
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample to refill
    dynamic_sampling_max_rounds: int = 4
    overlong_cache: int = 0  # > 0 adds DAPO's soft overlong penalty with this cache length
    log_completions: int = 4  # completions written to samples.jsonl every logging step
    # held-out evaluation (eval_file, every eval_steps and at the end): eval/... metrics, completions in samples.jsonl
    eval_reward_funcs: list[str] | None = None  # reward functions for evaluation; None: reward_funcs
    eval_pass_k: int = 0  # > 0: also pass@k from k samples per eval prompt at `temperature`

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise AlignRLError("num_generations: must be ≥ 2 (advantages are relative to the group)")
        if self.gradient_accumulation_steps != 1:
            raise AlignRLError(
                "gradient_accumulation_steps: GRPO splits batches by micro_batch_tokens / micro_batch_size instead"
            )
        if self.num_iterations < 1 or self.prompts_per_step < 1 or self.max_completion_length < 1:
            raise AlignRLError("num_iterations, prompts_per_step and max_completion_length must be ≥ 1")
        check_sampling_options(self)
        if self.micro_batch_size < 0:
            raise AlignRLError("micro_batch_size: must be ≥ 0 (0: split by micro_batch_tokens)")
        loop.check_token_budget(self, self.max_prompt_length + self.max_completion_length, "prompt + completion")
        if not 0 <= self.overlong_cache < self.max_completion_length:
            raise AlignRLError("overlong_cache: must be in [0, max_completion_length)")


def build_rewards(cfg: GRPOConfig, columns: set[str], data_name: str) -> RewardFunctions:
    """The configured reward functions plus, if asked, DAPO's soft overlong penalty (weight 1)."""
    fns = RewardFunctions(cfg.reward_funcs, cfg.reward_weights, columns, data_name, cfg.reward_timeout, cfg.max_steps)
    if cfg.overlong_cache > 0:
        from alignrl.rewards.math import overlong_penalty_factory

        fns.add("overlong_penalty", overlong_penalty_factory(cfg.max_completion_length, cfg.overlong_cache))
    return fns


def rollout_batch(
    policy, tok, data, stream, cfg: GRPOConfig, fns: RewardFunctions, device
) -> tuple[ScoredRollout, dict]:
    """Sample and score this rank's share of one batch (whole groups; everything in one process); with dynamic
    sampling keep only groups with reward spread, refilling. Each sample's sampling noise is keyed by (seed,
    batch number, index in the global batch), so the completions do not depend on how the batch is split."""
    params = SamplingParams(cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k, loop.autocast_dtype(cfg))
    G = cfg.num_generations
    kept: list[ScoredRollout] = []
    n_groups, dropped, rounds = 0, 0, 0
    while True:
        idx = next(stream)
        a, b = dist.shard_bounds(len(idx))
        base = (cfg.seed * 1_000_003 + getattr(stream, "consumed", rounds)) * 1_000_003
        with dist.full_params(policy) as model:
            scored = sample_and_score(
                model,
                tok,
                [data.rows[i] for i in idx[a:b]],
                [data.where(i) for i in idx[a:b]],
                fns,
                params,
                repeats=G,
                max_prompt_length=cfg.max_prompt_length,
                device=device,
                seeds=[base + j for j in range(a * G, b * G)],
            )
        rounds += 1
        if not cfg.dynamic_sampling:
            return scored, {}
        spread = scored.rewards.view(-1, G).std(dim=1) > 0
        dropped += int((~spread).sum())
        kept.append(_select_groups(scored, spread, G))
        n_groups += int(spread.sum())
        if n_groups >= cfg.prompts_per_step or rounds >= cfg.dynamic_sampling_max_rounds:
            break
    merged = _concat(kept, tok.pad_token_id)
    keep = min(n_groups, cfg.prompts_per_step) * G
    merged = _select_groups(merged, torch.arange(merged.rewards.numel() // G) < keep // G, G)
    return merged, {"dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/rounds": rounds}


def _select_groups(s: ScoredRollout, keep_group: torch.Tensor, G: int) -> ScoredRollout:
    keep = keep_group.repeat_interleave(G)
    r = s.rollout
    ki = keep.nonzero().squeeze(-1).tolist()
    sub = Rollout(
        *(
            t[keep.to(t.device)]
            for t in (
                r.prompt_ids,
                r.prompt_mask,
                r.completion_ids,
                r.completion_mask,
                r.logprobs,
                r.truncated,
            )
        )
    )
    return ScoredRollout(
        sub,
        [s.prompts[i] for i in ki],
        [s.completions[i] for i in ki],
        s.raw_rewards[keep],
        s.rewards[keep.to(s.rewards.device)],
    )


def _pad_to(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def _concat(parts: list[ScoredRollout], pad_id: int) -> ScoredRollout:
    P = max(p.rollout.prompt_ids.shape[1] for p in parts)
    C = max(p.rollout.completion_ids.shape[1] for p in parts)
    cat = lambda f, w, v, left: torch.cat([_pad_to(getattr(p.rollout, f), w, v, left) for p in parts])  # noqa: E731
    ro = Rollout(
        cat("prompt_ids", P, pad_id, True),
        cat("prompt_mask", P, 0, True),
        cat("completion_ids", C, pad_id, False),
        cat("completion_mask", C, 0, False),
        cat("logprobs", C, 0.0, False),
        torch.cat([p.rollout.truncated for p in parts]),
    )
    return ScoredRollout(
        ro,
        sum((p.prompts for p in parts), []),
        sum((p.completions for p in parts), []),
        torch.cat([p.raw_rewards for p in parts]),
        torch.cat([p.rewards for p in parts]),
    )


@rundir.releases_output_dir
def train(cfg: GRPOConfig) -> Path:
    """Run GRPO; returns the final model directory."""
    run = loop.start_run(cfg)
    model, tok = loop.load_policy(cfg, run.device, rl=True)
    policy = loop.wrap_policy(run, model)  # DDP / FSDP under torchrun; log-probs go through it
    if dist.world_size() > 1 and (cfg.dynamic_sampling or cfg.prompts_per_step % dist.world_size()):
        raise AlignRLError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the {dist.world_size()} processes, "
            "and dynamic_sampling is not supported in multi-process runs yet"
        )
    data = load_rows(cfg.train_file)
    require_columns(data, ["prompt"])
    check_prompt_lengths(data, tok, cfg.max_prompt_length, cfg.max_completion_length, model)
    fns = build_rewards(cfg, set(data.rows[0]), cfg.train_file)
    eval_data, eval_fns = eval_set(cfg)
    ref = None
    if cfg.beta > 0 and not is_peft(model):
        ref = loop.load_reference(run, cfg.model)
    opt = loop.build_optimizer(model, cfg)
    sched = loop.build_scheduler(opt, cfg, cfg.max_steps * cfg.num_iterations)
    stream = checkpoint.ReplayStream(lambda: infinite_batches(len(data), cfg.prompts_per_step, random.Random(cfg.seed)))
    first = run.register(model, tok, optimizer=opt, scheduler=sched, data=stream)
    G = cfg.num_generations
    if first == 1:  # the starting policy, before any update
        evaluated, eval_samples = evaluate_online(policy, tok, eval_data, eval_fns, cfg, run.device, 0)
        if evaluated:
            run.metrics.log(0, evaluated)
            run.metrics.samples(0, eval_samples)
    for step in range(first, cfg.max_steps + 1):
        timer = loop.Timer()
        loop.release_freed_memory()  # the last update's activations and gradients, before the KV cache
        fns.start_step(step - 1, cfg.max_steps)  # trainer_state: updates done so far (as TRL); this step's counts
        with timer("generation"):
            scored, ds_metrics = rollout_batch(policy, tok, data, stream, cfg, fns, run.device)
        loop.check_reward_signal(run, fns)
        ro = scored.rollout
        if ro.completion_ids.shape[0] == 0:  # dynamic sampling found no informative group
            run.metrics.log(step, {**ds_metrics, "skipped_step": 1.0})
            run.end_step(step)
            continue
        # advantages from the global batch's rewards (batch-level scaling needs all of them), then this rank's part
        rewards_all = dist.all_gather(scored.rewards)
        adv_all = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator](rewards_all, G, cfg.scale_rewards, 1e-4)
        first_local = dist.shard_bounds(adv_all.numel(), G)[0]
        adv = adv_all[first_local : first_local + scored.rewards.numel()]
        mask = ro.completion_mask.float()
        if cfg.mask_truncated_completions:
            mask = mask * (~ro.truncated).float()[:, None]
        P = ro.prompt_ids.shape[1]
        ids, attn = ro.input_ids, ro.attention_mask
        n = ids.shape[0]
        # micro-batches of similar-length sequences, each run only as wide as its longest (logprobs.needed_span);
        # the loss normalisers are global, so how the batch is split does not change the update
        lengths = P + ro.completion_mask.sum(1)
        micro = loop.rollout_micro_batches(torch.arange(n, device=ids.device), lengths, cfg)
        ref_logp = None
        if cfg.beta > 0:
            with timer("reference"), torch.no_grad(), loop.autocast(cfg, run.device):
                ctx = adapter_disabled(model) if ref is None else contextlib.nullcontext()
                with ctx:
                    ref_logp = torch.zeros(ro.completion_mask.shape, device=ids.device)
                    for sel, w in micro:
                        logp = dist.logprobs(
                            ref or policy,
                            ids[sel],
                            attn[sel],
                            ro.completion_mask[sel],
                            start=P,
                            temperature=cfg.temperature,
                            chunk_tokens=cfg.logprob_chunk_tokens,
                        )[0]
                        if w:
                            ref_logp[sel] = logp
        # global normalisers, so that summing micro-batch losses equals the full-batch loss
        norms = {
            "num_tokens": dist.all_reduce(mask.sum()).clamp(min=1),
            "num_seqs": dist.all_reduce(n),
            "max_completion_length": cfg.max_completion_length,
        }
        stats: dict[str, list[float]] = {}
        with timer("update"):
            for it in range(cfg.num_iterations):
                loss_total = 0.0
                for j, (sel, w) in enumerate(micro):
                    last = j == len(micro) - 1
                    m = mask[sel]
                    # DDP reads the sync flag in forward, FSDP in backward: both run inside grad_sync
                    with dist.grad_sync(policy, last), loop.autocast(cfg, run.device):
                        logp, ent = dist.logprobs(
                            policy,
                            ids[sel],
                            attn[sel],
                            ro.completion_mask[sel],
                            start=P,
                            temperature=cfg.temperature,
                            with_entropy=it == 0,
                            chunk_tokens=cfg.logprob_chunk_tokens,
                        )
                    per_tok, st = clipped_policy_loss(
                        logp,
                        ro.logprobs[sel],
                        adv[sel],
                        m,
                        eps_low=cfg.epsilon_low,
                        eps_high=cfg.epsilon_high,
                        importance_sampling=cfg.importance_sampling,
                    )
                    if ref_logp is not None:
                        kl = kl_estimate(logp, ref_logp[sel], cfg.kl_estimator)
                        per_tok = per_tok + cfg.beta * kl
                        if w:
                            _add(stats, "kl", masked_mean(kl.detach(), m), m.sum())
                    loss = aggregate_loss(per_tok, m, cfg.loss_aggregation, **norms)
                    with dist.grad_sync(policy, last):  # synchronise once, on the last micro-batch
                        (loss * (w * dist.grad_scale())).backward()
                    if not w:
                        continue
                    loss_total += float(loss.detach())
                    for k in ("is_low_clipped", "is_high_clipped", "is_clipped"):
                        _add(stats, f"clip/{k[3:]}", masked_mean(st[k], m), m.sum())
                    if ent is not None:
                        _add(
                            stats,
                            "entropy",
                            masked_mean(ent, ro.completion_mask[sel].float()),
                            ro.completion_mask[sel].sum(),
                        )
                upd = loop.optimizer_step(model, opt, sched, cfg, loss=dist.all_reduce(loss_total), run=run)
        stats = {k: [dist.all_reduce(s), dist.all_reduce(w)] for k, (s, w) in stats.items()}
        metrics = _step_metrics(scored, fns, adv_all, stats, dist.all_reduce(loss_total), upd, timer, G)
        metrics.update(ds_metrics)
        extras = loop.add_reward_logs(metrics, fns, len(scored.completions))
        evaluated, eval_samples = evaluate_online(policy, tok, eval_data, eval_fns, cfg, run.device, step)
        metrics.update(evaluated)
        if step % cfg.logging_steps == 0 or evaluated:
            run.metrics.log(step, metrics)
            run.metrics.samples(
                step,
                [
                    {
                        "prompt": scored.prompts[i],
                        "completion": scored.completions[i],
                        "reward": float(scored.rewards[i]),
                        **extras[i],
                    }
                    for i in range(min(cfg.log_completions, len(scored.completions)))
                ]
                + eval_samples,
            )
        run.end_step(step)
    return loop.finish(run, model, tok)


def _add(stats: dict[str, list[float]], key: str, value: torch.Tensor, weight) -> None:
    """Token-weighted running statistic: [sum of value*weight, sum of weight]."""
    w = float(weight)
    acc = stats.setdefault(key, [0.0, 0.0])
    acc[0] += float(value) * w
    acc[1] += w


def _step_metrics(
    scored: ScoredRollout, fns: RewardFunctions, adv, stats, loss, upd, timer, G
) -> dict[str, float]:
    """Step metrics over the global batch (gathered from every rank; `adv` is already global)."""
    ro = scored.rollout
    lengths = dist.all_gather(ro.completion_mask.sum(-1).float())
    truncated = dist.all_gather(ro.truncated.float())
    scored = ScoredRollout(ro, [], [], dist.all_gather(scored.raw_rewards), dist.all_gather(scored.rewards))
    m: dict[str, float] = {
        "loss": loss,
        "reward": float(scored.rewards.mean()),
        "reward_std": float(scored.rewards.std()) if scored.rewards.numel() > 1 else 0.0,
    }
    # samples for which every reward function returned None/NaN (their combined reward is 0)
    m["rewards/none_applicable"] = float(scored.raw_rewards.isnan().all(dim=1).sum())
    for j, name in enumerate(fns.names):
        col = scored.raw_rewards[:, j]
        m[f"rewards/{name}/mean"] = float(col.nanmean())
        valid = col[~col.isnan()]
        m[f"rewards/{name}/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
    groups = scored.rewards.view(-1, G)
    m["frac_reward_zero_std"] = float((groups.std(dim=1) == 0).float().mean())
    m["advantages/mean"] = float(adv.mean())
    m["advantages/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
    m["advantages/abs_mean"] = float(adv.abs().mean())
    m["completion_length/mean"] = float(lengths.mean())
    m["completion_length/max"] = float(lengths.max())
    m["truncation_rate"] = float(truncated.mean())
    for k, (s, w) in stats.items():
        m[k] = s / w if w else 0.0
    m.update(upd)
    m.update({f"time/{k}": v for k, v in timer.t.items()})
    m["step_time"] = sum(timer.t.values())
    return m
