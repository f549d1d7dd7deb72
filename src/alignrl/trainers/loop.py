"""Pieces every trainer's loop is built from: run setup, optimiser and schedule, the update step, metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignrl.config import TrainConfig, save_config
from alignrl.errors import AlignRLError
from alignrl.models import (
    DTYPES,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    save_pretrained_atomic,
)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """What a trainer needs about its run: config, device, output directory, metrics sink."""

    cfg: TrainConfig
    device: torch.device
    out: Path
    metrics: MetricsLogger
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def start_run(cfg: TrainConfig) -> Run:
    """Seed, configure threads and device, create the output directory and save the resolved config there."""
    set_seed(cfg.seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return Run(cfg=cfg, device=device, out=out, metrics=MetricsLogger(out, cfg.max_steps, cfg.progress_bar))


def load_policy(cfg: TrainConfig, device: torch.device, *, rl: bool) -> tuple[nn.Module, Any]:
    """Load the trainable model (optionally LoRA-wrapped) and its tokenizer; RL turns dropout off."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = load_causal_lm(cfg.model, cfg.dtype, device)
    if rl:
        disable_dropout(model)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    model.train()
    return model, tokenizer


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for forward passes when configured, else a no-op."""
    if cfg.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.autocast])


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise AlignRLError("model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        foreach=True,
    )


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_updates: int):
    """Linear warmup, then constant, linear decay to 0, or cosine decay to 0."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_updates - warm)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, sched, cfg: TrainConfig) -> dict[str, float]:
    """Clip gradients, step optimiser and schedule; a non-finite gradient norm skips the update."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(
        params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    )
    finite = bool(torch.isfinite(norm))
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return {"grad_norm": float(norm), "lr": sched.get_last_lr()[0], "skipped_update": float(not finite)}


class MetricsLogger:
    """One JSON line of metrics per step in OUTPUT_DIR/metrics.jsonl, plus an optional progress bar."""

    def __init__(self, out: Path, total: int, progress: bool):
        self.path = out / "metrics.jsonl"
        self.samples_path = out / "samples.jsonl"
        self.path.write_text("")
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="train", dynamic_ncols=True, leave=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "reward", "eval_loss", "kl")}
            self.bar.set_postfix(shown)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        with self.samples_path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def finish(run: Run, model: nn.Module, tokenizer: Any) -> Path:
    """Write the final model as an HF directory in OUTPUT_DIR/final/ (atomically)."""
    run.metrics.close()
    final = run.out / "final"
    save_pretrained_atomic(model, tokenizer, final)
    return final


class Timer:
    """Accumulate wall time of named phases within a step."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))
