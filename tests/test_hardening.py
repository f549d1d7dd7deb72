"""Hostile and careless input (issue: hardening): busy, foreign and earlier-run output directories, user code that
exits or hangs, corrupt files, out-of-range options and silent no-ops. Each gives one line (no traceback) and
leaves what the user made in place."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignrl import checkpoint
from alignrl.cli import main
from alignrl.data import write_jsonl


@pytest.fixture
def data(tmp_path):
    """SFT and RL data files plus reward functions for these tests."""
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(8)])
    write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(8)])
    (tmp_path / "r.py").write_text(
        textwrap.dedent(
            """
            import sys, threading
            def exits(prompts, completions, completion_ids, **kw):
                sys.exit(0)
            def hangs(prompts, completions, completion_ids, **kw):
                threading.Event().wait()
            def none(prompts, completions, completion_ids, **kw):
                return [None] * len(completions)
            def huge(prompts, completions, completion_ids, **kw):
                return [1e308] * len(completions)
            def alarm(prompts, completions, completion_ids, **kw):
                import signal  # math_verify's own time limit works like this: it needs the main thread
                previous = signal.signal(signal.SIGALRM, signal.SIG_IGN)
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
                return [float(c.strip() == a) for c, a in zip(completions, kw["answer"])]
            """
        )
    )
    return tmp_path


def _sft(model, data, out, *extra):
    return ["train", "sft", f"model={model}", f"train_file={data / 'sft.jsonl'}", f"output_dir={out}",
            "max_steps=2", "batch_size=4", "progress_bar=false", *extra]  # fmt: skip


def _grpo(model, data, out, *extra):
    return ["train", "grpo", f"model={model}", f"train_file={data / 'rl.jsonl'}", f"output_dir={out}",
            "max_steps=2", "prompts_per_step=2", "num_generations=2", "max_completion_length=3",
            "progress_bar=false", *extra]  # fmt: skip


def _error(capsys) -> str:
    """The one error line of the last command (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("alignrl: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------- output directories


def test_busy_output_dir_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tiny_model, data, capsys):
    out = data / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from alignrl import rundir; rundir.lock(Path({str(out)!r}));"
         "print('locked', flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_sft(tiny_model, data, out)) == 2
        line = _error(capsys)
        assert f"output_dir {out} is in use by another run (pid {holder.pid} on " in line and "started 20" in line
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(_sft(tiny_model, data, out)) == 0  # the kernel released the dead holder's lock
    assert (out / "final" / "config.json").is_file()


def test_fresh_run_refuses_a_directory_holding_an_earlier_run(tiny_model, data, capsys):
    out = data / "run"
    assert main(_sft(tiny_model, data, out, "save_steps=1")) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(_sft(tiny_model, data, out, "learning_rate=1e-3")) == 2
    line = _error(capsys)
    assert "already holds an earlier sft run (checkpoint-1, checkpoint-2, final/, metrics.jsonl)" in line
    assert "resume=auto" in line and "overwrite_output_dir=true" in line
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted
    assert checkpoint.list_checkpoints(out) and "learning_rate: 1.0e-05" in (out / "config.yaml").read_text()
    assert main(_sft(tiny_model, data, out, "overwrite_output_dir=true", "save_steps=0")) == 0
    assert checkpoint.list_checkpoints(out) == []  # asked for: the earlier run is replaced


def test_resume_refuses_another_algorithms_run_and_checkpoint(tiny_model, data, capsys):
    out = data / "sft_run"
    assert main(_sft(tiny_model, data, out, "save_steps=1")) == 0
    assert main(_grpo(tiny_model, data, out, "resume=auto")) == 2
    assert f"resume: {out} holds a sft run, not grpo" in _error(capsys)
    assert main(_grpo(tiny_model, data, data / "new", f"resume={out / 'checkpoint-2'}")) == 2
    assert f"resume: {out / 'checkpoint-2'} is a sft checkpoint, not grpo" in _error(capsys)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2  # untouched
    assert json.loads((out / "alignrl_run.json").read_text())["algorithm"] == "sft"


def test_resume_refuses_options_that_change_saved_state_and_reports_the_others(tiny_model, data, capsys):
    out = data / "run"
    assert main(_sft(tiny_model, data, out, "save_steps=1", "max_steps=1")) == 0
    assert main(_sft(tiny_model, data, out, "resume=auto", "lora_r=4")) == 2
    assert "resume: lora_r was 0 in" in _error(capsys)
    assert main(_sft(tiny_model, data, out, "resume=auto", "max_steps=2", "learning_rate=2e-5")) == 0
    err = capsys.readouterr().err
    assert "options changed since checkpoint-1: learning_rate 1e-05 -> 2e-05, max_steps 1 -> 2" in err


def test_explicit_older_checkpoint_does_not_silently_drop_newer_ones(tiny_model, data, capsys):
    out = data / "run"
    assert main(_sft(tiny_model, data, out, "save_steps=1", "save_total_limit=0")) == 0
    assert main(_sft(tiny_model, data, out, f"resume={out / 'checkpoint-1'}")) == 2
    assert "holds checkpoint-2, saved after step 1" in _error(capsys)
    assert (out / "checkpoint-2").is_dir()


def test_resuming_another_directorys_checkpoint_does_not_take_over_an_earlier_run(tiny_model, data, capsys):
    a, b = data / "a", data / "b"
    assert main(_sft(tiny_model, data, a, "save_steps=1")) == 0
    assert main(_sft(tiny_model, data, b, "max_steps=3")) == 0
    metrics = (b / "metrics.jsonl").read_text()
    assert main(_sft(tiny_model, data, b, f"resume={a / 'checkpoint-1'}")) == 2
    assert f"output_dir {b} already holds an earlier sft run" in _error(capsys)
    assert (b / "metrics.jsonl").read_text() == metrics


def test_output_dir_that_is_a_file(tiny_model, data, capsys):
    (data / "afile").write_text("mine")
    assert main(_sft(tiny_model, data, data / "afile")) == 2
    assert "output_dir: " in _error(capsys) and (data / "afile").read_text() == "mine"


def test_killed_final_write_debris_is_removed_by_the_next_run(tiny_model, data):
    out = data / "run"
    out.mkdir()
    (out / ".final.tmp-abc").mkdir()
    (out / ".final.tmp-abc" / "model.safetensors").write_bytes(b"x")
    (out / ".checkpoint-3.tmp-xyz").mkdir()
    assert main(_sft(tiny_model, data, out, "resume=auto")) == 0
    assert not list(out.glob(".final.*")) and not list(out.glob(".checkpoint-*"))


# ------------------------------------------------------------------------------------------- checkpoints


def _flip_bytes(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 16] = bytes(255 - b for b in raw[offset : offset + 16])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(tiny_model, data, capsys, where):
    out = data / "run"
    assert main(_sft(tiny_model, data, out, "save_steps=1", "max_steps=2")) == 0
    weights = out / "checkpoint-2" / "model.safetensors"
    size = weights.stat().st_size
    _flip_bytes(weights, size - 64 if where == "tensor data" else 8)
    assert weights.stat().st_size == size and checkpoint.is_complete(out / "checkpoint-2")  # sizes still match
    assert main(_sft(tiny_model, data, out, "resume=auto", "max_steps=3", "save_steps=1")) == 0
    err = capsys.readouterr().err
    assert "model.safetensors does not match its checksum; moved the checkpoint to checkpoint-2.corrupt" in err
    assert "resumed from" in err and "checkpoint-1 (step 1)" in err
    assert (out / "checkpoint-2.corrupt").is_dir()  # kept for the user, never loaded
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [2, 3]


def test_explicit_corrupt_checkpoint_is_one_line(tiny_model, data, capsys):
    out = data / "run"
    assert main(_sft(tiny_model, data, out, "save_steps=1", "max_steps=1")) == 0
    _flip_bytes(out / "checkpoint-1" / checkpoint.STATE_FILE, 100)
    assert main(_sft(tiny_model, data, data / "other", f"resume={out / 'checkpoint-1'}")) == 2
    assert "trainer_state.pt does not match its checksum" in _error(capsys)


def test_truncated_model_weights_are_one_line(tiny_model, data, capsys):
    broken = data / "broken"
    shutil.copytree(tiny_model, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert main(_sft(broken, data, data / "run")) == 2
    assert f"model: cannot load {broken}" in _error(capsys)


def test_full_disk_names_the_directory(tiny_model, data, capsys, monkeypatch):
    import alignrl.models

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(alignrl.models, "write_pretrained", full)
    monkeypatch.setattr(checkpoint, "write_pretrained", full)
    assert main(_sft(tiny_model, data, data / "run", "save_steps=1")) == 2
    assert f"no space left on device writing {data / 'run' / 'checkpoint-1'}" in _error(capsys)


# ------------------------------------------------------------------------------------------- user code


def test_reward_function_raising_systemexit_is_an_error(tiny_model, data, capsys):
    assert main(_grpo(tiny_model, data, data / "run", f"reward_funcs=[{data / 'r.py'}:exits]")) == 2
    assert "reward function exits raised SystemExit" in _error(capsys)
    (data / "bad_import.py").write_text("raise SystemExit(0)\ndef f(**kw):\n    return []\n")
    assert main(_grpo(tiny_model, data, data / "run2", f"reward_funcs=[{data / 'bad_import.py'}:f]")) == 2
    assert "importing" in _error(capsys)


def test_hanging_reward_function_times_out(tiny_model, data, capsys):
    args = _grpo(tiny_model, data, data / "run", f"reward_funcs=[{data / 'r.py'}:hangs]", "reward_timeout=1")
    assert main(args) == 2
    assert "reward function hangs did not return within 1 s (reward_timeout)" in _error(capsys)


def test_reward_functions_run_on_the_main_thread_under_the_timeout(tiny_model, data):
    args = _grpo(tiny_model, data, data / "run", f"reward_funcs=[{data / 'r.py'}:alarm]", "reward_timeout=30")
    assert main(args) == 0


def test_lock_is_released_when_a_run_fails(tiny_model, data):
    out = data / "run"
    assert main(_grpo(tiny_model, data, out, f"reward_funcs=[{data / 'r.py'}:exits]")) == 2
    code = f"from pathlib import Path; from alignrl import rundir; rundir.lock(Path({str(out)!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr


def test_a_failed_run_releases_the_freed_memory_it_held(tiny_model, data, monkeypatch):
    """A CPU run holds freed memory from its start (glibc: no mmap, no trim); a run that raises must restore the
    allocator too, or an interactive session that caught the error keeps the run's peak heap for good."""
    from alignrl.trainers import loop

    calls: list[tuple] = []

    class Libc:  # records what the trainer asks of glibc, leaving the test process's allocator alone
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

    monkeypatch.setattr(loop, "_GLIBC", Libc())
    monkeypatch.setattr(loop, "_holding", False, raising=False)
    assert main(_grpo(tiny_model, data, data / "run", f"reward_funcs=[{data / 'r.py'}:exits]")) == 2
    assert calls[:2] == [("mallopt", loop._M_MMAP_MAX, 0), ("mallopt", loop._M_TRIM_THRESHOLD, -1)]
    assert calls[-1] == ("malloc_trim", 0) and ("mallopt", loop._M_MMAP_MAX, 65536) in calls[2:]
    assert not loop._holding


def test_reward_overflow_is_an_error(tiny_model, data, capsys):
    assert main(_grpo(tiny_model, data, data / "run", f"reward_funcs=[{data / 'r.py'}:huge]")) == 2
    assert "reward function huge returned 1e+308 at index 0: beyond the float32 range" in _error(capsys)


def test_rewards_that_never_apply_warn_and_stop(tiny_model, data, capsys):
    args = _grpo(tiny_model, data, data / "run", f"reward_funcs=[{data / 'r.py'}:none]", "max_nonfinite_in_a_row=2")
    assert main([*args, "max_steps=5"]) == 2
    err = capsys.readouterr().err
    assert "warning: step 1: no reward function (none) returned a number for any of the 4 samples" in err
    assert "2 steps in a row without a reward for any sample (at step 2" in err


def test_rewards_that_never_apply_are_seen_with_dynamic_sampling(tiny_model, data, capsys):
    args = _grpo(tiny_model, data, data / "run", f"reward_funcs=[{data / 'r.py'}:none]", "max_nonfinite_in_a_row=2",
                 "dynamic_sampling=true", "dynamic_sampling_max_rounds=2", "overlong_cache=1", "max_steps=5")
    assert main(args) == 2  # every group is dropped (no spread) and the length penalty always scores: still seen
    assert "no reward function (none) returned a number for any of the 8 samples" in capsys.readouterr().err


def test_causal_lm_as_reward_model_is_refused(tiny_model, data, capsys):
    args = ["train", "ppo", f"model={tiny_model}", f"train_file={data / 'rl.jsonl'}", f"output_dir={data / 'run'}",
            f"reward_funcs=[{tiny_model}]", "max_steps=1", "progress_bar=false"]  # fmt: skip
    assert main(args) == 2
    assert f"reward_funcs: {tiny_model} has no trained reward head (score.weight would be random)" in _error(capsys)


def test_long_prompts_are_counted_and_prompts_beyond_the_positions_refused(tiny_model, data, capsys):
    write_jsonl(data / "long.jsonl", [{"prompt": "1+" * 20 + "1=", "answer": "21"}, {"prompt": "1+1=", "answer": "2"}])
    args = _grpo(tiny_model, data, data / "run", f"train_file={data / 'long.jsonl'}", "max_prompt_length=10")
    assert main([*args, "max_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 2 prompts are longer than max_prompt_length=10 tokens" in err and "line 1, 42 tokens" in err
    write_jsonl(data / "longer.jsonl", [{"prompt": "1+" * 40 + "1=", "answer": "41"}])
    args = _grpo(tiny_model, data, data / "run2", f"train_file={data / 'longer.jsonl'}")
    assert main(args) == 2
    assert "prompt of 82 tokens (after max_prompt_length=512) is longer than the model's 64 positions" in _error(capsys)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, message",
    [
        (["learning_rate=-1"], "learning_rate: must be > 0, got -1.0"),
        (["learning_rate=.nan"], "learning_rate: expected a finite number"),
        (["max_steps=0"], "max_steps: must be ≥ 1, got 0"),
        (["top_p=2"], "top_p: must be in (0, 1], got 2.0"),
        (["top_k=-1"], "top_k: must be ≥ 0"),
        (["reward_timeout=-1"], "reward_timeout: must be ≥ 0"),
        (["eval_pass_k=-1"], "eval_pass_k: must be ≥ 0"),
    ],
)
def test_out_of_range_options(tiny_model, data, capsys, extra, message):
    assert main(_grpo(tiny_model, data, data / "run", *extra)) == 2
    assert message in _error(capsys)
    assert not (data / "run").exists()


def test_empty_config_and_missing_model(data, capsys):
    (data / "empty.yaml").write_text("")
    assert main(["train", "sft", "--config", str(data / "empty.yaml"), f"train_file={data / 'sft.jsonl'}",
                 f"output_dir={data / 'run'}"]) == 2  # fmt: skip
    assert "model: no model given (set model=PATH" in _error(capsys)


def test_non_utf8_jsonl_names_the_line(tiny_model, data, capsys):
    (data / "bad.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    assert main(_sft(tiny_model, data, data / "run", f"train_file={data / 'bad.jsonl'}")) == 2
    assert f"{data / 'bad.jsonl'} line 2: not UTF-8 (byte 0xff at column 13)" in _error(capsys)


def test_init_model_rejects_bad_sizes_and_existing_outputs(data, capsys):
    assert main(["init-model", "--out", str(data / "m"), "--hidden-size", "-64"]) == 2
    assert "--hidden-size: must be ≥ 1, got -64" in _error(capsys)
    (data / "keep.txt").write_text("mine")
    assert main(["init-model", "--out", str(data / "keep.txt"), "--hidden-size", "16", "--heads", "2"]) == 2
    assert "exists and is not a directory" in _error(capsys)
    assert (data / "keep.txt").read_text() == "mine" and not list(data.glob(".keep.txt*"))
    assert main(["init-model", "--out", str(data), "--hidden-size", "16", "--heads", "2"]) == 2
    assert "is not empty" in _error(capsys) and (data / "sft.jsonl").is_file()
    assert main(["init-model", "--out", str(data), "--hidden-size", "16", "--heads", "2", "--overwrite"]) == 2
    assert "holds no model" in _error(capsys) and (data / "sft.jsonl").is_file()
    assert main(["init-model", "--out", str(data / "m"), "--hidden-size", "16", "--heads", "2"]) == 0
    assert main(["init-model", "--out", str(data / "m"), "--hidden-size", "16", "--heads", "2", "--overwrite"]) == 0


def test_demo_rejects_an_unknown_model(capsys):
    assert main(["demo", "--model", "gpt5"]) == 2
    assert "--model: 'gpt5' is not a demo model (choose from tiny, smollm2)" in _error(capsys)


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    import alignrl.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(alignrl.cli, "_quiet_transformers", interrupted)
    assert main(["train", "sft"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "alignrl: interrupted" and "Traceback" not in err


def test_lock_file_names_the_holder_while_held(tmp_path):
    from alignrl import rundir

    rundir.lock(tmp_path)
    try:
        info = json.loads((tmp_path / rundir.LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
    finally:
        rundir.unlock(tmp_path)
