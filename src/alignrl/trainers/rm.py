"""Reward-model training: Bradley–Terry on {"prompt", "chosen", "rejected"[, "margin"]} pairs.

The model is AutoModelForSequenceClassification with num_labels=1 (created from a causal LM directory: its
trunk plus a new `score` head), read at the last non-pad token, so the saved directory loads with plain
transformers and can be used directly as a reward function (`reward_funcs: [runs/rm/final]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from alignrl import distributed as dist
from alignrl.algos.preference import bradley_terry_loss
from alignrl.config import TrainConfig
from alignrl.data import PreferenceExample, pad_batch
from alignrl.errors import AlignRLError
from alignrl.models import disable_dropout, enable_activation_checkpointing
from alignrl.rewards.reward_model import load_reward_model, reward_scores, rm_add_eos
from alignrl.trainers import loop, offline
from alignrl.trainers.dpo import load_pairs, train_pairs


@dataclass
class RMConfig(TrainConfig):
    """Reward-model options on top of the shared ones (names follow TRL's RewardConfig)."""

    learning_rate: float = 1e-5
    batch_size: int = 8  # preference pairs per micro-batch (2x sequences per forward)
    eval_batch_size: int = 32
    max_length: int = 512  # tokens of prompt + longer completion; longer rows are bad rows
    on_bad_row: Literal["error", "skip"] = "error"  # bad rows: one-line error, or skip them (counted, logged)
    center_rewards_coefficient: float = 0.0  # coef · mean((r_c + r_r)²) keeps rewards centred; ≈ 0.01
    use_margin: bool = True  # subtract the `margin` column (when rows have one; missing = 0) inside the loss

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.max_length < 2:
            raise AlignRLError("batch_size and eval_batch_size must be ≥ 1 and max_length ≥ 2")
        loop.check_token_budget(self, 2 * self.max_length, "chosen + rejected pair (2 × max_length)")
        if self.center_rewards_coefficient < 0:
            raise AlignRLError("center_rewards_coefficient: must be ≥ 0")


def pair_rewards(model: nn.Module, batch: Sequence[PreferenceExample], pad_id: int, device, left: bool = False):
    """Scores (chosen [B], rejected [B]) from one concatenated forward."""
    seqs = [e.prompt_ids + e.chosen_ids for e in batch] + [e.prompt_ids + e.rejected_ids for e in batch]
    ids, mask = pad_batch(seqs, pad_id, device, left=left)
    r = dist.call(model, reward_scores, ids, mask)  # through the DDP/FSDP wrapper when given one
    return r[: len(batch)], r[len(batch) :]


def bt_loss(cfg: RMConfig, batch: Sequence[PreferenceExample], rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    margin = None
    if cfg.use_margin and any(e.margin is not None for e in batch):
        margin = torch.tensor([e.margin or 0.0 for e in batch], device=rc.device)
    return bradley_terry_loss(rc, rr, margin, cfg.center_rewards_coefficient)


_STAT_KEYS = ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")


def _add_stats(acc: dict[str, float], loss: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> None:
    """Sums over pairs (divided by the pair count when logged)."""
    rc, rr = rc.detach(), rr.detach()
    for k, v in {
        "loss": loss.detach() * len(rc),
        "accuracy": (rc > rr).float().sum(),
        "margin": (rc - rr).sum(),
        "mean_reward": (rc + rr).sum() / 2,
        "rewards/chosen": rc.sum(),
        "rewards/rejected": rr.sum(),
    }.items():
        acc[k] = acc.get(k, 0.0) + float(v)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, examples: list[PreferenceExample], pad_id: int, device, cfg) -> dict[str, float]:
    """Loss, pair accuracy (r_chosen > r_rejected), margin and mean reward over evaluation pairs (eval_ prefix)."""
    was = model.training
    model.eval()
    acc: dict[str, float] = {}
    for batch in offline.no_grad_batches(examples, lambda e: e.length, cfg.eval_batch_size, 2):
        b, w = dist.local_part(batch)
        with loop.autocast(cfg, device):
            rc, rr = pair_rewards(model, b, pad_id, device)
        if w:
            _add_stats(acc, bt_loss(cfg, b, rc, rr), rc, rr)
    model.train(was)
    return {f"eval_{k}": dist.all_reduce(acc.get(k, 0.0)) / len(examples) for k in _STAT_KEYS}


def load_model(cfg: RMConfig, device: torch.device):
    """The reward model (trunk + score head, dropout off) and its tokenizer; LoRA trains the head fully."""
    tok = loop.load_run_tokenizer(cfg)
    model = load_reward_model(cfg.model, tok.pad_token_id, cfg.dtype, device)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.lora_r > 0:  # a plain PeftModel (the causal-LM task type expects generation methods)
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in cfg.lora_target_modules if t not in names]
        if missing:
            raise AlignRLError(f"lora_target_modules: {missing[0]!r} is not a module name of this model")
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules)  # fmt: skip
        model = get_peft_model(model, lora)
        for p in model.get_base_model().score.parameters():
            p.requires_grad_(True)
    model.train()
    return model, tok


@loop.ends_run
def train(cfg: RMConfig) -> Path:
    """Train a reward model; returns the final model directory (loadable with AutoModelForSequenceClassification)."""
    run = loop.start_run(cfg)
    model, tok = load_model(cfg, run.device)
    scorer = loop.wrap_policy(run, model, reward_scores)  # DDP / FSDP under torchrun; scores go through it
    train_ex, eval_ex, skipped = load_pairs(cfg, tok, add_eos=rm_add_eos(tok))
    pad = tok.pad_token_id
    opt = loop.build_optimizer(model, cfg)

    def part_loss(part: list[PreferenceExample]) -> tuple[torch.Tensor, dict[str, float]]:
        with loop.autocast(cfg, run.device):
            rc, rr = pair_rewards(scorer, part, pad, run.device)
        loss = bt_loss(cfg, part, rc, rr)  # mean over this part's pairs
        acc: dict[str, float] = {}
        _add_stats(acc, loss, rc, rr)
        return loss * len(part), acc

    pairs = (train_ex, eval_ex, skipped)
    return train_pairs(run, scorer, model, tok, opt, pairs, part_loss, _STAT_KEYS, evaluate_pairs)
