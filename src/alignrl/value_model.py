"""The PPO critic: a scalar value per token from a transformer trunk and a linear head.

Two shapes:
- a separate value model: an ``AutoModelForSequenceClassification`` (one label) whose trunk runs over the
  sequence and whose ``score`` head is applied at every position (as TRL's PPO did). Initialised from a
  reward-model directory (trunk and head kept) or from a causal LM such as the policy (trunk copied, head
  zero-initialised). Saved with ``save_pretrained`` it is itself a reward-model-shaped directory.
- a value head sharing the policy's trunk: a zero-initialised linear layer on the hidden states the
  log-prob forward already computes (captured with a forward hook, so one trunk pass gives both).

V_t is read at the hidden state *before* completion token t (the state the token is sampled from), the
same position the log-prob path uses, so values, log-probs and per-token rewards line up index for index.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from alignrl import distributed as dist
from alignrl.errors import AlignRLError
from alignrl.logprobs import needed_span, position_ids_from_mask
from alignrl.models import (
    DTYPES,
    check_model_dir,
    disable_dropout,
    enable_activation_checkpointing,
    model_load_errors,
    resolve_model_path,
    unwrap,
)


def is_reward_model_dir(path: str | Path) -> bool:
    """True when `path` is an HF directory of a sequence-classification (reward) model."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def _trunk(model: nn.Module) -> nn.Module:
    lm = unwrap(model)
    trunk = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if not isinstance(trunk, nn.Module):
        raise AlignRLError(f"{type(lm).__name__}: cannot find its transformer trunk (base_model_prefix)")
    return trunk


class ValueModel(nn.Module):
    """V[b, t] = head(trunk(x)[b, t]): a one-label sequence-classification model applied at every position."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise AlignRLError(
                f"value model: {type(model).__name__} has no one-output linear `score` head (need num_labels=1)"
            )
        self.head = head
        self.trunk = _trunk(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values [B, L] (float32) at every position."""
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def load_value_model(path: str, dtype: str = "float32", device: torch.device | str = "cpu") -> ValueModel:
    """A trainable critic from a reward-model directory (head kept) or a causal LM directory (head zeroed)."""
    path = resolve_model_path(path, "value_model")
    check_model_dir(path, "value_model")
    from_rm = is_reward_model_dir(path)
    with model_load_errors(path, "value_model"):
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=DTYPES[dtype], local_files_only=True
            )
        except ValueError as e:
            raise AlignRLError(
                f"value_model: {path}: no sequence-classification variant of this model ({e})"
            ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    vm = ValueModel(model)
    if not from_rm:
        with torch.no_grad():
            vm.head.weight.zero_()
            if vm.head.bias is not None:
                vm.head.bias.zero_()
    disable_dropout(model)
    return vm.to(device).train()


def token_values(
    critic: ValueModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    start: int,
    target_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Values of the states before tokens start.. : V[b, j] = V(x_{<start+j}); shape [B, L - start]. With
    `target_mask` [B, L - start], only the columns its targets need run (`needed_span`); later values are 0."""
    if target_mask is None:
        return critic(input_ids, attention_mask)[:, start - 1 : -1]
    first, end = needed_span(attention_mask, target_mask, start)
    return _at_targets(critic(input_ids[:, first:end], attention_mask[:, first:end]), first, end, start, target_mask)


def _at_targets(values: torch.Tensor, first: int, end: int, start: int, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-position values [B, end - first] of the input columns [first, end) (`needed_span`) -> the values of the
    states before each target [B, L - start], 0 after the last kept one."""
    values = values[:, start - 1 - first : end - 1 - first]
    return F.pad(values, (0, target_mask.shape[1] - values.shape[1]))


class ValueHead(nn.Module):
    """A zero-initialised linear value head on the policy's hidden states (the shared-trunk critic)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


@contextlib.contextmanager
def captured_hidden(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, every forward of `model`'s trunk appends its last hidden state [B, L, H] to the list."""
    store: list[torch.Tensor] = []

    def hook(_module, _args, output) -> None:
        store.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = _trunk(model).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def values_from_logprob_pass(
    head: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor, *, start: int
) -> torch.Tensor:
    """Shared-trunk values [B, L - start] from the last hidden states [B, end - first, H] of the `token_logprobs`
    forward that just ran over the same batch, which covered only the columns `needed_span` keeps; zero after
    the last selected target (those positions are masked)."""
    first, end = needed_span(attention_mask, target_mask, start)
    return _at_targets(head(hidden), first, end, start, target_mask)


def shared_values(model: nn.Module, head: ValueHead, input_ids, attention_mask, *, start: int) -> torch.Tensor:
    """Shared-trunk values [B, L - start] from one trunk forward of the policy (no lm head)."""
    hidden = _trunk(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state
    return head(hidden[:, start - 1 : -1])


class Critic:
    """Values for the states before completion tokens, from a separate value model or a head on the policy.

    `wrapped` is the module the trainer computes with: the value model inside a `ForwardFn` of `token_values`
    (or the shared head), DDP- or FSDP2-wrapped under torchrun like the policy; `module` is the plain one."""

    def __init__(self, cfg: Any, policy: nn.Module, device: torch.device):
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
        from alignrl.models import save_pretrained_atomic

        if self.value_model is None:
            if dist.is_main():
                torch.save(self.module.state_dict(), out / "value_head.pt")
            dist.barrier()
            return
        sd = dist.full_state_dict(self.wrapped)  # FSDP: gathered; keys of the ValueModel
        if dist.is_main():
            hf = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
            save_pretrained_atomic(self.value_model.model, tokenizer, out / "value_model", state_dict=hf)
        dist.barrier()
