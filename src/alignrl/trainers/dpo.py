"""DPO and its family (cDPO, robust DPO, IPO, hinge/SLiC, SimPO, ORPO) on {"prompt", "chosen", "rejected"} rows.

Chosen and rejected sequences go through the model in one concatenated forward. Reference log-probs are
computed once, before training, in a no-grad pass and cached on the examples: no reference model is kept
in memory during training (and none is needed at all for the reference-free simpo and orpo).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from alignrl import checkpoint
from alignrl import distributed as dist
from alignrl.algos.preference import PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES, preference_loss
from alignrl.config import TrainConfig
from alignrl.data import (
    PreferenceExample,
    length_grouped_batches,
    load_preference_examples,
    load_rows,
    pad_batch,
    split_eval,
)
from alignrl.errors import AlignRLError
from alignrl.logprobs import token_logprobs
from alignrl.trainers import loop, offline


@dataclass
class DPOConfig(TrainConfig):
    """DPO-family options on top of the shared ones (names and defaults follow TRL's DPOConfig)."""

    learning_rate: float = 1e-6
    loss_type: str = "sigmoid"  # PREFERENCE_LOSSES: sigmoid, ipo, hinge, robust, simpo, orpo
    beta: float = 0.1  # inverse temperature of the implicit reward (IPO: 1/(2β) is the target margin)
    label_smoothing: float = 0.0  # cDPO / robust DPO / SimPO: assumed fraction of flipped labels, in [0, 0.5)
    simpo_gamma: float = 0.5  # SimPO target reward margin γ
    orpo_lambda: float | None = None  # ORPO weight of the odds-ratio term; None uses beta (as TRL does)
    ref_model: str | None = None  # reference model directory; None: the starting policy itself
    batch_size: int = 8  # preference pairs per micro-batch (2x sequences per forward)
    eval_batch_size: int = 32  # pairs per forward in evaluation and in the reference pass
    max_length: int = 512  # tokens of prompt + longer completion; longer rows are bad rows
    on_bad_row: Literal["error", "skip"] = "error"  # bad rows: one-line error, or skip them (counted, logged)

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.max_length < 2:
            raise AlignRLError("batch_size and eval_batch_size must be ≥ 1 and max_length ≥ 2")
        loop.check_token_budget(self, 2 * self.max_length, "chosen + rejected pair (2 × max_length)")
        PREFERENCE_LOSSES.check("loss_type", self.loss_type)
        if self.ref_model and self.loss_type in REFERENCE_FREE_LOSSES:
            raise AlignRLError(f"ref_model: loss_type {self.loss_type!r} is reference-free; remove ref_model")
        one = torch.zeros(1)  # the loss checks beta, label_smoothing and their combination with loss_type
        preference_loss(
            self.loss_type, policy_chosen_logps=one, policy_rejected_logps=one, chosen_lengths=one + 1,
            rejected_lengths=one + 1, ref_chosen_logps=one, ref_rejected_logps=one, beta=self.beta,
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma, orpo_lambda=self.orpo_lambda,
        )  # fmt: skip


def collate_pairs(batch: Sequence[PreferenceExample], pad_id: int, device, padding_side: str = "right"):
    """The chosen sequences then the rejected ones as one [2B, L] batch: ids, attention mask, completion mask."""
    seqs = [(e.prompt_ids, e.chosen_ids) for e in batch] + [(e.prompt_ids, e.rejected_ids) for e in batch]
    left = padding_side == "left"
    ids, attn = pad_batch([p + c for p, c in seqs], pad_id, device, left)
    return ids, attn, pad_batch([[0] * len(p) + [1] * len(c) for p, c in seqs], 0, device, left)[0]


def pair_logps(
    model: nn.Module,
    batch: Sequence[PreferenceExample],
    pad_id: int,
    device,
    chunk_tokens: int = 4096,
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen [B], rejected [B]) from one concatenated forward."""
    ids, attn, cmask = collate_pairs(batch, pad_id, device, padding_side)
    logp, _ = token_logprobs(model, ids, attn, cmask[:, 1:], start=1, chunk_tokens=chunk_tokens)
    seq = logp.sum(-1)
    return seq[: len(batch)], seq[len(batch) :]


@torch.no_grad()
def cache_reference_logps(model: nn.Module, examples: list[PreferenceExample], pad_id: int, device, cfg) -> None:
    """One no-grad pass of the reference over the data; results are stored on the examples."""
    was = model.training
    model.eval()
    for b in offline.no_grad_batches(examples, lambda e: e.length, cfg.eval_batch_size, 2):
        part, w = dist.local_part(b)  # each rank scores its share; the values are gathered in batch order
        with loop.autocast(cfg, device):
            rc, rr = pair_logps(model, part, pad_id, device, cfg.logprob_chunk_tokens)
        values = dist.all_gather_objects(list(zip(rc.tolist(), rr.tolist())) if w else [])
        for e, (c, r) in zip(b, values):
            e.ref_chosen_logp, e.ref_rejected_logp = c, r
    model.train(was)


def pair_losses(cfg: DPOConfig, batch: Sequence[PreferenceExample], pc: torch.Tensor, pr: torch.Tensor):
    """Per-pair loss and implicit rewards for a batch whose policy log-probs are (pc, pr)."""
    dev = pc.device
    ref = cfg.loss_type not in REFERENCE_FREE_LOSSES
    return preference_loss(
        cfg.loss_type,
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        chosen_lengths=torch.tensor([len(e.chosen_ids) for e in batch], device=dev),
        rejected_lengths=torch.tensor([len(e.rejected_ids) for e in batch], device=dev),
        ref_chosen_logps=torch.tensor([e.ref_chosen_logp for e in batch], device=dev) if ref else None,
        ref_rejected_logps=torch.tensor([e.ref_rejected_logp for e in batch], device=dev) if ref else None,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
        orpo_lambda=cfg.orpo_lambda,
    )


_STAT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected")  # fmt: skip


def _add_stats(acc: dict[str, float], losses, cr, rr, pc, pr) -> None:
    """Sums over pairs of TRL's logged quantities (divided by the pair count when logged)."""
    for k, v in {
        "loss": losses.detach(),
        "rewards/chosen": cr,
        "rewards/rejected": rr,
        "rewards/accuracies": (cr > rr).float(),
        "rewards/margins": cr - rr,
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }.items():
        acc[k] = acc.get(k, 0.0) + float(v.sum())


@torch.no_grad()
def evaluate_pairs(model: nn.Module, examples: list[PreferenceExample], pad_id: int, device, cfg) -> dict[str, float]:
    """Mean loss, implicit rewards, preference accuracy and log-probs over evaluation pairs (eval_ prefix)."""
    was = model.training
    model.eval()
    acc: dict[str, float] = {}
    for b in offline.no_grad_batches(examples, lambda e: e.length, cfg.eval_batch_size, 2):
        part, w = dist.local_part(b)
        with loop.autocast(cfg, device):
            pc, pr = pair_logps(model, part, pad_id, device, cfg.logprob_chunk_tokens)
        if w:
            _add_stats(acc, *pair_losses(cfg, part, pc, pr), pc, pr)
    model.train(was)
    return {f"eval_{k}": dist.all_reduce(acc.get(k, 0.0)) / len(examples) for k in _STAT_KEYS}


def pair_batches(examples: list[PreferenceExample], batch_size: int, rng: random.Random) -> Iterator[list]:
    """Endless epochs of length-grouped batches of pairs."""
    lengths = [e.length for e in examples]
    while True:
        for b in length_grouped_batches(lengths, batch_size, rng):
            yield [examples[i] for i in b]


def load_pairs(cfg, tok, add_eos: bool = True):
    """Train and eval preference examples (eval from eval_file or a held-out fraction) and skip counts."""
    rows = load_rows(cfg.train_file)
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction, cfg.seed)
    train_ex, skipped = load_preference_examples(train_rows, tok, cfg.max_length, cfg.on_bad_row, add_eos)
    eval_ex: list[PreferenceExample] = []
    if cfg.eval_file:
        eval_rows = load_rows(cfg.eval_file)
    if eval_rows:
        eval_ex, eval_skipped = load_preference_examples(eval_rows, tok, cfg.max_length, cfg.on_bad_row, add_eos)
        skipped = {k: skipped.get(k, 0) + eval_skipped.get(k, 0) for k in skipped.keys() | eval_skipped.keys()}
    return train_ex, eval_ex, skipped


@loop.ends_run
def train(cfg: DPOConfig) -> Path:
    """Run DPO (or a family member); returns the final model directory."""
    run = loop.start_run(cfg)
    model, tok = loop.load_policy(cfg, run.device, rl=True)  # dropout off, as TRL's disable_dropout
    policy = loop.wrap_policy(run, model)  # DDP / FSDP under torchrun; log-probs go through it
    opt = loop.build_optimizer(model, cfg)  # before any forward: FSDP's parameters are the shards then
    train_ex, eval_ex, skipped = load_pairs(cfg, tok)
    pad = tok.pad_token_id
    if cfg.loss_type not in REFERENCE_FREE_LOSSES:
        # the reference is the starting policy (LoRA: its base) unless ref_model names another model
        ref = loop.load_reference(run, cfg.ref_model, "ref_model") if cfg.ref_model else policy
        cache_reference_logps(ref, train_ex + eval_ex, pad, run.device, cfg)
        del ref

    def part_loss(part: list[PreferenceExample]) -> tuple[torch.Tensor, dict[str, float]]:
        with loop.autocast(cfg, run.device):
            pc, pr = pair_logps(policy, part, pad, run.device, cfg.logprob_chunk_tokens)
        losses, cr, rr = pair_losses(cfg, part, pc, pr)
        acc: dict[str, float] = {}
        _add_stats(acc, losses, cr, rr, pc, pr)
        return losses.sum(), acc

    # (run.register, in offline.train, comes after the reference pass: it must see the starting policy)
    pairs = (train_ex, eval_ex, skipped)
    return train_pairs(run, policy, model, tok, opt, pairs, part_loss, _STAT_KEYS, evaluate_pairs)


def train_pairs(
    run: loop.Run,
    policy: nn.Module,
    model: nn.Module,
    tok,
    opt: torch.optim.Optimizer,
    pairs: tuple[list[PreferenceExample], list[PreferenceExample], dict[str, int]],
    part_loss: offline.PartLoss,
    keys: Sequence[str],
    evaluate: Callable[..., dict[str, float]],
) -> Path:
    """The offline loop over preference pairs (DPO and reward models): each update is the mean over all pairs of
    the accumulated batch; `evaluate(policy, eval_ex, pad, device, cfg)` on the held-out pairs."""
    cfg = run.cfg
    train_ex, eval_ex, skipped = pairs
    sched = loop.build_scheduler(opt, cfg, cfg.max_steps)
    stream = checkpoint.ReplayStream(lambda: pair_batches(train_ex, cfg.batch_size, random.Random(cfg.seed)))

    def update(micro: list[list[PreferenceExample]]) -> dict[str, float]:
        return offline.accumulated_update(
            policy, model, micro, part_loss, count=sum(len(b) for b in micro), width=lambda e: e.length,
            budget=loop.token_budget(cfg, 2 * max(e.length for b in micro for e in b), run.pass_tokens, 2),
            one_pass=loop.one_pass_tokens(cfg, run.pass_tokens), rows_per_item=2,
            keys=keys, opt=opt, sched=sched, cfg=cfg, run=run,
        )  # fmt: skip

    def held_out() -> dict[str, float]:
        return evaluate(policy, eval_ex, tok.pad_token_id, run.device, cfg)

    first = {"skipped_rows": sum(skipped.values())}
    return offline.train(run, model, tok, opt, sched, stream, update, held_out if eval_ex else None, first)
