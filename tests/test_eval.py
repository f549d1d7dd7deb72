"""`alignrl eval`: greedy accuracy equals the rollout path's mean reward, pass@k is the unbiased estimator, the
JSON file holds what the table shows, bad input is one line."""

from __future__ import annotations

import itertools
import json

import pytest

from alignrl.cli import main
from alignrl.data import write_jsonl
from alignrl.evaluation import evaluate_model, pass_at_k


def test_pass_at_k_equals_the_share_of_k_subsets_with_a_success():
    for n, c, k in [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (4, 4, 4), (8, 1, 8), (7, 2, 5)]:
        draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
        want = sum(any(d) for d in draws) / len(draws)  # exact, by enumerating every k-subset of the n samples
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


@pytest.fixture
def eval_data(tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(3)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "r.py").write_text(
        "def first_digit_is_1(prompts, completions, completion_ids, **kw):\n"
        "    return [float(c[:1] == '1') for c in completions]\n"
        "def even_first(prompts, completions, completion_ids, **kw):\n"
        "    return [float(len(c) > 0 and ord(c[0]) % 2 == 0) for c in completions]\n"
        "def always(prompts, completions, completion_ids, **kw):\n"
        "    return [1.0] * len(completions)\n"
    )
    return tmp_path


def test_greedy_accuracy_matches_the_rollout_path_and_json(tiny_model, eval_data, capsys):
    from alignrl.generation import SamplingParams
    from alignrl.models import load_causal_lm, load_tokenizer
    from alignrl.rewards import RewardFunctions
    from alignrl.rollout import NativeEngine, sample_and_score

    spec = f"{eval_data / 'r.py'}:first_digit_is_1"
    out = eval_data / "res.json"
    assert main(["eval", "--model", tiny_model, "--data", str(eval_data / "d.jsonl"), "--reward-funcs", spec,
                 "--max-new-tokens", "4", "--json", str(out), "--pass-k", "3"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = [json.loads(line) for line in (eval_data / "d.jsonl").read_text().splitlines()]
    fns = RewardFunctions([spec], None, set(rows[0]), "d")
    tok = load_tokenizer(tiny_model)
    scored = sample_and_score(NativeEngine(load_causal_lm(tiny_model).eval(), tok), tok, rows,
                              [str(i) for i in range(len(rows))], fns, SamplingParams(4, 0.0), repeats=1,
                              max_prompt_length=1024, device="cpu")  # fmt: skip
    want = float(scored.rewards.mean())  # one greedy batch, no batching logic
    assert res["prompts"] == 12 and res["mean_reward"] == pytest.approx(want) and res["accuracy"] == res["mean_reward"]
    assert res["pass_k"] == 3 and 0.0 <= res["pass_at_k"] <= 1.0
    assert f"{res['accuracy']:.1%}" in table and "pass@3 (temperature 1)" in table


def test_results_do_not_depend_on_the_batch_size(tiny_model, eval_data):
    """Each sample's noise is keyed by (seed, prompt, sample), so batching changes nothing; pass@1 is the sampled
    accuracy."""
    spec = [f"{eval_data / 'r.py'}:even_first"]
    a = evaluate_model(tiny_model, str(eval_data / "d.jsonl"), spec, max_new_tokens=3, pass_k=3, batch_size=3)
    b = evaluate_model(tiny_model, str(eval_data / "d.jsonl"), spec, max_new_tokens=3, pass_k=3, batch_size=64)
    assert a == b and 0 < a.pass_at_k < 1  # some but not all prompts have a sample that starts with an even code
    one = evaluate_model(tiny_model, str(eval_data / "d.jsonl"), spec, max_new_tokens=3, pass_k=1)
    assert one.pass_k == 1 and one.pass_at_k is not None


def test_pass_at_k_bounds_with_constant_rewards(tiny_model, eval_data):
    res = evaluate_model(tiny_model, str(eval_data / "d.jsonl"), [f"{eval_data / 'r.py'}:always"],
                         max_new_tokens=2, pass_k=2)  # fmt: skip
    assert res.accuracy == 1.0 and res.pass_at_k == 1.0 and res.per_function == {"always": 1.0}
    res = evaluate_model(tiny_model, str(eval_data / "d.jsonl"), ["gsm8k"], max_new_tokens=2, threshold=2.0)
    assert res.accuracy == 0.0  # a 0/1 reward never reaches 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pass-k", "-1"], "--pass-k: must be ≥ 0"),
        (["--batch-size", "0"], "--batch-size: must be ≥ 1"),
        (["--limit", "-1"], "--limit: must be ≥ 0"),
        (["--temperature", "0", "--pass-k", "2"], "--temperature: must be > 0"),
        (["--reward-funcs", "nope"], "reward_funcs: 'nope' is not a built-in"),
        (["--model", "/nonexistent"], "--model: /nonexistent does not exist"),
    ],
)
def test_eval_bad_input_is_one_line(tiny_model, eval_data, capsys, extra, message):
    args = ["eval", "--model", tiny_model, "--data", str(eval_data / "d.jsonl"), "--reward-funcs", "gsm8k", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"alignrl: error: {message}" in err


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_eval_during_training_equals_alignrl_eval_on_the_final_model(algo, tiny_model, eval_data, tmp_path):
    """eval_file in an online trainer: eval/... metrics at step 0, every eval_steps and at the end, equal to
    `alignrl eval` on the saved model and the same file; the evaluated completions go to samples.jsonl."""
    spec = f"{eval_data / 'r.py'}:even_first"
    out = tmp_path / "run"
    args = ["train", algo, f"model={tiny_model}", f"train_file={eval_data / 'd.jsonl'}",
            f"eval_file={eval_data / 'd.jsonl'}", f"output_dir={out}", "max_steps=2", "eval_steps=1",
            "prompts_per_step=2", "max_completion_length=4", "progress_bar=false", f"reward_funcs=[{spec}]",
            "eval_pass_k=2", "learning_rate=1e-2", "temperature=1.0"]  # fmt: skip
    assert main([*args, "num_generations=2"] if algo == "grpo" else args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    res = evaluate_model(str(out / "final"), str(eval_data / "d.jsonl"), [spec], max_new_tokens=4,
                         max_prompt_length=512, pass_k=2, temperature=1.0)  # fmt: skip
    last = evals[-1]
    assert last["eval/reward"] == pytest.approx(res.mean_reward)
    assert last["eval/accuracy"] == pytest.approx(res.accuracy)
    assert last["eval/rewards/even_first/mean"] == pytest.approx(res.per_function["even_first"])
    assert last["eval/pass@2"] == pytest.approx(res.pass_at_k) and last["eval/completion_length"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sum(1 for s in samples if s.get("eval") and s["step"] == 2) == 12  # every held-out prompt
