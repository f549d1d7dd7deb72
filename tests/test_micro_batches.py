"""Token-budget micro-batches (micro_batch_tokens): the split keeps padded tokens per pass within the budget, and
for every trainer a step split into several passes makes the same update as one whole-batch pass."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from alignrl.config import load_config
from alignrl.data import (
    ACTIVATION_BYTES,
    MICRO_BATCH_TOKENS,
    MIN_PASS_ROWS,
    ONE_PASS_TOKENS,
    split_by_tokens,
    write_jsonl,
)
from alignrl.errors import AlignRLError
from alignrl.trainers import dpo, grpo, loop, ppo, rm


def test_split_by_tokens_keeps_each_micro_batch_within_the_budget():
    lengths = [5, 3, 9, 3, 7, 1, 9, 2]
    parts = split_by_tokens(lengths, budget=18)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    flat = [i for p in parts for i in p]
    assert [lengths[i] for i in flat] == sorted(lengths)  # by length, ties in order
    assert flat.index(1) < flat.index(3) and flat.index(2) < flat.index(6)
    for p in parts:
        assert len(p) * max(lengths[i] for i in p) <= 18
    # greedy: a micro-batch is only closed when the next item would not fit
    assert [[lengths[i] for i in p] for p in parts] == [[1, 2, 3, 3], [5, 7], [9, 9]]
    assert split_by_tokens(lengths, budget=0) == [sorted(range(8), key=lambda i: lengths[i])]
    assert [len(p) for p in split_by_tokens(lengths, budget=0, max_items=3)] == [3, 3, 2]
    assert [len(p) for p in split_by_tokens(lengths, budget=36, rows_per_item=2)] == [4, 2, 2]  # pairs: 2 rows each
    with pytest.raises(AlignRLError, match="micro_batch_tokens: 8 is less than one item of 9 tokens"):
        split_by_tokens(lengths, budget=8)


def test_default_budget_fits_the_longest_sequence_the_options_allow():
    cfg = grpo.GRPOConfig(model="m")
    assert loop.token_budget(cfg, 768) == MICRO_BATCH_TOKENS
    assert loop.token_budget(cfg, 10_000) == 10_000  # long completions: one sequence per pass at least
    cfg.micro_batch_tokens = 0
    assert loop.token_budget(cfg, 10_000) == 0  # no limit


def test_default_budget_puts_several_long_rows_in_a_pass_where_the_activation_room_holds_them():
    """Long rows go MIN_PASS_ROWS (8) to a pass, not one or two to a 1024-token pass (a pass has a fixed cost), as
    far as the model's activation room allows; a preference pair counts as two rows; short rows keep 1024-token
    passes; a row always fits."""
    cfg = grpo.GRPOConfig(model="m")
    roomy, tight = loop.PassTokens(1024, 2048, room=8600), loop.PassTokens(872, 872, room=872)
    assert MIN_PASS_ROWS == 8
    assert loop.token_budget(cfg, 529, roomy) == 8 * 529
    assert loop.token_budget(cfg, 2 * 529, roomy, rows_per_item=2) == 8 * 529  # four pairs
    assert loop.token_budget(cfg, 529, loop.PassTokens(1024, 2048, room=3486)) == 3486  # 6 rows: the room's limit
    assert loop.token_budget(cfg, 100, roomy) == 1024  # short rows: the 1024-token passes
    assert loop.token_budget(cfg, 529, tight) == 872 and loop.token_budget(cfg, 2000, tight) == 2000
    assert loop.token_budget(cfg, 529) == 1024  # no model facts: no room known beyond the constant
    cfg.micro_batch_tokens = 600
    assert loop.token_budget(cfg, 529, roomy) == 600  # a set budget is the limit
    budget = loop.token_budget(grpo.GRPOConfig(model="m"), 529, roomy)
    assert [len(p) for p in split_by_tokens([529] * 32, budget)] == [8] * 4


def test_default_budget_runs_small_work_in_one_pass_and_splits_large_work_finely():
    """Unset micro_batch_tokens: work of up to ONE_PASS_TOKENS (2048) padded tokens is one pass, larger work runs
    in passes of at most MICRO_BATCH_TOKENS (1024); a set budget is the limit of every pass."""
    assert (MICRO_BATCH_TOKENS, ONE_PASS_TOKENS) == (1024, 2048)
    small = [100] * 20  # 2000 padded tokens
    assert split_by_tokens(small, MICRO_BATCH_TOKENS, one_pass=ONE_PASS_TOKENS) == [list(range(20))]
    assert [len(p) for p in split_by_tokens(small, MICRO_BATCH_TOKENS)] == [10, 10]
    large = [60] * 30 + [100] * 6  # 3600 padded tokens as one pass
    parts = split_by_tokens(large, MICRO_BATCH_TOKENS, one_pass=ONE_PASS_TOKENS)
    assert [len(p) for p in parts] == [17, 13, 6]  # 17 × 60 ≤ 1024; the longest rows last
    assert [len(p) for p in split_by_tokens(small, 0, max_items=8, one_pass=ONE_PASS_TOKENS)] == [8, 8, 4]
    pairs = [100] * 10  # rows_per_item=2: 2000 padded tokens
    assert len(split_by_tokens(pairs, MICRO_BATCH_TOKENS, rows_per_item=2, one_pass=ONE_PASS_TOKENS)) == 1
    cfg = grpo.GRPOConfig(model="m")
    assert loop.one_pass_tokens(cfg) == ONE_PASS_TOKENS
    cfg.micro_batch_tokens = 4096
    assert loop.one_pass_tokens(cfg) == 0


def test_default_budget_holds_an_episode_longer_than_prompt_plus_completion():
    """Multi-turn rows (first prompt + whole episode) can be longer than max_prompt_length + max_completion_length:
    the default budget is raised to the longest row instead of refusing it."""
    import torch

    cfg = grpo.GRPOConfig(model="m", max_prompt_length=256, max_completion_length=128)
    lengths = torch.tensor([1500, 300, 1200, 400, 1100, 200])  # 6 × 1500 = 9000 padded tokens as one pass
    parts = loop.rollout_micro_batches(torch.arange(6), lengths, cfg)
    assert sorted(int(i) for p, _ in parts for i in p) == list(range(6))
    assert all(len(p) * int(lengths[p].max()) <= 1500 for p, _ in parts)


def test_default_passes_hold_about_a_gib_of_the_models_activations():
    """The default budget is lowered for models with large activations per token (many layers, a large vocabulary):
    unchanged for the small bench models, ~280 tokens per pass for SmolLM2-135M (30 layers, vocabulary 49,152)."""
    import torch
    from transformers import LlamaConfig


    def holder(**sizes):
        m = torch.nn.Module()
        m.config = LlamaConfig(**sizes)
        return m

    cpu = torch.device("cpu")
    small = holder(hidden_size=256, num_hidden_layers=5, intermediate_size=1024, vocab_size=100)
    small_room = ACTIVATION_BYTES // loop.activation_bytes_per_token(small)
    assert loop.default_pass_tokens(small, cpu) == loop.PassTokens(MICRO_BATCH_TOKENS, ONE_PASS_TOKENS, small_room)
    smol = holder(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, vocab_size=49152)
    per_token = 4 * (6 * 30 * (576 + 1536) + 2 * 49152)
    assert loop.activation_bytes_per_token(smol) == per_token
    cap = ACTIVATION_BYTES // per_token
    assert loop.default_pass_tokens(smol, cpu) == loop.PassTokens(cap, cap, cap)
    assert loop.default_pass_tokens(torch.nn.Linear(2, 2), cpu) == loop.PassTokens()  # no config: the constants
    # a GRPO batch of 32 rows × 62 tokens (1984): one pass for the small model, passes of ≤ 280 tokens for SmolLM2
    cfg = grpo.GRPOConfig(model="m", max_prompt_length=30, max_completion_length=32)
    lengths = torch.full((32,), 62)
    assert len(loop.rollout_micro_batches(torch.arange(32), lengths, cfg, loop.default_pass_tokens(small, cpu))) == 1
    parts = loop.rollout_micro_batches(torch.arange(32), lengths, cfg, loop.default_pass_tokens(smol, cpu))
    assert len(parts) == 8 and all(len(p) * 62 <= 280 for p, _ in parts)


def test_models_without_an_lm_head_count_no_vocabulary_activations():
    """A reward (sequence-classification) model never computes vocabulary logits: its estimate leaves out 2·vocab,
    so SmolLM2's reward model gets ~1.2× SmolLM2's causal-LM pass (not its 280 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    sizes = dict(hidden_size=16, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2, vocab_size=5000)
    config = LlamaConfig(**sizes, num_labels=1, pad_token_id=0)
    body = 4 * 6 * 2 * (16 + 32)
    assert loop.activation_bytes_per_token(LlamaForCausalLM(config)) == body + 4 * 2 * 5000
    assert loop.activation_bytes_per_token(LlamaForSequenceClassification(config)) == body


def test_the_trainer_takes_its_default_passes_from_the_model(tiny_model, tmp_path, passes, monkeypatch):
    """With micro_batch_tokens unset the trainer splits by the model's activation estimate (ACTIVATION_BYTES made
    small here, so the tiny model's batch needs several passes) and still makes the whole-batch update."""
    cfg = _grpo_config(tiny_model, tmp_path)

    grpo.train(cfg(tmp_path / "whole", "micro_batch_tokens=0"))
    assert max(passes) == 1
    passes.clear()
    monkeypatch.setattr(loop, "ACTIVATION_BYTES", 0)  # a cap of one token: about a row per pass
    grpo.train(cfg(tmp_path / "default"))
    assert max(passes) > 8, passes
    whole, default = _metrics(tmp_path / "whole")[-1], _metrics(tmp_path / "default")[-1]
    for key in ("loss", "grad_norm", "kl"):
        assert default[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        (grpo.GRPOConfig, ["max_prompt_length=100", "max_completion_length=50", "micro_batch_tokens=120"],
         r"micro_batch_tokens: 120 is less than one prompt \+ completion of up to 150 tokens; raise it to ≥ 150"),
        (ppo.PPOConfig, ["reward_funcs=[x]", "micro_batch_tokens=100"], "micro_batch_tokens: 100 is less than one"),
        (dpo.DPOConfig, ["max_length=64", "micro_batch_tokens=100"],
         r"micro_batch_tokens: 100 is less than one chosen \+ rejected pair \(2 × max_length\) of up to 128"),
        (rm.RMConfig, ["max_length=64", "micro_batch_tokens=127"], "micro_batch_tokens: 127 is less than one"),
        (grpo.GRPOConfig, ["micro_batch_tokens=-1"], r"micro_batch_tokens: must be ≥ 0 \(0: no limit\), got -1"),
    ],
)  # fmt: skip
def test_a_budget_too_small_for_one_sequence_is_a_clear_error(config, overrides, message):
    with pytest.raises(AlignRLError, match=message):
        load_config(config, None, ["model=m", *overrides])


@pytest.fixture
def passes(monkeypatch):
    """Counts the micro-batches of every split a trainer makes."""
    counts: list[int] = []
    real = loop.token_micro_batches

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        counts.append(len(out))
        return out

    monkeypatch.setattr(loop, "token_micro_batches", spy)
    return counts


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_update(tmp_path, train, make_cfg, budget, passes, keys, weights=("final/model.safetensors",)):
    """Train once with no budget and once with `budget`; the metrics in `keys` and the saved weights agree.

    AdamW's first step moves a weight by lr·g/(|g| + eps): with the default eps (1e-8) a gradient element near
    zero turns float rounding into a move of up to lr, so the weights are compared at eps 1e-3, where the move
    stays linear in such gradients (and a wrong gradient still moves the weights by far more than 1e-5)."""
    runs = []
    for name, tokens in (("whole", 0), ("split", budget)):
        passes.clear()
        train(make_cfg(tmp_path / name, f"micro_batch_tokens={tokens}", "adam_epsilon=1e-3"))
        runs.append((_metrics(tmp_path / name)[-1], [load_file(str(tmp_path / name / w)) for w in weights]))
        assert max(passes) == 1 if tokens == 0 else max(passes) > 2, (name, passes)
    (whole, w_whole), (split, w_split) = runs
    for key in keys:
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(w_whole, w_split):
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def _grpo_config(tiny_model, tmp_path):
    """A one-step GRPO config maker (output dir, extra overrides) on sums, rewarding short completions."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    write_jsonl(tmp_path / "rl.jsonl", rows)
    (tmp_path / "r.py").write_text("def short(completions, **kw):\n    return [-float(len(c)) for c in completions]\n")

    def cfg(out, *extra):
        return load_config(grpo.GRPOConfig, None, [
            f"model={tiny_model}", f"train_file={tmp_path / 'rl.jsonl'}", f"output_dir={out}", "prompts_per_step=4",
            "num_generations=4", "max_completion_length=12", "max_prompt_length=8", "max_steps=1", "beta=0.04",
            "learning_rate=1e-3", f"reward_funcs=[{tmp_path / 'r.py'}:short]", "progress_bar=false", *extra,
        ])  # fmt: skip

    return cfg


def test_grpo_token_budget_makes_the_whole_batch_update(tiny_model, tmp_path, passes):
    cfg = _grpo_config(tiny_model, tmp_path)

    _same_update(tmp_path, grpo.train, cfg, 40, passes, ("loss", "grad_norm", "kl", "entropy", "clip/clipped"))
    assert 0 < _metrics(tmp_path / "whole")[-1]["truncation_rate"] < 1  # lengths differ: the split is uneven


def test_ppo_token_budget_makes_the_whole_batch_update_of_policy_and_critic(tiny_model, tmp_path, passes):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}="} for a in range(40)])
    (tmp_path / "r.py").write_text("def digits(completions, **kw):\n"
                                   "    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n")

    def cfg(out, *extra):
        return load_config(ppo.PPOConfig, None, [
            f"model={tiny_model}", f"train_file={tmp_path / 'p.jsonl'}", f"output_dir={out}", "max_steps=1",
            "prompts_per_step=4", "num_generations=2", "max_completion_length=8", "max_prompt_length=8",
            "num_mini_batches=2", "num_ppo_epochs=2", "learning_rate=1e-3", "missing_eos_penalty=0.0",
            f"reward_funcs=[{tmp_path / 'r.py'}:digits]", "progress_bar=false", *extra,
        ])  # fmt: skip

    keys = ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "val/clipfrac_avg", "objective/kl",
            "values/mean", "grad_norm")  # fmt: skip
    _same_update(tmp_path, ppo.train, cfg, 24, passes, keys,
                 weights=("final/model.safetensors", "value_model/model.safetensors"))  # fmt: skip


def _pair_cfg(config, tiny_model, tmp_path, *options):
    """A DPO / RM config maker on preference pairs of uneven lengths (one step, max_length 16)."""
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1) + "0" * (a % 4)}
            for a in range(8) for b in range(4)]  # fmt: skip
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = [f"model={tiny_model}", f"train_file={tmp_path / 'pairs.jsonl'}", "max_length=16", "max_steps=1",
              "learning_rate=1e-3", "progress_bar=false", *options]  # fmt: skip
    return lambda out, *extra: load_config(config, None, [*common, f"output_dir={out}", *extra])


def test_dpo_token_budget_makes_the_whole_batch_update(tiny_model, tmp_path, passes):
    cfg = _pair_cfg(dpo.DPOConfig, tiny_model, tmp_path, "batch_size=8", "gradient_accumulation_steps=2")
    _same_update(tmp_path, dpo.train, cfg, 64, passes, ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"))


def test_rm_token_budget_makes_the_whole_batch_update(tiny_model, tmp_path, passes):
    cfg = _pair_cfg(rm.RMConfig, tiny_model, tmp_path, "batch_size=16", "center_rewards_coefficient=0.01")
    _same_update(tmp_path, rm.train, cfg, 64, passes, ("loss", "grad_norm", "accuracy"))


def test_no_grad_passes_hold_at_most_one_pass_of_tokens():
    """Reference and evaluation passes (no grad) take at most eval_batch_size items and ONE_PASS_TOKENS padded
    tokens, one item at least: long pairs no longer run 32 at a time."""
    from alignrl.trainers import offline

    widths = [600] * 10 + [100] * 30 + [3000]
    batches = list(offline.no_grad_batches(widths, lambda w: w, 32, rows_per_item=2))
    assert sorted(w for b in batches for w in b) == sorted(widths)
    assert all(len(b) <= 32 and (len(b) == 1 or 2 * len(b) * max(b) <= ONE_PASS_TOKENS) for b in batches)
    assert [len(b) for b in batches][-2:] == [1, 1]  # 2 × 600 and 2 × 3000 tokens: one pair each
    assert [len(b) for b in offline.no_grad_batches([10] * 70, lambda w: w, 32)] == [32, 32, 6]
