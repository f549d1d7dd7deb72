"""Integration: SFT lowers eval loss; GRPO steps change parameters and log reward metrics; CLI errors are one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignrl.cli import main
from alignrl.config import load_config
from alignrl.data import write_jsonl
from alignrl.trainers import grpo, sft


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_lowers_eval_loss_and_saves_loadable_model(tiny_model, tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = load_config(
        sft.SFTConfig,
        None,
        [
            f"model={tiny_model}",
            f"train_file={tmp_path / 'sft.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            "eval_fraction=0.2",
            "max_steps=30",
            "learning_rate=3e-3",
            "batch_size=16",
            "progress_bar=false",
        ],
    )
    final = sft.train(cfg)
    evals = [m["eval_loss"] for m in _metrics(tmp_path / "run") if "eval_loss" in m]
    assert len(evals) == 2 and evals[-1] < 0.7 * evals[0]
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.vocab_size > 90
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_sft_packing_and_messages(tiny_model, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"{a}?"}, {"role": "assistant", "content": str(a)}]}
        for a in range(20)
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = load_config(
        sft.SFTConfig,
        None,
        [
            f"model={tiny_model}",
            f"train_file={tmp_path / 'chat.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=3",
            "packing=true",
            "max_length=32",
            "progress_bar=false",
            "batch_size=4",
        ],
    )
    sft.train(cfg)
    assert len(_metrics(tmp_path / "run")) == 3


def _grpo_cfg(tiny_model, tmp_path, *extra):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    write_jsonl(tmp_path / "rl.jsonl", rows)
    return load_config(
        grpo.GRPOConfig,
        None,
        [
            f"model={tiny_model}",
            f"train_file={tmp_path / 'rl.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            "prompts_per_step=4",
            "num_generations=4",
            "max_completion_length=6",
            "max_steps=2",
            "learning_rate=1e-3",
            "progress_bar=false",
            *extra,
        ],
    )


def _length_reward_file(tmp_path):
    p = tmp_path / "r.py"
    p.write_text(
        "def short(prompts, completions, completion_ids, **kw):\n"
        "    return [-float(len(c)) for c in completions]\n"
    )
    return f"{p}:short"


@pytest.mark.parametrize(
    "extra",
    [
        (),
        (
            "beta=0.04",
            "kl_estimator=k3",
            "loss_aggregation=seq_mean_token_mean",
            "num_iterations=2",
            "micro_batch_size=5",
        ),
        (
            "importance_sampling=sequence",
            "scale_rewards=none",
            "loss_aggregation=seq_mean_token_sum_norm",
            "mask_truncated_completions=true",
            "epsilon_high=0.28",
            "overlong_cache=2",
        ),
        ("advantage_estimator=rloo", "dynamic_sampling=true", "lora_r=4", "beta=0.1"),
        ("autocast=bfloat16", "beta=0.04", "micro_batch_size=0"),  # bf16 sampling, bf16-weight reference
    ],
)
def test_grpo_steps_change_parameters_and_log_rewards(tiny_model, tmp_path, extra):
    reward = _length_reward_file(tmp_path)
    cfg = _grpo_cfg(
        tiny_model, tmp_path, f"reward_funcs=[gsm8k, {reward}]", "reward_weights=[1.0, 0.1]", *extra
    )
    before = load_file(f"{tiny_model}/model.safetensors")
    final = grpo.train(cfg)
    after = load_file(f"{final}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2
    m = rows[-1]
    for key in (
        "reward",
        "reward_std",
        "rewards/gsm8k/mean",
        "rewards/short/mean",
        "advantages/std",
        "completion_length/mean",
        "truncation_rate",
        "entropy",
        "clip/clipped",
        "step_time",
    ):
        assert key in m, key
    assert m["rewards/short/mean"] == -m["completion_length/mean"] or m["rewards/short/mean"] <= 0
    if "beta=0.04" in extra or "beta=0.1" in extra:
        assert m["kl"] >= 0
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert samples and "completion" in json.loads(samples[0])


def test_cli_errors_are_one_line(tiny_model, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model}\nnum_generation: 4\n")
    assert main(["train", "grpo", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'num_generation'" in err and "c.yaml" in err

    p = tmp_path / "r.py"
    p.write_text("def boom(prompts, completions, completion_ids, **kw):\n    raise RuntimeError('nope')\n")
    rc = main(
        [
            "train",
            "grpo",
            f"model={tiny_model}",
            f"output_dir={tmp_path / 'o'}",
            f"train_file={_grpo_cfg(tiny_model, tmp_path).train_file}",
            f"reward_funcs=[{p}:boom]",
            "max_steps=1",
            "max_completion_length=2",
            "progress_bar=false",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "alignrl: error: reward function boom raised RuntimeError: nope"


def test_init_model_cli(tmp_path, capsys):
    assert (
        main(
            [
                "init-model",
                "--out",
                str(tmp_path / "m"),
                "--hidden-size",
                "16",
                "--layers",
                "1",
                "--heads",
                "2",
            ]
        )
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    assert main(["init-model", "--out", str(tmp_path / "x"), "--hidden-size", "15", "--heads", "2"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_hold_freed_memory_reuses_freed_pages_and_hands_them_back_when_off():
    """glibc's default maps a large tensor afresh at every allocation (a page fault per 4 KiB page); with freed
    memory held, a tensor freed and allocated again reuses the same pages (almost no faults); turned off, the held
    pages go back to the OS. In a fresh interpreter, so the test process's own heap does not interfere."""
    import subprocess
    import sys

    from alignrl.trainers import loop

    if loop._GLIBC is None:
        pytest.skip("not glibc")
    code = """
import resource, torch
from alignrl.trainers import loop
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) // 1024
def faults_of_a_new_tensor():
    x = torch.empty(2**24); x.fill_(1.0); del x  # 64 MiB: above glibc's mmap threshold
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(2**24); y.fill_(1.0); del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
default = faults_of_a_new_tensor()
loop.hold_freed_memory()
faults_of_a_new_tensor()  # the heap grows to hold the pair (a small allocation may sit where the first was)
held = faults_of_a_new_tensor()
before = rss()
loop.hold_freed_memory(False)
print(default, held, before - rss(), faults_of_a_new_tensor())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    default, held, handed_back, default_again = (int(v) for v in out)
    pages = 2**26 // 4096
    assert default > 0.9 * pages and default_again > 0.9 * pages, (default, default_again)
    assert held < 0.02 * pages, held
    assert handed_back > 48, handed_back  # MiB


def test_grpo_micro_batches_of_trimmed_similar_lengths_make_the_whole_batch_update(tiny_model, tmp_path):
    """Micro-batches group sequences by completion length and each runs only as wide as it needs; with the
    global normalisers the step's loss and gradient norm equal one whole-batch pass (same rollouts: the
    sampling is keyed by seeds). The completions must differ in length for this to test anything."""
    reward = _length_reward_file(tmp_path)
    runs = []
    for mb in (0, 3):
        cfg = _grpo_cfg(
            tiny_model, tmp_path / str(mb), f"reward_funcs=[{reward}]", "beta=0.04", "max_completion_length=12",
            "max_steps=1", f"micro_batch_size={mb}",
        )  # fmt: skip
        grpo.train(cfg)
        runs.append(_metrics(tmp_path / str(mb) / "run")[-1])
    whole, micro = runs
    assert 0 < whole["truncation_rate"] < 1  # some completions end early, some run the full 12 tokens
    for key in ("loss", "grad_norm", "kl", "completion_length/mean"):
        assert micro[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def test_grpo_with_gradient_checkpointing_makes_the_same_update(tiny_model, tmp_path):
    """Recomputing the decoder layers in backward (micro-batches, reference model, bf16 autocast) changes memory,
    not the step: same loss, gradient norm and KL, same weights after it."""
    reward = _length_reward_file(tmp_path)
    runs = []
    for ckpt in ("false", "true"):
        cfg = _grpo_cfg(
            tiny_model, tmp_path / ckpt, f"reward_funcs=[{reward}]", "beta=0.04", "max_steps=1",
            "micro_batch_size=3", "autocast=bfloat16", f"gradient_checkpointing={ckpt}",
        )  # fmt: skip
        final = grpo.train(cfg)
        runs.append((_metrics(tmp_path / ckpt / "run")[-1], load_file(str(final / "model.safetensors"))))
    (plain, w_plain), (ckpt_m, w_ckpt) = runs
    for key in ("loss", "grad_norm", "kl"):
        assert ckpt_m[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key
    assert max(float((w_ckpt[k] - w_plain[k]).abs().max()) for k in w_plain) < 1e-6
