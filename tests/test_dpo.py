"""DPO trainer: concatenated log-probs equal separate forwards, the first step is at h = 0 (loss ln 2),
training raises held-out preference accuracy, every loss type runs, reference-free types skip the reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignrl.cli import main
from alignrl.config import load_config
from alignrl.data import PreferenceExample, encode, write_jsonl
from alignrl.errors import AlignRLError
from alignrl.logprobs import token_logprobs
from alignrl.models import load_causal_lm, load_tokenizer
from alignrl.trainers import dpo


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _pairs(tok, n=6):
    eos = [tok.eos_token_id]
    out = []
    for i in range(n):
        p = encode(tok, f"{i}+{i * 7}=" + "x" * (i % 3))
        out.append(PreferenceExample(p, encode(tok, str(8 * i) * (1 + i % 2)) + eos, encode(tok, "no" * (i + 1)) + eos))
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_concatenated_logps_equal_separate_forwards(tiny_model, padding_side):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    pairs = _pairs(tok)
    with torch.no_grad():
        pc, pr = dpo.pair_logps(model, pairs, tok.pad_token_id, "cpu", padding_side=padding_side)
        for i, e in enumerate(pairs):
            for comp, got in ((e.chosen_ids, pc[i]), (e.rejected_ids, pr[i])):
                ids = torch.tensor([e.prompt_ids + comp])
                target = torch.zeros(1, ids.shape[1] - 1, dtype=torch.long)
                target[0, len(e.prompt_ids) - 1 :] = 1
                logp, _ = token_logprobs(model, ids, torch.ones_like(ids), target, start=1)
                assert abs(float(logp.sum()) - float(got)) < 1e-5 * max(1.0, abs(float(got)))
    assert pc.dtype == torch.float32 and pc.shape == (len(pairs),)


def _data(tmp_path, n=60):
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1) + "0"}
            for a in range(n // 6) for b in range(6)]  # fmt: skip
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    return str(tmp_path / "pairs.jsonl")


def _cfg(tiny_model, tmp_path, *extra):
    return load_config(dpo.DPOConfig, None, [
        f"model={tiny_model}", f"train_file={_data(tmp_path)}", f"output_dir={tmp_path / 'run'}",
        "eval_fraction=0.2", "batch_size=8", "learning_rate=1e-3", "max_steps=2", "progress_bar=false", *extra,
    ])  # fmt: skip


def test_dpo_starts_at_ln2_and_learns_preferences(tiny_model, tmp_path):
    dpo.train(_cfg(tiny_model, tmp_path, "max_steps=12", "beta=0.5"))
    rows = _metrics(tmp_path / "run")
    first, step1, last = rows[0], rows[1], rows[-1]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["eval_rewards/accuracies"] == 0.0  # rewards all 0: policy = reference
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step1["rewards/margins"] == pytest.approx(0, abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "loss", "grad_norm", "skipped_rows"):  # fmt: skip
        assert k in step1, k
    assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_loss"] < 0.5 * math.log(2)
    assert last["eval_rewards/margins"] > 0 and last["eval_logps/chosen"] > first["eval_logps/chosen"]


@pytest.mark.parametrize(
    "extra",
    [("loss_type=ipo",), ("loss_type=hinge",), ("loss_type=robust", "label_smoothing=0.1"),
     ("label_smoothing=0.2", "gradient_accumulation_steps=2"), ("loss_type=simpo", "beta=2.0"),
     ("loss_type=orpo",), ("lora_r=4",)],
)  # fmt: skip
def test_loss_types_run_and_change_the_model(tiny_model, tmp_path, monkeypatch, extra):
    calls = []
    real = dpo.cache_reference_logps
    monkeypatch.setattr(dpo, "cache_reference_logps", lambda *a: calls.append(1) or real(*a))
    cfg = _cfg(tiny_model, tmp_path, *extra)
    final = dpo.train(cfg)
    assert bool(calls) == (cfg.loss_type not in ("simpo", "orpo"))  # reference-free types skip the pass
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows[1:])
    before, after = load_causal_lm(tiny_model).state_dict(), load_causal_lm(str(final)).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if cfg.loss_type == "ipo":
        assert rows[1]["loss"] == pytest.approx(1 / (4 * cfg.beta**2), rel=1e-4)  # h = 0 at the first step


def test_ref_model_option(tiny_model, tmp_path):
    from alignrl.models import init_model

    other = init_model(tmp_path / "other", hidden_size=32, num_layers=2, num_heads=2, max_length=64, seed=1)
    dpo.train(_cfg(tiny_model, tmp_path, f"ref_model={other}", "max_steps=1"))
    assert _metrics(tmp_path / "run")[1]["loss"] != pytest.approx(math.log(2), abs=1e-3)


def test_config_errors(tiny_model, tmp_path):
    with pytest.raises(AlignRLError, match="label_smoothing"):
        _cfg(tiny_model, tmp_path, "loss_type=hinge", "label_smoothing=0.1")
    with pytest.raises(AlignRLError, match="reference-free"):
        _cfg(tiny_model, tmp_path, "loss_type=simpo", f"ref_model={tiny_model}")
    with pytest.raises(AlignRLError, match="beta"):
        _cfg(tiny_model, tmp_path, "beta=0")


def test_cli_train_dpo_and_bad_row_option(tiny_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "q", "chosen": "a", "rejected": "a"}]
    write_jsonl(data, rows)
    args = ["train", "dpo", f"model={tiny_model}", f"train_file={data}", f"output_dir={tmp_path / 'o'}",
            "max_steps=1", "progress_bar=false"]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"alignrl: error: {data} line 2: chosen and rejected are identical (set on_bad_row=skip to skip such rows)"
    )
    assert main([*args, "on_bad_row=skip"]) == 0
    assert _metrics(tmp_path / "o")[0]["skipped_rows"] == 1
