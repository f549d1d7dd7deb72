"""`gradient_checkpointing=true`: every trainable model (policy, reward model, separate critic) recomputes its
decoder layers in backward and gets the gradients it gets without."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from alignrl.config import TrainConfig
from alignrl.data import pad_batch
from alignrl.errors import AlignRLError
from alignrl.logprobs import token_logprobs
from alignrl.models import enable_activation_checkpointing, unwrap
from alignrl.rewards.reward_model import reward_scores
from alignrl.trainers import loop, ppo, rm
from alignrl.value_model import Critic, token_values

IDS, MASK = pad_batch([[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]], 0, left=True)


def _policy(cfg):
    return loop.load_policy(cfg, torch.device("cpu"), rl=True)[0]


def _reward_model(cfg):
    return rm.load_model(rm.RMConfig(**dataclasses.asdict(cfg)), torch.device("cpu"))[0]


def _critic(cfg):
    pcfg = ppo.PPOConfig(**dataclasses.asdict(cfg), critic="separate", reward_funcs=["gsm8k"])
    vm = Critic(pcfg, nn.Linear(1, 1), torch.device("cpu")).value_model
    with torch.no_grad():  # a critic from a causal LM starts with a zero head: no gradient would reach the trunk
        vm.head.weight.normal_()
    return vm


MODELS = {
    "policy": (_policy, lambda m: token_logprobs(m, IDS, MASK, MASK[:, 2:], start=2)[0]),
    "reward_model": (_reward_model, lambda m: reward_scores(m, IDS, MASK)),
    "critic": (_critic, lambda m: token_values(m, IDS, MASK, start=2, target_mask=MASK[:, 2:])),
}


def _backward(model: nn.Module, score, autocast: bool):
    """Output, gradients and how many times the first decoder layer's attention ran in forward + backward."""
    layers = next(m for n, m in model.named_modules() if n.endswith("layers"))
    calls: list[int] = []
    hook = layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = score(model)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, len(calls)


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("autocast", [False, True])
def test_layers_are_recomputed_and_gradients_unchanged(tiny_model, which, autocast):
    load, score = MODELS[which]
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the same new score heads in both runs
        runs.append(_backward(load(TrainConfig(model=tiny_model, gradient_checkpointing=ckpt)), score, autocast))
    (out, grads, calls), (out_c, grads_c, calls_c) = runs
    assert (calls, calls_c) == (1, 2)  # the checkpointed layer ran again in backward
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    assert all(g.abs().sum() > 0 for g in grads.values())
    for n, g in grads.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-5, atol=1e-6 if not autocast else 1e-3, msg=n)


def test_off_by_default_and_clear_error_for_models_without_it(tiny_model):
    model = _policy(TrainConfig(model=tiny_model))
    assert not any(getattr(m, "gradient_checkpointing", False) for m in unwrap(model).modules())
    with pytest.raises(AlignRLError, match="gradient_checkpointing: Linear does not support"):
        enable_activation_checkpointing(nn.Linear(2, 2))  # type: ignore[arg-type]
