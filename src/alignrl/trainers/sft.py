"""Supervised fine-tuning: next-token loss on completion (or assistant) tokens only."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignrl import checkpoint
from alignrl import distributed as dist
from alignrl.config import TrainConfig
from alignrl.data import SFTExample, length_grouped_batches, load_rows, pack, pad_batch, split_eval, tokenize_sft
from alignrl.errors import AlignRLError
from alignrl.logprobs import token_logprobs
from alignrl.trainers import loop, offline


@dataclass
class SFTConfig(TrainConfig):
    """SFT options on top of the shared ones."""

    batch_size: int = 8  # sequences per micro-batch
    eval_batch_size: int = 32
    max_length: int = 512  # longer examples are truncated (counted in the log)
    packing: bool = False  # concatenate examples into max_length blocks
    group_by_length: bool = True  # batch similar lengths together to minimise padding

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.max_length < 2:
            raise AlignRLError("batch_size must be ≥ 1 and max_length ≥ 2")
        loop.check_token_budget(self, self.max_length, "sequence (max_length)")


def collate(batch: Sequence[SFTExample], pad_id: int, device: torch.device):
    """Right-pad a batch into ids, attention mask and loss mask."""
    ids, attn = pad_batch([e.input_ids for e in batch], pad_id, device)
    return ids, attn, pad_batch([e.loss_mask for e in batch], 0, device)[0]


def nll_sum(model: nn.Module, batch, pad_id: int, device, cfg: SFTConfig) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the loss-masked tokens, and their count."""
    ids, attn, lmask = collate(batch, pad_id, device)
    target = lmask[:, 1:]
    with loop.autocast(cfg, device):
        logp, _ = token_logprobs(model, ids, attn, target, start=1, chunk_tokens=cfg.logprob_chunk_tokens)
    return -logp.sum(), int(target.sum())


def tokenize_all(path: str, rows, tokenizer, cfg: SFTConfig) -> tuple[list[SFTExample], int]:
    examples, truncated = [], 0
    for i, row in enumerate(rows.rows):
        ex = tokenize_sft(row, tokenizer, rows.where(i))
        if len(ex.input_ids) > cfg.max_length:
            truncated += 1
            ex = SFTExample(ex.input_ids[: cfg.max_length], ex.loss_mask[: cfg.max_length])
        if sum(ex.loss_mask[1:]) == 0:
            raise AlignRLError(f"{rows.where(i)}: no completion tokens to train on (empty or truncated away)")
        examples.append(ex)
    return examples, truncated


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[SFTExample], pad_id: int, device, cfg: SFTConfig) -> float:
    """Token-mean NLL over an evaluation set (each batch split over ranks, sums all-reduced)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in offline.no_grad_batches(examples, lambda e: len(e.input_ids), cfg.eval_batch_size):
        part, w = dist.local_part(batch)
        loss, n = nll_sum(model, part, pad_id, device, cfg)
        total, count = total + w * float(loss), count + int(w) * n
    model.train(was)
    return dist.all_reduce(total) / max(dist.all_reduce(count), 1)


def batches(examples: list[SFTExample], cfg: SFTConfig, rng: random.Random) -> Iterator[list[SFTExample]]:
    """Endless epochs of (optionally length-grouped) batches."""
    lengths = [len(e.input_ids) for e in examples]
    while True:
        if cfg.group_by_length:
            epoch = length_grouped_batches(lengths, cfg.batch_size, rng)
        else:
            order = list(range(len(examples)))
            rng.shuffle(order)
            epoch = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        for b in epoch:
            yield [examples[i] for i in b]


@loop.ends_run
def train(cfg: SFTConfig) -> Path:
    """Run SFT; returns the final model directory."""
    run = loop.start_run(cfg)
    model, tok = loop.load_policy(cfg, run.device, rl=False)
    policy = loop.wrap_policy(run, model)  # DDP / FSDP under torchrun; log-probs go through it
    rows = load_rows(cfg.train_file)
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction, cfg.seed)
    if cfg.eval_file:
        eval_rows = load_rows(cfg.eval_file)
    train_ex, n_trunc = tokenize_all(cfg.train_file, train_rows, tok, cfg)
    eval_ex = tokenize_all(cfg.eval_file or cfg.train_file, eval_rows, tok, cfg)[0] if eval_rows else []
    if cfg.packing:
        train_ex = pack(train_ex, cfg.max_length)
    pad = tok.pad_token_id
    opt = loop.build_optimizer(model, cfg)
    sched = loop.build_scheduler(opt, cfg, cfg.max_steps)
    stream = checkpoint.ReplayStream(lambda: batches(train_ex, cfg, random.Random(cfg.seed)))

    def part_loss(part: list[SFTExample]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _ = nll_sum(policy, part, pad, run.device, cfg)
        return loss, {"loss": float(loss.detach())}

    def update(micro: list[list[SFTExample]]) -> dict[str, float]:
        # token-mean over the whole accumulated (global) batch
        n_total = sum(sum(sum(e.loss_mask[1:]) for e in b) for b in micro)
        metrics = offline.accumulated_update(
            policy, model, micro, part_loss, count=n_total, width=lambda e: len(e.input_ids),
            budget=loop.token_budget(cfg, max(len(e.input_ids) for b in micro for e in b), run.pass_tokens),
            one_pass=loop.one_pass_tokens(cfg, run.pass_tokens), rows_per_item=1,
            keys=["loss"], opt=opt, sched=sched, cfg=cfg, run=run,
        )  # fmt: skip
        return {"loss": metrics.pop("loss"), "tokens": n_total, **metrics}

    def evaluate() -> dict[str, float]:
        return {"eval_loss": eval_loss(policy, eval_ex, pad, run.device, cfg)}

    first = {"truncated_examples": n_trunc}
    return offline.train(run, model, tok, opt, sched, stream, update, evaluate if eval_ex else None, first)
