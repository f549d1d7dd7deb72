"""Reward models: last-non-pad scoring with left/right padding, Bradley–Terry training raises held-out pair
accuracy, the saved model loads with plain transformers and gives the training scores, RM as a reward function."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignrl.config import load_config
from alignrl.data import PreferenceExample, encode, pad_batch, write_jsonl
from alignrl.models import load_tokenizer
from alignrl.rewards import RewardFunctions
from alignrl.rewards.reward_model import RewardModelScorer, load_reward_model, reward_scores
from alignrl.trainers import rm


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _seqs(tok):
    return [encode(tok, t) + [tok.eos_token_id] for t in ("1+1=2", "hello there", "x", "12+30=42;ok")]


def test_scores_read_last_token_with_left_and_right_padding(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_reward_model(tiny_model, tok.pad_token_id).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    seqs = _seqs(tok)
    with torch.no_grad():
        single = torch.cat([reward_scores(model, *pad_batch([s], tok.pad_token_id, "cpu")) for s in seqs])
        right = reward_scores(model, *pad_batch(seqs, tok.pad_token_id, "cpu"))
        left = reward_scores(model, *pad_batch(seqs, tok.pad_token_id, "cpu", left=True))
        ids, mask = pad_batch(seqs, tok.pad_token_id, "cpu")
        hf = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # transformers' own pooling
    torch.testing.assert_close(right, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf, single, atol=1e-5, rtol=0)
    assert single.std() > 0


def _data(tmp_path):
    # prefer a polite answer over a rude one; margin column on some rows
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b} please", "rejected": f"{a + b + 1 + (a % 3)} no"}
            for a in range(12) for b in range(6)]  # fmt: skip
    for r in rows[::5]:
        r["margin"] = 0.5
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    return str(tmp_path / "pairs.jsonl")


def _cfg(tiny_model, tmp_path, *extra):
    return load_config(rm.RMConfig, None, [
        f"model={tiny_model}", f"train_file={_data(tmp_path)}", f"output_dir={tmp_path / 'run'}",
        "eval_fraction=0.25", "batch_size=16", "learning_rate=3e-3", "max_steps=2", "progress_bar=false", *extra,
    ])  # fmt: skip


def test_rm_learns_and_saved_model_loads_with_transformers(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, "max_steps=20", "center_rewards_coefficient=0.01", "eval_steps=10")
    final = rm.train(cfg)
    rows = _metrics(tmp_path / "run")
    first, last = rows[0], rows[-1]
    for k in ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected", "grad_norm"):
        assert k in rows[1], k
    assert last["eval_accuracy"] >= 0.9 > first["eval_accuracy"] and last["eval_loss"] < first["eval_loss"]
    # plain transformers: same scores as the trainer's scoring path on the eval pairs
    tok = load_tokenizer(str(final))
    loaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
    ex = [PreferenceExample(encode(tok, f"{a}+4="), encode(tok, str(a + 4)) + [tok.eos_token_id],
                            encode(tok, str(a + 5)) + [tok.eos_token_id]) for a in range(8)]  # fmt: skip
    with torch.no_grad():
        rc, rr = rm.pair_rewards(loaded, ex, tok.pad_token_id, "cpu")
        ids, mask = pad_batch([e.prompt_ids + e.chosen_ids for e in ex], tok.pad_token_id, "cpu")
        hf = loaded(input_ids=ids, attention_mask=mask).logits[:, 0]
        ids_l, mask_l = pad_batch([e.prompt_ids + e.chosen_ids for e in ex], tok.pad_token_id, "cpu", left=True)
        rc_left = reward_scores(loaded, ids_l, mask_l)
    torch.testing.assert_close(hf, rc, atol=1e-5, rtol=0)
    torch.testing.assert_close(rc_left, rc, atol=1e-5, rtol=0)
    # eval accuracy recomputed from the saved model matches the logged one
    from alignrl.trainers.dpo import load_pairs

    _, eval_ex, _ = load_pairs(cfg, tok)
    assert rm.evaluate_pairs(loaded, eval_ex, tok.pad_token_id, "cpu", cfg)["eval_accuracy"] == pytest.approx(
        last["eval_accuracy"]
    )

    # the saved directory is a reward function, mixed with a python one by weight
    scorer = RewardModelScorer(str(final), device="cpu", batch_tokens=12)  # several batches
    prompts, comps = ["1+2=", "3+4=", "5+5=", "1+2="], ["3", "7", "10", "4"]
    got = scorer(prompts, comps, [[0]] * 4)
    seqs = [encode(tok, p + c) + [tok.eos_token_id] for p, c in zip(prompts, comps)]
    with torch.no_grad():
        want = loaded(*pad_batch(seqs, tok.pad_token_id, "cpu")).logits[:, 0].tolist()
    assert got == pytest.approx(want, abs=1e-5)
    p = tmp_path / "r.py"
    p.write_text("def one(prompts, completions, completion_ids, **kw):\n    return [1.0] * len(completions)\n")
    fns = RewardFunctions([str(final), f"{p}:one"], [2.0, 0.5], {"prompt"}, "d")
    assert fns.names == ["run", "one"]
    raw = fns.score(prompts, comps, [[0]] * 4, {})
    assert raw[:, 0].tolist() == pytest.approx(want, abs=1e-5)
    assert fns.combine(raw).tolist() == pytest.approx([2 * w + 0.5 for w in want], abs=1e-4)


def test_rm_lora_and_margin(tiny_model, tmp_path):
    final = rm.train(_cfg(tiny_model, tmp_path, "lora_r=4", "use_margin=true"))
    before = load_reward_model(tiny_model, 0).model.state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(final).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(tmp_path / "run")[1:])


def test_bt_loss_uses_margin_column():
    cfg = rm.RMConfig(center_rewards_coefficient=0.0)
    ex = [PreferenceExample([1], [2], [3], margin=1.0), PreferenceExample([1], [2], [3], margin=None)]
    rc, rr = torch.tensor([0.5, 0.2]), torch.tensor([0.0, 0.4])
    ls = torch.nn.functional.logsigmoid
    want = -(ls(torch.tensor(0.5 - 1.0)) + ls(torch.tensor(-0.2))) / 2
    assert float(rm.bt_loss(cfg, ex, rc, rr)) == pytest.approx(float(want), rel=1e-6)
    cfg.use_margin = False
    assert float(rm.bt_loss(cfg, ex, rc, rr)) == pytest.approx(
        float(-(torch.nn.functional.logsigmoid(rc - rr)).mean()), rel=1e-6
    )


def test_grpo_with_reward_model(tiny_model, tmp_path):
    from alignrl.trainers import grpo

    rm_dir = rm.train(_cfg(tiny_model, tmp_path, "max_steps=1"))
    write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(4)])
    cfg = load_config(grpo.GRPOConfig, None, [
        f"model={tiny_model}", f"train_file={tmp_path / 'rl.jsonl'}", f"output_dir={tmp_path / 'g'}",
        f"reward_funcs=[{rm_dir}, gsm8k]", "reward_weights=[1.0, 0.5]", "prompts_per_step=2", "num_generations=2",
        "max_completion_length=4", "max_steps=1", "progress_bar=false",
    ])  # fmt: skip
    grpo.train(cfg)
    m = _metrics(tmp_path / "g")[-1]
    assert "rewards/run/mean" in m and "rewards/gsm8k/mean" in m
