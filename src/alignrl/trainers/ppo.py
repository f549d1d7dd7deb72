"""PPO for RLHF: actor–critic with the KL to a frozen reference folded into a per-token reward.

One step: sample completions for `prompts_per_step` prompts, score them (reward model and/or reward
functions, minus `missing_eos_penalty` for completions without EOS), build per-token rewards
r_t = −β·kl_t plus the score at the last token, compute GAE advantages and returns with the critic's values,
whiten the advantages, then run `num_ppo_epochs` passes over `num_mini_batches` shuffled minibatches of
clipped policy loss + vf_coef · clipped value loss. β is fixed or adapted toward a target KL (Ziegler et al.).
The recipe follows "The N Implementation Details of RLHF with PPO" (shared/ALGORITHMS.md, section PPO).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from alignrl import checkpoint, rundir
from alignrl import distributed as dist
from alignrl.algos.advantages import gae
from alignrl.algos.kl import kl_estimate
from alignrl.algos.kl_control import AdaptiveKLController, FixedKLController
from alignrl.algos.policy_loss import approx_kl_stats, clipped_policy_loss, clipped_value_loss
from alignrl.algos.utils import masked_mean, masked_sum, whiten
from alignrl.config import TrainConfig
from alignrl.data import infinite_batches, load_rows, require_columns
from alignrl.errors import AlignRLError
from alignrl.evaluation import eval_set, evaluate_online
from alignrl.generation import SamplingParams
from alignrl.models import adapter_disabled, enable_activation_checkpointing, is_peft, unwrap
from alignrl.rewards import RewardFunctions, check_sampling_options
from alignrl.rollout import check_prompt_lengths, sample_and_score
from alignrl.trainers import loop
from alignrl.value_model import (
    ValueHead,
    ValueModel,
    captured_hidden,
    is_reward_model_dir,
    load_value_model,
    shared_values,
    token_values,
    values_from_logprob_pass,
)


@dataclass
class PPOConfig(TrainConfig):
    """PPO options on top of the shared ones (names follow TRL's PPOConfig where it has the option)."""

    learning_rate: float = 3e-6
    adam_epsilon: float = 1e-5
    # rollout
    prompts_per_step: int = 16  # distinct prompts per rollout batch
    num_generations: int = 1  # completions sampled per prompt
    max_prompt_length: int = 512
    max_completion_length: int = 64
    temperature: float = 0.7  # sampling temperature; log-probs use logits / temperature
    top_p: float = 1.0
    top_k: int = 0
    # scoring: reward-model directories and/or reward functions, as in GRPO, weighted and summed
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    reward_timeout: float = 600.0  # seconds one reward-function (or reward-model) call may take; 0: no limit
    missing_eos_penalty: float | None = None  # subtracted from the score of completions without EOS
    # critic
    critic: Literal["separate", "shared"] = "separate"  # separate value model, or a head on the policy's trunk
    value_model: str | None = None  # critic init (separate): default = first reward-model dir in reward_funcs,
    # else the policy; a reward model keeps its score head, a causal LM gets a zero-initialised head
    save_value_model: bool = True  # write the trained critic to OUTPUT_DIR/value_model (or value_head.pt)
    # KL penalty in the reward
    kl_coef: float = 0.05  # β, the initial value when adaptive_kl
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False  # Ziegler et al. proportional controller toward kl_target
    kl_target: float = 6.0  # target KL (nats per sequence, the sum over completion tokens)
    kl_horizon: float = 10000.0  # controller horizon in samples
    whiten_rewards: bool = False  # whiten per-token rewards over valid tokens (mean kept)
    # advantages
    gamma: float = 1.0
    lam: float = 0.95
    # updates
    num_ppo_epochs: int = 4  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per pass (the batch is split into this many shuffled parts)
    micro_batch_size: int = 0  # > 0: sequences per forward/backward (overrides micro_batch_tokens); 0: by tokens
    cliprange: float = 0.2  # ε of the clipped policy loss
    cliprange_value: float = 0.2  # c_v of the clipped value loss
    dual_clip: float | None = None  # c > 1 caps the loss of negative-advantage tokens (typically 3)
    vf_coef: float = 0.1  # weight of the value loss
    log_completions: int = 4  # completions written to samples.jsonl every logging step
    # held-out evaluation (eval_file, every eval_steps and at the end): eval/... metrics, completions in samples.jsonl
    eval_reward_funcs: list[str] | None = None  # reward functions for evaluation; None: reward_funcs
    eval_pass_k: int = 0  # > 0: also pass@k from k samples per eval prompt at `temperature`

    RESUME_FIXED: ClassVar[tuple[str, ...]] = (*TrainConfig.RESUME_FIXED, "critic", "value_model")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations

    def validate(self) -> None:
        super().validate()
        if not self.reward_funcs:
            raise AlignRLError("reward_funcs: give at least one reward model directory or reward function")
        if self.gradient_accumulation_steps != 1:
            raise AlignRLError(
                "gradient_accumulation_steps: PPO splits minibatches by micro_batch_tokens / micro_batch_size instead"
            )
        for name in ("prompts_per_step", "num_generations", "max_completion_length", "num_ppo_epochs",
                     "num_mini_batches", "max_prompt_length"):  # fmt: skip
            if getattr(self, name) < 1:
                raise AlignRLError(f"{name}: must be ≥ 1")
        if self.micro_batch_size < 0:
            raise AlignRLError("micro_batch_size: must be ≥ 0 (0: split by micro_batch_tokens)")
        loop.check_token_budget(self, self.max_prompt_length + self.max_completion_length, "prompt + completion")
        if self.batch_size % self.num_mini_batches:
            raise AlignRLError(
                f"num_mini_batches: {self.num_mini_batches} does not divide the batch of "
                f"prompts_per_step × num_generations = {self.batch_size} sequences"
            )
        check_sampling_options(self)
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise AlignRLError("gamma must be in (0, 1] and lam in [0, 1]")
        if self.kl_coef < 0 or self.cliprange < 0 or self.cliprange_value < 0 or self.vf_coef < 0:
            raise AlignRLError("kl_coef, cliprange, cliprange_value and vf_coef must be ≥ 0")
        if self.adaptive_kl and (self.kl_coef <= 0 or self.kl_target <= 0 or self.kl_horizon <= 0):
            raise AlignRLError("adaptive_kl: needs kl_coef, kl_target and kl_horizon > 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise AlignRLError(f"dual_clip: must be > 1 (typically 3), got {self.dual_clip}")
        if self.critic == "shared" and self.value_model:
            raise AlignRLError("value_model: only used with critic=separate (critic=shared is a head on the policy)")


# ----------------------------------------------------------------------------- the PPO math of one batch


def kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    """The β controller (its state_dict() is what a checkpoint needs)."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −β·kl_t on valid tokens, plus the sequence score at each sequence's last valid token; [B, T]."""
    m = mask.to(kl.dtype)
    rewards = -kl_coef * torch.where(m > 0, kl, torch.zeros_like(kl))
    last = (m.sum(-1).long() - 1).clamp(min=0)
    has_tokens = (m.sum(-1) > 0).to(rewards.dtype)
    return rewards.scatter_add(1, last[:, None], (scores.to(rewards.dtype) * has_tokens)[:, None])


def advantages_and_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cfg: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional reward whitening, GAE(γ, λ), returns = A + V (before whitening), then whitened advantages."""
    if cfg.whiten_rewards:
        rewards = global_whiten(rewards, mask, shift_mean=False) * mask
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return global_whiten(adv, mask) * mask, returns


def global_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and biased variance over the valid entries of every rank's part (all-reduced sums)."""
    n = dist.all_reduce(mask.to(x.dtype).sum()).clamp(min=torch.finfo(x.dtype).tiny)
    mean = dist.all_reduce(masked_sum(x, mask)) / n
    return mean, dist.all_reduce(masked_sum((x - mean) ** 2, mask)) / n


def global_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`whiten` with the mean and variance of the global batch (all ranks); `whiten` itself in one process."""
    if not dist.is_dist():
        return whiten(x, mask, shift_mean, eps)
    mean, var = global_mean_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig,
    num_tokens: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Σ L_pg + vf_coef · Σ L_v) / num_tokens over valid tokens, and detached masked-mean statistics.

    `num_tokens` is the minibatch's valid-token count, so summing the losses of its micro-batches gives the
    minibatch's token-mean loss.
    """
    pg, st = clipped_policy_loss(
        logp, old_logp, advantages, mask, cfg.cliprange, cfg.cliprange, dual_clip=cfg.dual_clip
    )
    vl, vclip = clipped_value_loss(values, old_values, returns, mask, cfg.cliprange_value)
    loss = (masked_sum(pg, mask) + cfg.vf_coef * masked_sum(vl, mask)) / num_tokens
    ratio = st["ratio"]
    stats = {
        "policy_loss": masked_mean(pg.detach(), mask),
        "value_loss": masked_mean(vl.detach(), mask),
        "clipfrac": masked_mean(st["is_clipped"], mask),
        "dual_clipfrac": masked_mean(st["is_dual_clipped"], mask),
        "value_clipfrac": masked_mean(vclip, mask),
        "ratio": masked_mean(ratio, mask),
        **approx_kl_stats(logp.detach(), old_logp, mask),
    }
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over valid tokens (of all ranks)."""
    var_r = global_mean_var(returns, mask)[1]
    return float(1 - global_mean_var(returns - values, mask)[1] / var_r) if var_r > 0 else 0.0


# ----------------------------------------------------------------------------- the loop


class Critic:
    """Values for the states before completion tokens, from a separate value model or a head on the policy.

    `wrapped` is the module the trainer computes with: the value model inside a `ForwardFn` of `token_values`
    (or the shared head), DDP- or FSDP2-wrapped under torchrun like the policy; `module` is the plain one."""

    def __init__(self, cfg: PPOConfig, policy: nn.Module, device: torch.device):
        self.value_model: ValueModel | None = None
        self.head: ValueHead | None = None
        if cfg.critic == "shared":
            lm = unwrap(policy)
            self.head = ValueHead(lm.config.hidden_size, lm.dtype).to(device)
            self.source = "shared policy trunk, zero-initialised head"
        else:
            path = cfg.value_model or next((f for f in cfg.reward_funcs if is_reward_model_dir(f)), cfg.model)
            self.value_model = load_value_model(path, cfg.dtype, device)
            if cfg.gradient_checkpointing:
                enable_activation_checkpointing(self.value_model.model)
            self.source = path
        self.wrapped: nn.Module = self.module

    @property
    def module(self) -> nn.Module:
        return self.value_model if self.value_model is not None else self.head  # type: ignore[return-value]

    def wrap(self, mode: str, device: torch.device) -> None:
        """DDP / FSDP2 under torchrun (before the optimiser is built); nothing in one process."""
        if not dist.is_dist():
            return
        if self.head is not None:  # (not under fsdp: train() refuses critic=shared there)
            self.wrapped = dist.wrap_model(self.head, mode, device)
        else:
            self.wrapped = dist.wrap_model(dist.ForwardFn(self.module, token_values), mode, device)

    def values(self, policy: nn.Module, ids: torch.Tensor, attn: torch.Tensor, start: int, mask: torch.Tensor):
        """Values [B, L - start]; positions after the last one `mask` marks may be 0 (the value model runs only the
        columns the mask needs)."""
        if self.value_model is not None:
            return dist.call(self.wrapped, token_values, ids, attn, start=start, target_mask=mask)
        # shared: only without gradients (rollout values); the update reads the head off the log-prob forward
        return shared_values(dist.inner(policy), self.head, ids, attn, start=start)  # type: ignore[arg-type]

    def save(self, out: Path, tokenizer) -> None:
        """The trained critic (rank 0 writes; every rank calls)."""
        from alignrl.models import atomic_dir

        if self.value_model is None:
            if dist.is_main():
                torch.save(self.module.state_dict(), out / "value_head.pt")
            dist.barrier()
            return
        sd = dist.full_state_dict(self.wrapped)  # FSDP: gathered; keys of the ValueModel
        if dist.is_main():
            hf = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
            with atomic_dir(out / "value_model") as tmp:
                self.value_model.model.save_pretrained(tmp, state_dict=hf, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        dist.barrier()


@rundir.releases_output_dir
def train(cfg: PPOConfig) -> Path:
    """Run PPO; returns the final policy directory (the critic is saved next to it)."""
    if dist.env_world_size() > 1 and cfg.distributed == "fsdp" and cfg.critic == "shared":
        raise AlignRLError("critic=shared with distributed=fsdp is not supported; use critic=separate or ddp")
    run = loop.start_run(cfg)
    model, tok = loop.load_policy(cfg, run.device, rl=True)
    policy = loop.wrap_policy(run, model)  # DDP / FSDP under torchrun; log-probs go through it
    if dist.world_size() > 1 and cfg.prompts_per_step % dist.world_size():
        raise AlignRLError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the {dist.world_size()} processes"
        )
    data = load_rows(cfg.train_file)
    require_columns(data, ["prompt"])
    check_prompt_lengths(data, tok, cfg.max_prompt_length, cfg.max_completion_length, model)
    fns = RewardFunctions(
        cfg.reward_funcs, cfg.reward_weights, set(data.rows[0]), cfg.train_file, cfg.reward_timeout, cfg.max_steps
    )
    eval_data, eval_fns = eval_set(cfg)
    ref = None
    if not is_peft(model):
        ref = loop.load_reference(run, cfg.model)
    critic = Critic(cfg, model, run.device)
    critic.wrap(cfg.distributed, run.device)
    kl_ctl = kl_controller(cfg)
    run.extra.update(critic=critic, kl_controller=kl_ctl)  # what a checkpoint needs beyond the policy
    params = nn.ModuleList([model, critic.module])  # one optimiser and one gradient-norm clip for both
    opt = loop.build_optimizer(params, cfg)  # after wrapping, before any forward (FSDP)
    sched = loop.build_scheduler(opt, cfg, cfg.max_steps * cfg.num_ppo_epochs * cfg.num_mini_batches)
    stream = checkpoint.ReplayStream(lambda: infinite_batches(len(data), cfg.prompts_per_step, random.Random(cfg.seed)))
    first = run.register(model, tok, optimizer=opt, scheduler=sched, data=stream, critic=critic.module, kl_ctl=kl_ctl)
    sampling = SamplingParams(
        cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k, loop.autocast_dtype(cfg)
    )
    G, N = cfg.num_generations, cfg.batch_size
    if first == 1:  # the starting policy, before any update
        evaluated, eval_samples = evaluate_online(policy, tok, eval_data, eval_fns, cfg, run.device, 0)
        if evaluated:
            run.metrics.log(0, evaluated)
            run.metrics.samples(0, eval_samples)
    for step in range(first, cfg.max_steps + 1):
        timer = loop.Timer()
        idx = next(stream)
        a, b = dist.shard_bounds(len(idx))  # this rank's prompts; sampling keyed by the index in the global batch
        base = (cfg.seed * 1_000_003 + getattr(stream, "consumed", step)) * 1_000_003
        loop.release_freed_memory()  # the last update's activations and gradients, before the KV cache
        fns.start_step(step - 1, cfg.max_steps)  # trainer_state: updates done so far (as TRL); this step's counts
        with timer("generation"), dist.full_params(policy) as lm:
            scored = sample_and_score(
                lm, tok, [data.rows[i] for i in idx[a:b]], [data.where(i) for i in idx[a:b]], fns, sampling,
                repeats=G, max_prompt_length=cfg.max_prompt_length, device=run.device,
                seeds=[base + j for j in range(a * G, b * G)],
            )  # fmt: skip
        loop.check_reward_signal(run, fns)
        ro = scored.rollout
        ids, attn, P = ro.input_ids, ro.attention_mask, ro.prompt_ids.shape[1]
        mask = ro.completion_mask.float()
        old_logp = ro.logprobs  # from the sampling forward (temperature-scaled), = π_old
        scores = scored.rewards.float()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * ro.truncated.float()
        micro = loop.rollout_micro_batches(torch.arange(len(ids), device=ids.device), P + mask.sum(1), cfg)
        ref_logp, old_values = torch.zeros_like(mask), torch.zeros_like(mask)
        with torch.no_grad(), loop.autocast(cfg, run.device):
            with timer("reference"), adapter_disabled(model) if ref is None else contextlib.nullcontext():
                for sel, w in micro:
                    logp, _ = dist.logprobs(
                        ref or policy, ids[sel], attn[sel], ro.completion_mask[sel], start=P,
                        temperature=cfg.temperature, chunk_tokens=cfg.logprob_chunk_tokens,
                    )  # fmt: skip
                    if w:
                        ref_logp[sel] = logp
            with timer("values"):
                for sel, w in micro:
                    values = critic.values(policy, ids[sel], attn[sel], P, mask[sel]) * mask[sel]
                    if w:
                        old_values[sel] = values
        kl = kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask
        beta = kl_ctl.value
        rewards = token_rewards(scores, kl, mask, beta)
        adv, returns = advantages_and_returns(rewards, old_values, mask, cfg)
        batch = PPOBatch(ids, attn, P, mask, old_logp, old_values, adv, returns)
        with timer("update"):
            stats = ppo_update(policy, critic, params, opt, sched, cfg, batch, run.device, run=run, seed=base)
        kl_seq = kl.sum(-1)
        kl_ctl.update(dist.all_reduce(float(kl_seq.sum())) / N, N)  # the global batch's mean KL

        def total(x: torch.Tensor) -> float:  # Σ over the global batch
            return dist.all_reduce(float(x.sum()))

        score_sum, nonscore_sum = total(scores), total(-beta * kl)
        metrics = {
            "objective/scores": score_sum / N,
            "objective/non_score_reward": nonscore_sum / N,
            "objective/rlhf_reward": (score_sum + nonscore_sum) / N,
            "objective/kl": total((old_logp - ref_logp) * mask) / N,
            "objective/kl_k3": total(kl_estimate(old_logp, ref_logp, "k3") * mask) / N,
            "objective/entropy": stats.pop("entropy", 0.0),
            "kl_coef": beta,
            "reward": total(scored.rewards) / N,
            **_reward_columns(dist.all_gather(scored.raw_rewards), fns),
            **_mean_std("advantages", adv, mask),
            **_mean_std("returns", returns, mask),
            "values/mean": float(global_mean_var(old_values, mask)[0]),
            "val/explained_variance": explained_variance(old_values, returns, mask),
            "completion_length/mean": total(mask) / N,
            "eos_rate": 1 - total(ro.truncated.float()) / N,
            **stats,
            "step_time": sum(timer.t.values()),
            **{f"time/{k}": v for k, v in timer.t.items()},
        }
        extras = loop.add_reward_logs(metrics, fns, len(scored.completions))
        evaluated, eval_samples = evaluate_online(policy, tok, eval_data, eval_fns, cfg, run.device, step)
        metrics.update(evaluated)
        if step % cfg.logging_steps == 0 or evaluated:
            run.metrics.log(step, metrics)
            n = min(cfg.log_completions, len(scored.completions))
            run.metrics.samples(step, [
                {"prompt": scored.prompts[i], "completion": scored.completions[i], "score": float(scores[i]),
                 **extras[i]}
                for i in range(n)
            ] + eval_samples)  # fmt: skip
        run.end_step(step)
    if cfg.save_value_model:
        critic.save(run.out, tok)
    return loop.finish(run, model, tok)


def _mean_std(name: str, x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    mean, var = global_mean_var(x, mask)
    return {f"{name}/mean": float(mean), f"{name}/std": float(var.sqrt())}


@dataclass
class PPOBatch:
    """One rollout batch, ready for the updates (token tensors are [B, C] over completion tokens); under torchrun
    this rank's contiguous part of the global batch."""

    input_ids: torch.Tensor  # [B, P + C] prompt + completion
    attention_mask: torch.Tensor
    prompt_len: int  # P: completion tokens start here
    mask: torch.Tensor  # completion mask (float)
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor


def ppo_update(
    policy: nn.Module,
    critic: Critic,
    params: nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    cfg: PPOConfig,
    b: PPOBatch,
    device: torch.device,
    run: loop.Run | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """num_ppo_epochs passes of num_mini_batches shuffled minibatches; returns token-weighted mean stats.

    The shuffles are permutations of the GLOBAL batch, the same on every rank (a generator keyed by `seed` and the
    epoch); each rank runs its own rows of each minibatch and normalises by the minibatch's global token count,
    so N ranks make the single-process update. Micro-batches (micro_batch_tokens / micro_batch_size) are per rank."""
    ids, attn, P, mask = b.input_ids, b.attention_mask, b.prompt_len, b.mask
    n = ids.shape[0]
    N = cfg.batch_size if dist.is_dist() else n
    lo = dist.shard_bounds(N, cfg.num_generations)[0] if dist.is_dist() else 0
    mb = N // cfg.num_mini_batches
    sums: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    upd: dict[str, float] = {}
    model = dist.inner(policy)
    for epoch in range(cfg.num_ppo_epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for k in range(cfg.num_mini_batches):
            glob = order[k * mb : (k + 1) * mb]
            local = (glob[(glob >= lo) & (glob < lo + n)] - lo).to(ids.device)  # this rank's rows of it
            n_tok = dist.all_reduce(mask[local].sum()).clamp(min=1)
            micro = loop.rollout_micro_batches(local, P + mask[local].sum(1), cfg)
            for j, (sel, weight) in enumerate(micro):
                m = mask[sel]
                last = j == len(micro) - 1
                with dist.grad_sync(policy, last), dist.grad_sync(critic.wrapped, last):
                    with loop.autocast(cfg, device), captured_hidden(model) as hidden:
                        logp, ent = dist.logprobs(
                            policy, ids[sel], attn[sel], m, start=P, temperature=cfg.temperature,
                            with_entropy=epoch == 0, chunk_tokens=cfg.logprob_chunk_tokens,
                        )  # fmt: skip
                        if critic.head is not None:  # reuse the trunk pass the log-probs just made
                            values = values_from_logprob_pass(critic.wrapped, hidden[-1], attn[sel], m, start=P)
                        else:
                            values = critic.values(policy, ids[sel], attn[sel], P, m)
                    loss, st = ppo_loss(
                        logp, b.old_logp[sel], values, b.old_values[sel], b.advantages[sel], b.returns[sel], m,
                        cfg, n_tok,
                    )  # fmt: skip
                    (loss * (weight * dist.grad_scale())).backward()
                w = float(m.sum()) * weight
                if ent is not None:
                    st["entropy"] = masked_mean(ent, m)
                if epoch == 0 and k == 0 and j == 0:  # sanity: nothing has changed yet, so ρ = 1
                    first = {f"policy/first_minibatch_{x}": float(st[x]) for x in ("ratio", "approx_kl_k1",
                                                                                   "clipfrac")}  # fmt: skip
                for key, v in st.items():
                    acc = sums.setdefault(key, [0.0, 0.0])
                    acc[0] += float(v) * w
                    acc[1] += w
            upd = loop.optimizer_step(params, opt, sched, cfg, run=run)  # counts non-finite skips
    sums = {k: [dist.all_reduce(s), dist.all_reduce(w)] for k, (s, w) in sorted(sums.items())}
    avg = {k: s / w if w else 0.0 for k, (s, w) in sums.items()}
    return {
        "loss/policy_avg": avg["policy_loss"],
        "loss/value_avg": avg["value_loss"],
        "policy/approxkl_avg": avg["approx_kl_k1"],
        "policy/approxkl_k3_avg": avg["approx_kl_k3"],
        "policy/clipfrac_avg": avg["clipfrac"],
        "policy/dual_clipfrac_avg": avg["dual_clipfrac"],
        "val/clipfrac_avg": avg["value_clipfrac"],
        "val/ratio": avg["ratio"],
        "entropy": avg.get("entropy", 0.0),
        **first,
        **upd,
    }


def _reward_columns(raw: torch.Tensor, fns: RewardFunctions) -> dict[str, float]:
    return {f"rewards/{name}/mean": float(raw[:, j].nanmean()) for j, name in enumerate(fns.names)}
