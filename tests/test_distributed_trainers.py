"""Trainers under `torchrun --nproc_per_node 2` (gloo, CPU): one update on 2 ranks equals one single-process update
on the same global batch (SFT, DPO, GRPO, RM, PPO; ddp and fsdp); GRPO logs the same reward statistics; resuming from a
sharded checkpoint reproduces the uninterrupted run; final/ of an fsdp run loads with from_pretrained."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _run_group, torchrun

from alignrl.cli import main
from alignrl.data import write_jsonl
from alignrl.envs import guess


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _data(tmp_path: Path, algo: str) -> str:
    if algo == "sft":
        rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    elif algo in ("dpo", "rm"):
        rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1) + "0"}
                for a in range(6) for b in range(6)]  # fmt: skip
    elif algo == "guess":
        rows = guess.make_rows(16, 0)
    else:
        rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    path = tmp_path / f"{algo}.jsonl"
    write_jsonl(path, rows)
    return str(path)


def _reward(tmp_path: Path) -> str:
    p = tmp_path / "r.py"
    p.write_text(
        "def short(prompts, completions, completion_ids, **kw):\n    return [-float(len(c)) for c in completions]\n"
        "def prompt_sum(prompts, completions, completion_ids, **kw):\n"  # differs between the ranks' prompts
        "    return [float(sum(int(x) for x in p.rstrip('=').split('+'))) for p in prompts]\n"
    )
    return f"{p}:short"


def _teacher(model: str, tmp_path: Path) -> str:
    """`model` with its final norm scaled by 4 (same tokenizer, sharper distributions): a teacher to distil."""
    out = tmp_path / "teacher"
    if not out.exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(model)
        with torch.no_grad():
            lm.model.norm.weight.mul_(4.0)
        lm.save_pretrained(out)
        AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return str(out)


def _args(algo: str, model: str, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    data = _data(tmp_path, "guess" if any(x.startswith("environment=") for x in extra) else algo)  # secret column
    common = [f"model={model}", f"train_file={data}", f"output_dir={out}", "progress_bar=false",
              "learning_rate=1e-3", "max_steps=1"]  # fmt: skip
    per_algo = {
        "sft": ["batch_size=8", "gradient_accumulation_steps=2", "group_by_length=false"],
        "dpo": ["batch_size=6"],
        # the fresh score head leaves many trunk gradients near Adam's epsilon, where g / (|g| + eps) turns
        # float32 summation-order noise (1e-7 relative) into 1e-5 parameter differences; a larger eps damps it
        "rm": ["batch_size=6", "center_rewards_coefficient=0.01", "adam_epsilon=1e-6"],
        "grpo": ["prompts_per_step=4", "num_generations=4", "max_completion_length=6", "beta=0.04",
                 "scale_rewards=batch", f"reward_funcs=[gsm8k, {_reward(tmp_path)}]", "reward_weights=[1.0, 0.1]",
                 "micro_batch_size=4"],  # fmt: skip
        # Adam's first step is ~ lr·sign(g), blind to how gradients are scaled; eps = 1 and no clipping make it
        # ~ lr·g, so a wrong normaliser or whitening statistic on 2 ranks shows in the parameters
        "ppo": ["prompts_per_step=4", "num_generations=2", "max_completion_length=6", "num_ppo_epochs=1",
                f"reward_funcs=[{_reward(tmp_path)}, {_reward(tmp_path)[:-5]}prompt_sum]", "kl_coef=0.1",
                "temperature=1.0", "adam_epsilon=1.0", "max_grad_norm=0", "learning_rate=0.1"],  # fmt: skip
        # (the same Adam settings: whitening over the global batch and global token counts show in the weights)
        "reinforce_pp": ["prompts_per_step=4", "num_generations=2", "max_completion_length=6", "beta=0.05",
                         f"reward_funcs=[{_reward(tmp_path)}, {_reward(tmp_path)[:-5]}prompt_sum]",
                         "adam_epsilon=1.0", "max_grad_norm=0", "learning_rate=0.1"],  # fmt: skip
        "cispo": ["prompts_per_step=4", "num_generations=4", "max_completion_length=6",
                  f"reward_funcs=[gsm8k, {_reward(tmp_path)}]", "adam_epsilon=1.0", "max_grad_norm=0",
                  "learning_rate=0.1"],  # fmt: skip
        "distill": ["prompts_per_step=4", "max_completion_length=6", f"teacher_model={_teacher(model, tmp_path)}",
                    "adam_epsilon=1.0", "max_grad_norm=0", "learning_rate=0.1"],  # fmt: skip
    }
    return [*common, *per_algo[algo], *extra]


def _single(algo, model, tmp_path, out, *extra) -> Path:
    assert main(["train", algo, *_args(algo, model, tmp_path, out, *extra)]) == 0
    return out / "final"


def _dist(algo, model, tmp_path, out, mode, *extra) -> Path:
    torchrun(["-m", "alignrl.cli", "train", algo, *_args(algo, model, tmp_path, out, f"distributed={mode}", *extra)])
    return out / "final"


def _max_rel_err(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def _check_same_update(algo, mode, tiny_model, tmp_path, *extra):
    ref = _single(algo, tiny_model, tmp_path, tmp_path / "single", *extra)
    got = _dist(algo, tiny_model, tmp_path, tmp_path / mode, mode, *extra)
    start = load_file(f"{tiny_model}/model.safetensors")
    moved = load_file(str(ref / "model.safetensors"))
    assert any(not torch.equal(start[k], moved[k]) for k in start if k in moved)  # the step changed weights
    assert _max_rel_err(got, ref) < 1e-5
    return _metrics(tmp_path / "single"), _metrics(tmp_path / mode)


def test_grpo_fsdp_two_ranks_equal_single_process(tiny_model, tmp_path):
    """Fast-suite representative: rollout sharding, gathered rewards, global token counts, a sharded reference
    model and generation with sharded parameters, on 2 ranks vs 1 process."""
    single, dist = _check_same_update("grpo", "fsdp", tiny_model, tmp_path)
    for key in ("reward", "reward_std", "rewards/gsm8k/mean", "rewards/short/mean", "advantages/std",
                "completion_length/mean", "loss", "kl", "entropy"):  # fmt: skip
        assert dist[-1][key] == pytest.approx(single[-1][key], rel=1e-5, abs=1e-6), key
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")  # consolidated by rank 0
    saved = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("algo", ["sft", "dpo", "grpo", "rm"])
def test_two_ranks_equal_single_process(algo, mode, tiny_model, tmp_path):
    single, dist = _check_same_update(algo, mode, tiny_model, tmp_path)
    assert dist[-1]["loss"] == pytest.approx(single[-1]["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algo", "mode", "extra"),
    [("reinforce_pp", "ddp", ()), ("reinforce_pp", "fsdp", ("advantage_estimator=reinforce_pp_baseline",)),
     ("cispo", "ddp", ("num_iterations=2",)), ("distill", "fsdp", ())],  # fmt: skip
)
def test_new_online_algorithms_two_ranks_equal_single_process(algo, mode, extra, tiny_model, tmp_path):
    """REINFORCE++ (global whitening), CISPO and distillation (a sharded teacher) on 2 ranks vs 1 process."""
    single, dist = _check_same_update(algo, mode, tiny_model, tmp_path, *extra)
    for key in ("loss", "reward", "advantages/std"):
        assert dist[-1][key] == pytest.approx(single[-1][key], rel=1e-5, abs=1e-6), key


ENV_FILE = """
from alignrl.envs import Environment, Step

class Talk(Environment):
    \"\"\"Replies until the third turn; rewards long answers and the digit 5.\"\"\"
    def reset(self, row):
        return [{"role": "user", "content": f"hi {row['secret']}"}]
    def step(self, episode, message):
        parts = {"length": len(message) / 10, "fives": float(message.count("5"))}
        if episode.turn == 3:
            return Step(done=True, rewards={**parts, "success": float(str(episode.row["secret"]) in message)})
        return Step([{"role": "user", "content": "go on"}], rewards=parts)
"""


def multi_turn(tmp_path: Path) -> tuple[str, ...]:
    """Options of a multi-turn run on the `Talk` environment (and guess rows)."""
    (tmp_path / "talk.py").write_text(ENV_FILE)
    return (f"environment={tmp_path / 'talk.py'}:Talk", *MULTI_TURN)


MULTI_TURN = ("max_turns=3", "max_completion_length=4", "max_episode_tokens=90", "max_prompt_length=40",
              "reward_funcs=[]", "reward_weights=null", "adam_epsilon=1.0", "max_grad_norm=0",
              "learning_rate=0.1")  # fmt: skip


@pytest.mark.parametrize(("algo", "mode"), [("grpo", "ddp"), pytest.param("ppo", "fsdp", marks=pytest.mark.slow)])
def test_multi_turn_episodes_on_two_ranks_equal_single_process(algo, mode, turn_taker, tmp_path):
    """Multi-turn episodes (the guess environment: every rank runs its own episodes, environment tokens masked
    out of the loss; PPO's GAE over the model's tokens only) on 2 ranks vs 1 process."""
    single, dist = _check_same_update(algo, mode, turn_taker, tmp_path, *multi_turn(tmp_path))
    assert single[-1]["episode/turns"] > 1  # episodes had several turns
    for key in ("loss", "reward", "episode/turns", "env/length", "completion_length/mean"):
        assert dist[-1][key] == pytest.approx(single[-1][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "budget"), [("grpo", 24), ("ppo", 24), ("dpo", 48), ("sft", 40)])
def test_token_budget_on_two_ranks_equals_one_process(algo, budget, tiny_model, tmp_path):
    """micro_batch_tokens splits each rank's rows by length, so ranks may need different numbers of passes; the one
    with fewer runs weight-0 passes to keep FSDP's collectives in step, and the update is the single-process one."""
    # 20 long rows, then 16 short ones: batches are sorted by length before each rank takes its contiguous share
    # (DPO, SFT) and GRPO/PPO ranks pad their own prompts, so in some steps one rank holds long rows and needs
    # more passes than the other, whose split is padded with weight-0 passes (seen for every algo here)
    rows = [{"prompt": f"{a}+{b}+{a}+{b}=" if i < 20 else f"{a}+{b}=", "completion": "9" * (15 if i < 20 else 1),
             "chosen": "7" * (15 if i < 20 else 1), "rejected": "8" * (14 if i < 20 else 1), "answer": str(a + b)}
            for i, (a, b) in enumerate((a, b) for a in range(6) for b in range(6))]  # fmt: skip
    write_jsonl(tmp_path / "uneven.jsonl", rows)
    lengths = {"grpo": ["max_prompt_length=12", "micro_batch_size=0"], "ppo": ["max_prompt_length=12"],
               "dpo": ["max_length=24"], "sft": ["max_length=24", "group_by_length=true"]}
    extra = (f"micro_batch_tokens={budget}", f"train_file={tmp_path / 'uneven.jsonl'}", "max_steps=6", *lengths[algo])
    ref = _single(algo, tiny_model, tmp_path, tmp_path / "single", *extra)
    got = _dist(algo, tiny_model, tmp_path, tmp_path / "fsdp", "fsdp", *extra)
    assert _max_rel_err(got, ref) < 1e-5
    if algo == "ppo":
        assert _max_rel_err(tmp_path / "fsdp" / "value_model", tmp_path / "single" / "value_model") < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "mode"), [("grpo", "fsdp"), ("ppo", "ddp"), ("ppo", "fsdp")])
def test_gradient_checkpointing_on_two_ranks_gives_the_plain_single_process_update(algo, mode, tiny_model, tmp_path):
    """Recomputed decoder layers (policy and PPO's separate critic) under DDP / FSDP2 wrapping: the same update as
    one process keeping its activations."""
    ref = _single(algo, tiny_model, tmp_path, tmp_path / "single")
    got = _dist(algo, tiny_model, tmp_path, tmp_path / mode, mode, "gradient_checkpointing=true")
    assert _max_rel_err(got, ref) < 1e-5
    if algo == "ppo":
        assert _max_rel_err(tmp_path / mode / "value_model", tmp_path / "single" / "value_model") < 1e-5


@pytest.mark.slow
def test_grpo_two_ranks_log_the_same_reward_statistics(tiny_model, tmp_path):
    extra = ("max_steps=3", "learning_rate=1e-2")
    _single("grpo", tiny_model, tmp_path, tmp_path / "single", *extra)
    _dist("grpo", tiny_model, tmp_path, tmp_path / "ddp", "ddp", *extra)
    single, dist = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    assert len(single) == len(dist) == 3
    for s, d in zip(single, dist):
        for key in ("reward", "reward_std", "rewards/gsm8k/mean", "rewards/short/mean", "frac_reward_zero_std"):
            assert d[key] == pytest.approx(s[key], rel=1e-6, abs=1e-9), (s["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "mode"), [("sft", "fsdp"), ("grpo", "fsdp"), ("ppo", "fsdp"), ("ppo", "ddp")])
def test_resume_from_sharded_checkpoint_reproduces_the_run(algo, mode, tiny_model, tmp_path):
    """PPO's one optimiser steps the policy and the critic: both, and Adam's state for both, come back."""
    # Adam's usual epsilon (PPO's parity settings use 1.0): a lost optimiser state then moves weights visibly
    extra = ("adam_epsilon=1e-8", "learning_rate=1e-3") if algo == "ppo" else ()
    full = _dist(algo, tiny_model, tmp_path, tmp_path / "full", mode, "max_steps=4", "save_steps=2", *extra)
    part = tmp_path / "part"
    _dist(algo, tiny_model, tmp_path, part, mode, "max_steps=2", "save_steps=2", *extra)
    assert (part / "checkpoint-2" / "distributed").is_dir()
    _dist(algo, tiny_model, tmp_path, part, mode, "max_steps=4", "save_steps=2", "resume=auto", *extra)
    assert _max_rel_err(part / "final", full) < 1e-6
    a, b = _metrics(tmp_path / "full"), _metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = ["loss/policy_avg", "loss/value_avg", "objective/scores"] if algo == "ppo" else ["loss"]
    for key in keys:
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5, abs=1e-7), key
    if algo == "ppo":
        assert _max_rel_err(part / "value_model", tmp_path / "full" / "value_model") < 1e-6


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_another_world_size(tiny_model, tmp_path):
    """DCP reshards: a 2-rank fsdp checkpoint, resumed by one process, continues the 2-rank run (same global
    batches, so the same updates up to float32 summation order)."""
    full = _dist("sft", tiny_model, tmp_path, tmp_path / "full", "fsdp", "max_steps=4", "save_steps=2")
    part = tmp_path / "part"
    _dist("sft", tiny_model, tmp_path, part, "fsdp", "max_steps=2", "save_steps=2")
    _single("sft", tiny_model, tmp_path, part, "max_steps=4", "save_steps=2", "resume=auto")
    assert _max_rel_err(part / "checkpoint-2", full) > 1e-3  # steps 3-4 moved the weights
    assert _max_rel_err(part / "final", full) < 1e-5
    a, b = _metrics(tmp_path / "full"), _metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("extra", [("num_mini_batches=1",), ("num_mini_batches=2", "micro_batch_size=1",
                                                             "whiten_rewards=true", "adaptive_kl=true")])
def test_ppo_two_ranks_equal_single_process(mode, extra, tiny_model, tmp_path):
    """PPO (separate critic): the policy AND the critic after one update on 2 ranks equal the single-process ones;
    global whitening, token counts, minibatch shuffles and the adaptive KL controller's input."""
    single, dist = _check_same_update("ppo", mode, tiny_model, tmp_path, *extra)
    c_single, c_dist = tmp_path / "single" / "value_model", tmp_path / mode / "value_model"
    assert load_file(str(c_single / "model.safetensors"))["score.weight"].abs().max() > 0  # the head moved
    assert _max_rel_err(c_dist, c_single) < 1e-5
    for key in ("objective/scores", "objective/kl", "advantages/std", "returns/mean", "loss/value_avg",
                "policy/clipfrac_avg", "val/explained_variance"):  # fmt: skip
        assert dist[-1][key] == pytest.approx(single[-1][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_ppo_shared_critic_two_ranks_ddp(tiny_model, tmp_path):
    """critic=shared under ddp: the head is DDP-wrapped and reads the trunk pass of the wrapped log-prob forward."""
    _check_same_update("ppo", "ddp", tiny_model, tmp_path, "critic=shared")
    a = torch.load(tmp_path / "ddp" / "value_head.pt")
    b = torch.load(tmp_path / "single" / "value_head.pt")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-8) for k in b)


@pytest.mark.slow
def test_a_refusal_on_rank_0_stops_every_rank(tiny_model, tmp_path):
    """Rank 0 decides what may happen to output_dir; the other ranks must stop with its error, not wait for it."""
    out = tmp_path / "run"
    _single("sft", tiny_model, tmp_path, out)  # an earlier run: a fresh one must refuse
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alignrl.cli",
           "train", "sft", *_args("sft", tiny_model, tmp_path, out, "distributed=ddp")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = _run_group(cmd, env, timeout=120)
    assert proc.returncode != 0 and "timed out" not in proc.stderr
    assert proc.stderr.count(f"alignrl: error: output_dir {out} already holds an earlier sft run") == 2, proc.stderr


@pytest.mark.slow
def test_grpo_eval_on_two_ranks_equals_one_process(tiny_model, tmp_path):
    """Each rank evaluates its share of eval_file (sampling keyed by the prompt's index in the whole set): the
    eval/... metrics at step 0 equal one process's, pass@k included."""
    extra = (f"eval_file={_data(tmp_path, 'grpo')}", "eval_pass_k=2", "eval_steps=1")
    _single("grpo", tiny_model, tmp_path, tmp_path / "one", *extra)
    _dist("grpo", tiny_model, tmp_path, tmp_path / "two", "ddp", *extra)
    one, two = (_metrics(tmp_path / d)[0] for d in ("one", "two"))
    keys = [k for k in one if k.startswith("eval/")]
    assert "eval/pass@2" in keys and keys == [k for k in two if k.startswith("eval/")]
    assert all(one[k] == pytest.approx(two[k], abs=1e-6) for k in keys), (one, two)
