"""The offline driver: SFT, DPO and reward models (fixed data, no sampling).

One step: take `gradient_accumulation_steps` batches, split each process's share of them to the token budget, sum
the loss of the parts (normalised by the whole accumulated batch's count), take one optimiser step, then evaluate,
log and checkpoint. A trainer gives its loss on a part (`part_loss`) and its evaluation; the loop is here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from alignrl import distributed as dist
from alignrl.config import TrainConfig
from alignrl.data import ONE_PASS_TOKENS, split_by_tokens
from alignrl.trainers import loop

T = TypeVar("T")

# a part of a batch -> (loss summed over its items, sums of the statistics to log)
PartLoss = Callable[[list[T]], tuple[torch.Tensor, dict[str, float]]]


def no_grad_batches(
    examples: Sequence[T], width: Callable[[T], int], size: int, rows_per_item: int = 1
) -> Iterator[list[T]]:
    """`examples` by width in no-grad batches (reference pass, evaluation) of at most `size` items and
    ONE_PASS_TOKENS padded tokens (one item at least): attention over long sequences would otherwise hold
    rows × length² scores per layer. The same batches on every process."""
    widest = ONE_PASS_TOKENS // rows_per_item  # a wider item runs alone
    widths = [min(width(e), widest) for e in examples]
    for idx in split_by_tokens(widths, rows_per_item * widest, max_items=size, rows_per_item=rows_per_item):
        yield [examples[i] for i in idx]


def accumulated_update(
    policy: nn.Module,
    model: nn.Module,
    micro: list[list[T]],
    part_loss: PartLoss,
    *,
    count: float,
    width: Callable[[T], int],
    budget: int,
    one_pass: int = 0,
    rows_per_item: int,
    keys: Sequence[str],
    opt: torch.optim.Optimizer,
    sched,
    cfg: TrainConfig,
    run: loop.Run,
) -> dict[str, float]:
    """One optimiser update over accumulated micro-batches: each process takes its share of every micro-batch,
    split to the token budget (items of `width` tokens, `rows_per_item` rows each); the loss is the sum over parts
    divided by `count` (the whole batch's items or tokens); gradients sync on the last part (`policy` is the wrapped
    model the forwards go through, `model` the plain one the optimiser steps). Returns the logged
    means over `count` of the statistics `keys` (all-reduced; "loss" among them) and the optimiser-step metrics."""
    parts = loop.local_parts(micro, width, budget, rows_per_item, one_pass)
    acc: dict[str, float] = {}
    for i, (part, w) in enumerate(parts):
        with dist.grad_sync(policy, i == len(parts) - 1):
            loss_sum, stats = part_loss(part)
            (loss_sum * (w * dist.grad_scale() / count)).backward()
        if w:
            for k, v in stats.items():
                acc[k] = acc.get(k, 0.0) + v
    means = {k: dist.all_reduce(acc.get(k, 0.0)) / count for k in keys}  # every process skips or steps alike
    return means | loop.optimizer_step(model, opt, sched, cfg, loss=means["loss"], run=run)


def train(
    run: loop.Run,
    model: nn.Module,
    tokenizer: Any,
    opt: torch.optim.Optimizer,
    sched,
    stream: Iterator[list[T]],
    update: Callable[[list[list[T]]], dict[str, float]],
    evaluate: Callable[[], dict[str, float]] | None,
    first_step_metrics: dict[str, float],
) -> Path:
    """The step loop: `update` the accumulated batches, evaluate when due (eval_steps and at the end), log,
    checkpoint; returns the final model directory."""
    cfg = run.cfg
    first = run.register(model, tokenizer, optimizer=opt, scheduler=sched, data=stream)
    if evaluate is not None and first == 1:  # the starting model, before any update
        run.metrics.log(0, evaluate())
    for step in range(first, cfg.max_steps + 1):
        timer = loop.Timer()
        micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        with timer("update"):
            metrics = update(micro)
        metrics["step_time"] = timer.t["update"]
        if step == 1:
            metrics.update(first_step_metrics)
        if evaluate is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps):
            metrics.update(evaluate())
        if step % cfg.logging_steps == 0 or "eval_loss" in metrics:
            run.metrics.log(step, metrics)
        run.end_step(step)
    return loop.finish(run, model, tokenizer)
