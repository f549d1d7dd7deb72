"""First-step loss equivalence at equal weights and inputs: alignrl's loss functions vs TRL's own loss code."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from alignrl.algos.kl import kl_estimate
from alignrl.algos.policy_loss import aggregate_loss, clipped_policy_loss
from alignrl.data import load_preference_examples, load_rows, pad_batch
from alignrl.generation import SamplingParams, generate
from alignrl.logprobs import token_logprobs
from alignrl.models import load_causal_lm, load_tokenizer


def grpo_losses(model_dir: str, data: str, beta: float = 0.04, G: int = 4, length: int = 16) -> tuple[float, float]:
    """(alignrl loss, TRL loss) for one fixed GRPO batch: token_mean ↔ TRL loss_type 'dapo', k3 KL, ε = 0.2."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bench.setup import digit_reward

    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).train()
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is not zero
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()][:2]
    ids, mask = pad_batch([tok(r["prompt"]).input_ids for r in rows for _ in range(G)], tok.pad_token_id, left=True)
    ro = generate(model, ids, mask, SamplingParams(length, temperature=0.9), [tok.eos_token_id], tok.pad_token_id)
    P = ids.shape[1]
    adv = torch.randn(ids.shape[0])
    m = ro.completion_mask.float()
    with torch.no_grad():
        old, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=P, temperature=0.9)
        ref_lp, _ = token_logprobs(ref, ro.input_ids, ro.attention_mask, ro.completion_mask, start=P, temperature=0.9)
    # alignrl: the same calls as trainers/grpo.py
    logp, _ = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask, start=P, temperature=0.9)
    per_tok, _ = clipped_policy_loss(logp, old, adv, m, eps_low=0.2, eps_high=0.2)
    per_tok = per_tok + beta * kl_estimate(logp, ref_lp, "k3")
    ours = aggregate_loss(per_tok, m, "token_mean", num_tokens=m.sum(), num_seqs=m.shape[0])
    # TRL: its trainer's own loss on the same tensors
    args = GRPOConfig(
        output_dir="/tmp/alignrl_bench_equiv",
        per_device_train_batch_size=ids.shape[0],
        num_generations=G,
        max_completion_length=length,
        temperature=0.9,
        beta=beta,
        loss_type="dapo",
        epsilon=0.2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_dropout=True,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=digit_reward, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    trainer.current_gradient_accumulation_steps = 1
    inputs = {
        "prompt_ids": ids,
        "prompt_mask": mask,
        "completion_ids": ro.completion_ids,
        "completion_mask": ro.completion_mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref_lp,
        "num_items_in_batch": m.sum(),
    }
    theirs = trainer._compute_loss(trainer.model, inputs)
    return float(ours.detach()), float(theirs.detach())


def dpo_losses(model_dir: str, pairs: str, beta: float = 0.1, n: int = 4) -> tuple[float, float]:
    """(alignrl loss, TRL loss) for one fixed DPO batch (sigmoid loss) with a reference that differs from the policy."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignrl.trainers import dpo

    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).train()
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = [json.loads(line) for line in Path(pairs).read_text().splitlines()][:n]
    cfg = dpo.DPOConfig(model=model_dir, train_file=pairs, beta=beta, max_length=4096)
    examples, _ = load_preference_examples(load_rows(pairs).subset(range(n)), tok, cfg.max_length, "error", True)
    with torch.no_grad():
        rc, rr = dpo.pair_logps(ref, examples, tok.pad_token_id, "cpu")
    for e, c, r in zip(examples, rc.tolist(), rr.tolist()):
        e.ref_chosen_logp, e.ref_rejected_logp = c, r
    pc, pr = dpo.pair_logps(model, examples, tok.pad_token_id, "cpu")
    ours = dpo.pair_losses(cfg, examples, pc, pr)[0].mean()
    args = DPOConfig(
        output_dir="/tmp/alignrl_bench_equiv_dpo", per_device_train_batch_size=n, beta=beta, loss_type=["sigmoid"],
        max_length=4096, report_to="none", use_cpu=True, bf16=False, disable_dropout=True,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model, batch)
    return float(ours.detach()), float(theirs.detach())
