"""The online-RL driver: sample → score → advantages → loss → optimiser step → evaluate / log / checkpoint.

An online algorithm is a small module: an `OnlineConfig` subclass with its options and an `OnlineAlgorithm`
subclass with its advantages (`prepare`) and its loss on a micro-batch (`loss`). Everything else happens here,
once: the models, sampling, the reference (or teacher) pass, micro-batches, gradient synchronisation, optimiser
steps, metrics, evaluation and checkpoints. Under torchrun each process holds whole groups of the batch; a
`RolloutBatch` carries what the math needs from the other processes (`global_sum`, `num_seqs`, `offset`), so an
algorithm's code reads as single-process code.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from alignrl import checkpoint
from alignrl import distributed as dist
from alignrl.algos.rollout_correction import ROLLOUT_CORRECTIONS, mismatch_metrics
from alignrl.algos.utils import masked_mean, masked_moments, masked_sum
from alignrl.config import TrainConfig
from alignrl.data import Rows, infinite_batches, load_rows, require_columns
from alignrl.episodes import (
    DEFAULT_MAX_TURNS,
    Interaction,
    build_interaction,
    episode_budget,
    reward_functions,
    warn_positions,
)
from alignrl.errors import AlignRLError
from alignrl.evaluation import eval_set, evaluate_online
from alignrl.generation import SamplingParams
from alignrl.logprobs import token_logprobs
from alignrl.models import adapter_disabled, is_peft, merged_weights
from alignrl.rewards import RewardFunctions, check_sampling_options
from alignrl.rollout import NativeEngine, RolloutEngine, ScoredRollout, check_prompt_lengths, sample_and_score
from alignrl.trainers import loop


@dataclass
class OnlineConfig(TrainConfig):
    """Options every online algorithm shares: sampling, scoring, micro-batches, logging and evaluation."""

    prompts_per_step: int = 8  # distinct prompts per rollout batch
    num_generations: int = 8  # completions sampled per prompt (a group)
    max_prompt_length: int = 512
    max_completion_length: int = 256
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature
    top_p: float = 1.0
    top_k: int = 0
    # built-ins, module:fn, file.py:fn, RM dirs; None: gsm8k, or none with an environment (its reward counts)
    reward_funcs: list[str] | None = None
    reward_weights: list[float] | None = None
    reward_timeout: float = 600.0  # seconds one reward-function call may take before the run stops; 0: no limit
    micro_batch_size: int = 0  # > 0: sequences per forward/backward (overrides micro_batch_tokens); 0: by tokens
    log_completions: int = 4  # completions written to samples.jsonl every logging step
    # held-out evaluation (eval_file, every eval_steps and at the end): eval/... metrics, completions in samples.jsonl
    eval_reward_funcs: list[str] | None = None  # reward functions for evaluation; None: reward_funcs
    eval_pass_k: int = 0  # > 0: also pass@k from k samples per eval prompt at `temperature`
    # multi-turn episodes (alignrl.envs): an environment (built-in name, module:Class, file.py:Class) and/or tools
    environment: str | None = None
    tools: list[str] = field(default_factory=list)  # tool functions: python, calculator, module:fn, file.py:fn
    max_turns: int = 0  # assistant turns per episode; 0: the environment's own max_turns, else 4
    max_episode_tokens: int = 0  # tokens after the first prompt, both kinds; 0: 2 × max_turns × max_completion_length
    tool_timeout: float = 10.0  # seconds a tool call may take before it returns a timeout error
    # what samples: this library's decoder, vLLM in this process (one per rank under torchrun) or a vLLM server
    # (`alignrl vllm-serve MODEL`); the vllm extra; the policy's weights (LoRA merged) are pushed every step
    rollout_engine: str = "native"  # native, vllm or vllm_server
    vllm_kv_cache_gib: float | None = None  # vLLM's KV cache (None: its default)
    vllm_gpu_memory_utilization: float = 0.3  # share of the GPU vLLM may take when colocated with training
    vllm_server_url: str = "http://127.0.0.1:8000"  # rollout_engine=vllm_server
    # sampler–trainer mismatch: weight each token's policy loss by π_old / π_sampler (algos/rollout_correction.py)
    # auto: token_truncate with a vLLM engine (its kernels differ from the trainer's), none with the native one
    rollout_correction: str = "auto"  # auto, none, token_truncate, token_mask, sequence_truncate, sequence_mask
    rollout_correction_min: float | None = None  # c_min of the ratio's range (None: unbounded below)
    rollout_correction_max: float | None = 3.0  # c_max (None: unbounded above)

    MIN_GENERATIONS: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        if self.gradient_accumulation_steps != 1:
            raise AlignRLError(
                "gradient_accumulation_steps: online algorithms split batches by micro_batch_tokens / "
                "micro_batch_size instead"
            )
        for name in ("prompts_per_step", "max_prompt_length", "max_completion_length"):
            if getattr(self, name) < 1:
                raise AlignRLError(f"{name}: must be ≥ 1")
        if self.num_generations < self.MIN_GENERATIONS:
            raise AlignRLError(
                f"num_generations: must be ≥ {self.MIN_GENERATIONS} (advantages are relative to the group)"
            )
        check_sampling_options(self)
        if self.micro_batch_size < 0:
            raise AlignRLError("micro_batch_size: must be ≥ 0 (0: split by micro_batch_tokens)")
        if self.reward_funcs is None:
            self.reward_funcs = [] if self.multi_turn else ["gsm8k"]
        for name in ("max_turns", "max_episode_tokens"):
            if getattr(self, name) < 0:
                raise AlignRLError(f"{name}: must be ≥ 0 (0: the default)")
        if self.tool_timeout <= 0:
            raise AlignRLError("tool_timeout: must be > 0 seconds")
        if self.rollout_engine not in ("native", "vllm", "vllm_server"):
            raise AlignRLError(f"rollout_engine: native, vllm or vllm_server, got {self.rollout_engine!r}")
        if self.vllm_kv_cache_gib is not None and self.vllm_kv_cache_gib <= 0:
            raise AlignRLError("vllm_kv_cache_gib: must be > 0 (or null: vLLM's default)")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise AlignRLError("vllm_gpu_memory_utilization: must be in (0, 1]")
        if self.rollout_correction == "auto":
            self.rollout_correction = "none" if self.rollout_engine == "native" else "token_truncate"
        if self.rollout_correction != "none":
            ROLLOUT_CORRECTIONS.check("rollout_correction", self.rollout_correction)
        low, high = self.rollout_correction_min, self.rollout_correction_max
        if (low is not None and low < 0) or (low is not None and high is not None and low > high):
            raise AlignRLError("rollout_correction_min/max: need 0 ≤ min ≤ max")
        if self.multi_turn:
            episode = episode_budget(self, self.max_turns or DEFAULT_MAX_TURNS)
            loop.check_token_budget(self, self.max_prompt_length + episode, "prompt + episode")
        else:
            loop.check_token_budget(self, self.max_prompt_length + self.max_completion_length, "prompt + completion")

    @property
    def multi_turn(self) -> bool:
        """Episodes with an environment or tools rather than one completion per prompt."""
        return bool(self.environment or self.tools)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations


@dataclass
class RolloutBatch:
    """One scored rollout batch: this process's rows ([B, ...]; token tensors [B, C] over completion tokens) and what
    the math needs from the whole batch. Algorithms fill `advantages` (and `extra`) in `prepare`."""

    input_ids: Tensor  # [B, P + C] prompt + completion
    attention_mask: Tensor
    completion_mask: Tensor  # [B, C] 1 on sampled tokens (the tokens that carry log-probs)
    loss_mask: Tensor  # [B, C] float: the tokens the loss averages over (completion_mask, possibly fewer)
    old_logp: Tensor  # [B, C] log π_old(y_t) from the sampling pass (temperature-scaled)
    scores: Tensor  # [B] combined reward of each completion
    truncated: Tensor  # [B] bool: hit max_completion_length without EOS
    prompt_len: int  # P: completion tokens start here
    group_size: int  # completions per prompt, contiguous
    num_seqs: int  # rows of the global batch (all processes)
    offset: int  # this process's first row in the global batch
    global_sum: Callable[[Any], Any] | None = None  # Σ over processes; None: this process holds the whole batch
    ref_logp: Tensor | None = None  # [B, C] reference (or teacher) log-probs, when the algorithm asks for them
    advantages: Tensor | None = None  # [B, C] or [B]
    extra: dict[str, Tensor] = field(default_factory=dict)  # algorithm-specific per-row tensors
    # this process's rows in micro-batches (row indices, loss weight), split once by `build_batch` for every pass
    # over the whole batch (reference, critic, update); empty in a micro-batch
    parts: list[tuple[Tensor, float]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        """Rows this process holds."""
        return self.input_ids.shape[0]

    def total(self, x: Any) -> Any:
        """Σ of `x` over every process's part of the batch."""
        return x if self.global_sum is None else self.global_sum(x)

    def token_mean(self, x: Tensor) -> float:
        """Mean of `x` [B, C] over the loss tokens of the whole batch (every process's part)."""
        return float(self.total(masked_sum(x, self.loss_mask)) / self.total(self.loss_mask.sum()).clamp(min=1))

    def is_weighted(self, per_token: Tensor) -> Tensor:
        """Per-token policy losses times the rollout-correction weight π_old / π_sampler, when the run corrects."""
        weight = self.extra.get("is_weight")
        return per_token if weight is None else per_token * weight

    def select(self, rows: Tensor) -> RolloutBatch:
        """The micro-batch of `rows` (every per-row tensor indexed; batch-level fields kept)."""
        n = self.input_ids.shape[0]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
                v = v[rows]
            out[f.name] = v
        out["extra"] = {k: v[rows] for k, v in self.extra.items()}
        out["parts"] = []
        return RolloutBatch(**out)


@dataclass
class Forward:
    """What one training forward returns for a micro-batch."""

    logp: Tensor  # [b, C] log π_θ(y_t)
    entropy: Tensor | None = None  # [b, C] when asked
    values: Tensor | None = None  # [b, C] for algorithms with a critic


@dataclass
class Norms:
    """Loss normalisers of the whole (mini)batch across processes, so that summing micro-batch losses gives the
    (mini)batch's loss however it is split."""

    num_tokens: Tensor | float  # valid loss tokens
    num_seqs: Tensor | int  # sequences
    max_completion_length: int


class OnlineAlgorithm:
    """An online algorithm on the driver: override `prepare` (advantages) and `loss`; the other hooks have
    defaults. `self.cfg` is the run's config, `self.ctx` the driver's models (set before `setup`)."""

    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimiser steps per pass
    shuffle: bool = False  # shuffle the rows into minibatches (each pass, the same on every process)
    rewards_required: bool = True  # at least one reward function (on-policy distillation needs none)

    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg
        self.ctx: Context

    def reference_model(self) -> str | None:
        """HF directory whose log-probs fill `batch.ref_logp` (cfg.model: the starting policy; with LoRA the
        policy with its adapter disabled), or None for no reference pass."""
        return None

    def setup(self) -> None:
        """Extra models (a critic, a teacher) once the policy is loaded, before the optimiser is built."""

    def trainable(self) -> nn.Module:
        """What the optimiser steps and the gradient norm clips (the policy; PPO adds its critic)."""
        return self.ctx.model

    def multi_process_error(self, mode: str) -> str | None:
        """Why this configuration cannot run in several processes (under `distributed: mode`), if it cannot."""
        return None

    def synced_modules(self) -> list[nn.Module]:
        """Wrapped modules besides the policy whose gradients synchronise across processes (a critic)."""
        return []

    def extra_rewards(self) -> list[tuple[str, Callable[..., Any]]]:
        """Reward functions the algorithm adds to the configured ones, as (name, function)."""
        return []

    def state(self) -> dict[str, Any]:
        """Checkpointed components beyond the policy, optimiser, schedule and data order."""
        return {}

    def sample(self, stream: Iterator[list[int]], step: int) -> tuple[ScoredRollout, dict[str, float]]:
        """This process's share of one scored rollout batch, and sampling metrics."""
        return self.ctx.sample(next(stream), getattr(stream, "consumed", step)), {}

    def prepare(self, batch: RolloutBatch, timer: loop.Timer) -> None:
        """Fill batch.advantages (and anything else the loss needs) before the updates."""
        raise NotImplementedError

    def forward(self, mb: RolloutBatch, with_entropy: bool) -> Forward:
        """The training forward of a micro-batch (under autocast; DDP/FSDP see it)."""
        logp, ent = self.ctx.logprobs(self.ctx.policy, mb, with_entropy=with_entropy)
        return Forward(logp, ent)

    def loss(self, out: Forward, mb: RolloutBatch, norms: Norms) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss of a micro-batch (normalised by `norms`, so micro-batch losses sum to the batch's) and
        masked-mean statistics weighted by the micro-batch's loss tokens."""
        raise NotImplementedError

    def metrics(self, batch: RolloutBatch, stats: dict[str, float]) -> dict[str, float]:
        """Algorithm metrics of the step (after the updates); `stats` holds the averaged loss statistics."""
        return stats

    def save(self, out: Path) -> None:
        """Write extra trained models next to the final policy (every process calls)."""


@dataclass
class Context:
    """The models and data of a run, as the algorithm sees them."""

    cfg: OnlineConfig
    run: loop.Run
    model: nn.Module  # the plain (HF or peft) policy
    policy: nn.Module  # the same, wrapped for DDP/FSDP under torchrun: forwards go through it
    tokenizer: Any
    data: Rows
    reward_fns: RewardFunctions
    reference: nn.Module | None = None
    interaction: Interaction | None = None  # multi-turn episodes
    inference_engine: Any = None  # the vLLM engine or server client, built at the first sampling

    def reference_lm(self) -> nn.Module:
        """The plain reference (or teacher) model inside its wrapper."""
        assert self.reference is not None
        return dist.inner(self.reference)

    def logprobs(
        self, model: nn.Module, mb: RolloutBatch, *, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """log π(y_t) (and entropy) of a micro-batch's completion tokens through `model`."""
        return token_logprobs(
            model, mb.input_ids, mb.attention_mask, mb.completion_mask, start=mb.prompt_len,
            temperature=self.cfg.temperature, with_entropy=with_entropy, chunk_tokens=self.cfg.logprob_chunk_tokens,
        )  # fmt: skip

    def sample(self, idx: list[int], batch_number: int) -> ScoredRollout:
        """Sample and score this process's share of the prompts `idx` (whole groups). Each sample's noise is keyed
        by (seed, batch number, index in the global batch): the completions do not depend on the split."""
        cfg = self.cfg
        params = SamplingParams(
            cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k, loop.autocast_dtype(cfg)
        )
        a, b = dist.shard_bounds(len(idx))
        G = cfg.num_generations
        base = (cfg.seed * 1_000_003 + batch_number) * 1_000_003
        with self.engine() as engine:
            return sample_and_score(
                engine, self.tokenizer, [self.data.rows[i] for i in idx[a:b]], [self.data.where(i) for i in idx[a:b]],
                self.reward_fns, params, repeats=G, max_prompt_length=cfg.max_prompt_length,
                device=self.run.device, seeds=[base + j for j in range(a * G, b * G)], interaction=self.interaction,
            )  # fmt: skip

    @contextlib.contextmanager
    def engine(self) -> Iterator[RolloutEngine]:
        """The rollout engine with the policy's current weights (native: the policy itself, its parameters gathered
        under FSDP; vLLM: built once, then every weight pushed to it)."""
        if self.cfg.rollout_engine == "native":
            with dist.full_params(self.policy) as lm:
                yield NativeEngine(lm, self.tokenizer, self.run.device)
            return
        if self.inference_engine is None:
            self.inference_engine = self._vllm_engine()
        self._push_weights()
        try:
            yield self.inference_engine
        finally:
            self.inference_engine.generated()

    def _vllm_engine(self) -> RolloutEngine:
        cfg = self.cfg
        if cfg.rollout_engine == "vllm_server":
            from alignrl.engines.vllm_server import VLLMServerEngine

            return VLLMServerEngine(cfg.vllm_server_url, self.tokenizer, device=self.run.device)
        from alignrl.engines.vllm_engine import VLLMEngine
        from alignrl.models import resolve_model_path

        episode = self.interaction.max_episode_tokens if self.interaction else cfg.max_completion_length
        return VLLMEngine(
            resolve_model_path(cfg.model), self.tokenizer,
            max_model_len=cfg.max_prompt_length + episode, kv_cache_gib=cfg.vllm_kv_cache_gib,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, device=self.run.device, dtype=cfg.dtype,
        )  # fmt: skip

    def _push_weights(self) -> None:
        """The policy's weights (LoRA merged) into the engine: every rank's own in-process engine, or the server
        from rank 0 while the other ranks wait."""
        one_server = self.cfg.rollout_engine == "vllm_server"
        state = dist.full_state_dict(self.policy, everywhere=not one_server) if dist.is_fsdp(self.policy) else None
        if not one_server or dist.is_main():
            self.inference_engine.load_weights(merged_weights(self.model, state))
        if one_server and dist.is_dist():
            dist.barrier()


def build_batch(scored: ScoredRollout, cfg: OnlineConfig, pass_tokens: loop.PassTokens) -> RolloutBatch:
    """The rollout batch of this process's scored samples; the one place that gathers from other processes."""
    ro = scored.rollout
    n = ro.completion_ids.shape[0]
    distributed = dist.is_dist()
    num_seqs = dist.all_reduce(n) if distributed else n
    offset = dist.shard_bounds(num_seqs, cfg.num_generations)[0] if distributed else 0
    batch = RolloutBatch(
        input_ids=ro.input_ids,
        attention_mask=ro.attention_mask,
        completion_mask=ro.sampled_mask,
        loss_mask=ro.sampled_mask.float(),
        old_logp=ro.logprobs,
        scores=scored.rewards.float(),
        truncated=ro.truncated,
        prompt_len=ro.prompt_ids.shape[1],
        group_size=cfg.num_generations,
        num_seqs=num_seqs,
        offset=offset,
        global_sum=dist.all_reduce if distributed else None,
    )
    batch.parts = micro_batches(batch, torch.arange(n, device=batch.input_ids.device), cfg, pass_tokens)
    return batch


def micro_batches(
    batch: RolloutBatch, rows: Tensor, cfg: OnlineConfig, pass_tokens: loop.PassTokens
) -> list[tuple[Tensor, float]]:
    """`rows` in micro-batches of similar lengths within the token budget (or micro_batch_size), with weights."""
    lengths = batch.prompt_len + batch.attention_mask[rows, batch.prompt_len :].sum(1)
    return loop.rollout_micro_batches(rows, lengths, cfg, pass_tokens)


def pass_logprobs(ctx: Context, batch: RolloutBatch, model: nn.Module, adapter_off: bool = False) -> Tensor:
    """log-probs of the batch's sampled tokens under `model` (with LoRA and `adapter_off`: the policy with its
    adapter disabled), without gradients, over the batch's micro-batches."""
    out = torch.zeros(batch.completion_mask.shape, device=batch.input_ids.device)
    with torch.no_grad(), loop.autocast(ctx.cfg, ctx.run.device):
        with adapter_disabled(ctx.model) if adapter_off else contextlib.nullcontext():
            for sel, w in batch.parts:
                logp = ctx.logprobs(model, batch.select(sel))[0]
                if w:
                    out[sel] = logp
    return out


def reference_pass(ctx: Context, algo: OnlineAlgorithm, batch: RolloutBatch) -> None:
    """batch.ref_logp from the reference (or teacher) model; with LoRA and no separate model, the policy with its
    adapter disabled."""
    batch.ref_logp = pass_logprobs(ctx, batch, ctx.reference or ctx.policy, adapter_off=ctx.reference is None)


def correct_rollout(ctx: Context, batch: RolloutBatch) -> dict[str, float]:
    """The trainer's own log π_old replaces the sampler's in batch.old_logp, and extra["is_weight"] holds the
    bounded ratio π_old / π_sampler of cfg.rollout_correction (none: no weight; π_old is still the trainer's, as
    an inference engine's log-probs are not); returns the mismatch metrics over the global batch."""
    cfg = ctx.cfg
    sampler = batch.old_logp
    batch.old_logp = pass_logprobs(ctx, batch, ctx.policy)
    if cfg.rollout_correction == "none":
        weight = batch.loss_mask
    else:
        weight = ROLLOUT_CORRECTIONS[cfg.rollout_correction](
            batch.old_logp, sampler, batch.loss_mask, cfg.rollout_correction_min, cfg.rollout_correction_max
        )
        batch.extra["is_weight"] = weight
    sums = mismatch_metrics(batch.old_logp, sampler, batch.loss_mask, weight)
    tokens = max(float(batch.total(batch.loss_mask.sum())), 1.0)
    out = {f"rollout_correction/{k}": float(batch.total(v)) / tokens for k, v in sums.items() if k != "ratio_max"}
    out["rollout_correction/ratio_max"] = dist.all_reduce(float(sums["ratio_max"]), "max")
    return out


def update(
    ctx: Context, algo: OnlineAlgorithm, batch: RolloutBatch, opt, sched, seed: int
) -> tuple[dict[str, float], dict[str, float]]:
    """algo.epochs passes over the batch in algo.minibatches minibatches, one optimiser step each. Returns the loss
    statistics (token-weighted means over all passes) and the last optimiser step's loss, gradient norm and lr.

    Minibatches are parts of a permutation of the GLOBAL batch (the same on every process; the identity unless
    algo.shuffle); each process runs its own rows of each minibatch in micro-batches and normalises by the
    minibatch's global counts, so N processes make the single-process update."""
    cfg, policy, device = ctx.cfg, ctx.policy, ctx.run.device
    N, n, lo = batch.num_seqs, batch.num_rows, batch.offset
    size = N // algo.minibatches
    sums: dict[str, list[float]] = {}
    losses: list[float] = []
    upd: dict[str, float] = {}
    params = algo.trainable()
    whole = torch.arange(n, device=batch.input_ids.device)
    in_order = algo.minibatches == 1 and not algo.shuffle  # one minibatch, the whole batch: its parts as split
    for epoch in range(algo.epochs):
        if algo.shuffle:
            order = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for k in range(algo.minibatches):
            if in_order:
                local, micro = whole, batch.parts
            else:
                glob = order[k * size : (k + 1) * size] if algo.shuffle else torch.arange(k * size, (k + 1) * size)
                local = (glob[(glob >= lo) & (glob < lo + n)] - lo).to(whole.device)  # this process's rows of it
                micro = micro_batches(batch, local, cfg, ctx.run.pass_tokens)
            norms = Norms(
                num_tokens=batch.total(batch.loss_mask[local].sum()).clamp(min=1),
                num_seqs=batch.total(len(local)),
                max_completion_length=cfg.max_completion_length,
            )
            loss_total = 0.0
            for j, (sel, w) in enumerate(micro):
                mb = batch.select(sel)
                last = j == len(micro) - 1
                # DDP reads the sync flag in forward, FSDP in backward: both run inside grad_sync
                with contextlib.ExitStack() as sync:
                    for module in (policy, *algo.synced_modules()):
                        sync.enter_context(dist.grad_sync(module, last))
                    with loop.autocast(cfg, device):
                        out = algo.forward(mb, with_entropy=epoch == 0)
                    loss, st = algo.loss(out, mb, norms)
                    (loss * (w * dist.grad_scale())).backward()
                if not w:
                    continue
                loss_total += float(loss.detach())
                weighted = [(st, float(mb.loss_mask.sum()))]
                if out.entropy is not None:  # over every sampled token, loss or not
                    sampled = mb.completion_mask.float()
                    weighted.append(({"entropy": masked_mean(out.entropy, sampled)}, float(sampled.sum())))
                for values, weight in weighted:
                    for key, v in values.items():
                        acc = sums.setdefault(key, [0.0, 0.0])
                        acc[0] += float(v) * weight
                        acc[1] += weight
            losses.append(dist.all_reduce(loss_total))
            upd = loop.optimizer_step(params, opt, sched, cfg, loss=losses[-1], run=ctx.run)
    sums = {k: [dist.all_reduce(s), dist.all_reduce(w)] for k, (s, w) in sorted(sums.items())}
    stats = {k: s / w if w else 0.0 for k, (s, w) in sums.items()}
    return stats, {"loss": losses[-1], **upd}  # loss: of the last optimiser step


def rollout_metrics(scored: ScoredRollout, batch: RolloutBatch, fns: RewardFunctions) -> dict[str, float]:
    """Reward, length and advantage metrics over the global batch (gathered from every process)."""
    ro = scored.rollout
    rewards = dist.all_gather(scored.rewards.float())
    raw = dist.all_gather(scored.raw_rewards)
    lengths = dist.all_gather(ro.sampled_mask.sum(-1).float())
    m: dict[str, float] = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        # samples for which every reward function returned None/NaN (their combined reward is 0)
        "rewards/none_applicable": float(raw.isnan().all(dim=1).sum()),
    }
    for j, name in enumerate(fns.names):
        col = raw[:, j]
        valid = col[~col.isnan()]
        m[f"rewards/{name}/mean"] = float(col.nanmean())
        m[f"rewards/{name}/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
    if batch.group_size > 1:
        m["frac_reward_zero_std"] = float((rewards.view(-1, batch.group_size).std(dim=1) == 0).float().mean())
    adv = batch.advantages
    if adv is not None and (adv.dim() == 1 or adv.stride(1) == 0):  # one value per sequence: sequence statistics
        seq = dist.all_gather(adv if adv.dim() == 1 else adv[:, 0])
        m["advantages/mean"] = float(seq.mean())
        m["advantages/std"] = float(seq.std()) if seq.numel() > 1 else 0.0
        m["advantages/abs_mean"] = float(seq.abs().mean())
    elif adv is not None:  # per token: over the loss tokens
        mean, var = masked_moments(adv, batch.loss_mask, batch.global_sum)
        m["advantages/mean"] = float(mean)
        m["advantages/std"] = float(var.sqrt())
        m["advantages/abs_mean"] = float(masked_moments(adv.abs(), batch.loss_mask, batch.global_sum)[0])
    m["completion_length/mean"] = float(lengths.mean())
    m["completion_length/max"] = float(lengths.max())
    m["truncation_rate"] = float(dist.all_gather(ro.truncated.float()).mean())
    m["eos_rate"] = 1 - m["truncation_rate"]
    m.update(episode_metrics(scored.episode_stats))
    return m


def episode_metrics(stats: dict[str, Tensor]) -> dict[str, float]:
    """Means over the global batch of the per-episode statistics (turns, tool calls and errors, how episodes
    ended as episode/..., environment reward parts as env/...)."""
    if not stats:  # a single-turn run (on every process)
        return {}
    gathered = dist.all_gather_objects([{k: v.tolist() for k, v in stats.items()}])
    keys = sorted({k for part in gathered for k in part})
    out = {}
    for k in keys:
        values = [x for part in gathered for x in part.get(k, [0.0] * len(next(iter(part.values()), [])))]
        out[k] = sum(values) / max(len(values), 1)
    return out


def train(cfg: OnlineConfig, algo: OnlineAlgorithm) -> Path:
    """Run an online algorithm; returns the final model directory."""
    refusal = algo.multi_process_error(cfg.distributed) if dist.env_world_size() > 1 else None
    if refusal:
        raise AlignRLError(refusal)
    run = loop.start_run(cfg)
    model, tok = loop.load_policy(cfg, run.device, rl=True)
    policy = loop.wrap_policy(run, model)  # DDP / FSDP under torchrun; log-probs go through it
    if dist.world_size() > 1 and cfg.prompts_per_step % dist.world_size():
        raise AlignRLError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the {dist.world_size()} processes"
        )
    data = load_rows(cfg.train_file)
    interaction = build_interaction(cfg)
    if interaction is None:
        require_columns(data, ["prompt"])
        check_prompt_lengths(data, tok, cfg.max_prompt_length, cfg.max_completion_length, model)
    else:
        warn_positions(interaction, cfg.max_prompt_length, model)
    fns = reward_functions(
        cfg.reward_funcs or [], cfg.reward_weights, set(data.rows[0]), cfg.train_file,
        interaction.name if interaction else None, timeout=cfg.reward_timeout, max_steps=cfg.max_steps,
        required=algo.rewards_required,
    )  # fmt: skip
    for name, fn in algo.extra_rewards():  # (after the environment's column: its position does not matter)
        fns.add(name, fn)
    ctx = Context(cfg, run, model, policy, tok, data, fns, interaction=interaction)
    algo.ctx = ctx
    ref_path = algo.reference_model()
    if ref_path is not None and not (is_peft(model) and ref_path == cfg.model):
        ctx.reference = loop.load_reference(run, ref_path, "model" if ref_path == cfg.model else "teacher_model")
    algo.setup()
    eval_data, eval_fns = eval_set(cfg, interaction.name if interaction else None)
    opt = loop.build_optimizer(algo.trainable(), cfg)  # after wrapping, before any forward (FSDP)
    sched = loop.build_scheduler(opt, cfg, cfg.max_steps * algo.epochs * algo.minibatches)
    stream = checkpoint.ReplayStream(lambda: infinite_batches(len(data), cfg.prompts_per_step, random.Random(cfg.seed)))
    first = run.register(model, tok, optimizer=opt, scheduler=sched, data=stream, **algo.state())
    with closing_engine(ctx):  # the vLLM engine, if one was built: shut down before the process group goes
        if first == 1:  # the starting policy, before any update
            evaluated, eval_samples = evaluate_online(
                ctx.engine, tok, eval_data, eval_fns, cfg, run.device, 0, interaction
            )
            if evaluated:
                run.metrics.log(0, evaluated)
                run.metrics.samples(0, eval_samples)
        for step in range(first, cfg.max_steps + 1):
            start, timer = time.perf_counter(), loop.Timer()
            fns.start_step(step - 1, cfg.max_steps)  # trainer_state: updates done so far (as TRL); this step's counts
            with timer("generation"):
                scored, metrics = algo.sample(stream, step)
            loop.check_reward_signal(run, fns)
            if scored.rollout.completion_ids.shape[0] == 0:  # e.g. dynamic sampling found no informative group
                run.metrics.log(step, {**metrics, "skipped_step": 1.0})
                run.end_step(step)
                continue
            batch = build_batch(scored, cfg, run.pass_tokens)
            if cfg.rollout_correction != "none" or cfg.rollout_engine != "native":
                with timer("old_logprobs"):
                    metrics.update(correct_rollout(ctx, batch))
            if ref_path is not None:
                with timer("reference"):
                    reference_pass(ctx, algo, batch)
            algo.prepare(batch, timer)
            seed = (cfg.seed * 1_000_003 + getattr(stream, "consumed", step)) * 1_000_003
            with timer("update"):
                stats, upd = update(ctx, algo, batch, opt, sched, seed)
            metrics.update(upd)
            metrics.update(rollout_metrics(scored, batch, fns))
            metrics.update(algo.metrics(batch, stats))
            metrics.update({f"time/{k}": v for k, v in timer.t.items()})
            metrics["step_time"] = time.perf_counter() - start  # the whole step, evaluation and logging aside
            log_step(ctx, step, metrics, scored, eval_data, eval_fns)
        algo.save(run.out)
        return loop.finish(run, model, tok)


@contextlib.contextmanager
def closing_engine(ctx: Context) -> Iterator[None]:
    """Close the run's inference engine when the block ends: with a barrier after a normal end, without one after an
    error (another rank may be gone)."""
    try:
        yield
    except BaseException:
        if ctx.inference_engine is not None:
            ctx.inference_engine.close(barrier=False)
        raise
    if ctx.inference_engine is not None:
        ctx.inference_engine.close()


def log_step(ctx: Context, step: int, metrics: dict, scored: ScoredRollout, eval_data, eval_fns) -> None:
    """Reward-function logs, evaluation when due, metrics and sample completions; then end the step (checkpoint)."""
    cfg, run = ctx.cfg, ctx.run
    extras = loop.add_reward_logs(metrics, ctx.reward_fns, len(scored.completions))
    evaluated, eval_samples = evaluate_online(
        ctx.engine, ctx.tokenizer, eval_data, eval_fns, cfg, run.device, step, ctx.interaction
    )
    metrics.update(evaluated)
    if step % cfg.logging_steps == 0 or evaluated:
        run.metrics.log(step, metrics)
        n = min(cfg.log_completions, len(scored.completions))
        rows = [
            {"prompt": scored.prompts[i], "completion": scored.completions[i], "reward": float(scored.rewards[i]),
             **extras[i]}
            for i in range(n)
        ]  # fmt: skip
        run.metrics.samples(step, rows + eval_samples)
    run.end_step(step)


__all__ = [
    "Context",
    "Forward",
    "Norms",
    "OnlineAlgorithm",
    "OnlineConfig",
    "RolloutBatch",
    "build_batch",
    "train",
]
