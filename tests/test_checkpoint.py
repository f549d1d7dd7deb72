"""Checkpoints: atomic layout and completion marker, rotation, RNG/data-stream state, safe loading, LoRA exact
resume (in-process), non-finite update skipping, NaN/None rewards."""

from __future__ import annotations

import json
import math
import random
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignrl import checkpoint
from alignrl.algos.kl_control import AdaptiveKLController
from alignrl.config import TrainConfig, load_config
from alignrl.data import write_jsonl
from alignrl.errors import AlignRLError
from alignrl.rewards import RewardFunctions
from alignrl.trainers import loop, sft


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _metrics(run_dir):
    """metrics.jsonl rows without timing fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k == "step_time" or k.startswith("time/"))} for r in rows]


def _tiny_run(tiny_model, tmp_path, *extra):
    cfg = load_config(TrainConfig, None, [f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", *extra])
    run = loop.start_run(cfg)
    model, tok = loop.load_policy(cfg, run.device, rl=False)
    opt = loop.build_optimizer(model, cfg)
    sched = loop.build_scheduler(opt, cfg, cfg.max_steps)
    return cfg, run, model, tok, opt, sched


def _train_step(model, opt, sched, cfg, run, scale=1.0):
    ids = torch.arange(4, 20)[None]
    loss = model(input_ids=ids, labels=ids).loss * scale
    loss.backward()
    return loop.optimizer_step(model, opt, sched, cfg, loss=loss.detach(), run=run)


def test_rng_state_roundtrip_and_weights_only(tmp_path):
    state = checkpoint.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.save(state, tmp_path / "rng.pt")
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_replay_stream_restores_position():
    make = lambda: (random.Random(3).random() + i for i in range(100))  # noqa: E731
    s = checkpoint.ReplayStream(make)
    [next(s) for _ in range(7)]
    state = s.state_dict()
    rest = [next(s) for _ in range(5)]
    t = checkpoint.ReplayStream(make)
    t.load_state_dict(state)
    assert [next(t) for _ in range(5)] == rest


def test_checkpoint_layout_marker_rotation_and_resume_state(tiny_model, tmp_path):
    cfg, run, model, tok, opt, sched = _tiny_run(tiny_model, tmp_path, "save_steps=1", "save_total_limit=2")
    head = torch.nn.Linear(32, 1)  # an extra network (e.g. a value head) registered as a component
    ctl = AdaptiveKLController(0.1, 6.0, 100.0)
    assert run.register(model, tok, optimizer=opt, scheduler=sched, value_head=head, kl_ctl=ctl) == 1
    ctl.update(12.0, 10)
    for step in (1, 2, 3):
        _train_step(model, opt, sched, cfg, run)
        run.end_step(step)
    out = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [2, 3]  # rotated: newest 2 kept
    ck = out / "checkpoint-3"
    assert checkpoint.is_complete(ck) and not list(out.glob(".checkpoint-*"))
    # the model part is a normal HF directory holding the current weights
    loaded = AutoModelForCausalLM.from_pretrained(ck)
    for n, p in model.named_parameters():
        assert torch.equal(loaded.state_dict()[n], p.detach())
    # everything else loads with weights_only=True and restores optimizer/scheduler/step exactly
    cfg2, run2, model2, tok2, opt2, sched2 = _tiny_run(tiny_model, tmp_path, "resume=auto")
    assert run2.resume_from == ck
    head2, ctl2 = torch.nn.Linear(32, 1), AdaptiveKLController(0.1, 6.0, 100.0)
    assert run2.register(model2, tok2, optimizer=opt2, scheduler=sched2, value_head=head2, kl_ctl=ctl2) == 4
    assert (ck / "module-value_head.safetensors").is_file() and ctl2.value == ctl.value != 0.1
    assert torch.equal(head2.weight, head.weight) and torch.equal(head2.bias, head.bias)
    assert sched2.state_dict() == sched.state_dict()
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    # a half-written directory (no marker, or a file cut short) is never listed or loaded
    (ck / checkpoint.MARKER).unlink()
    assert checkpoint.latest_checkpoint(out) == out / "checkpoint-2"
    with pytest.raises(AlignRLError, match="not a complete"):
        checkpoint.resolve_resume(str(ck), out)
    p2 = out / "checkpoint-2" / "model.safetensors"
    p2.write_bytes(p2.read_bytes()[:100])
    assert checkpoint.latest_checkpoint(out) is None
    assert checkpoint.resolve_resume("auto", out) is None  # auto with nothing complete: fresh start


def test_exception_while_saving_leaves_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    cfg, run, model, tok, opt, sched = _tiny_run(tiny_model, tmp_path, "save_steps=1")
    run.register(model, tok, optimizer=opt, scheduler=sched)
    run.end_step(1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(OSError):
        run.end_step(2)
    out = tmp_path / "run"
    assert checkpoint.latest_checkpoint(out) == out / "checkpoint-1"
    assert not (out / "checkpoint-2").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as intended
def test_sharded_layout_through_the_same_save_and_load_in_one_process(tiny_model, tmp_path):
    """The multi-process layout (a torchrun run's; a one-process resume of it keeps writing it) by the one save/load:
    DCP shards holding model, optimiser and modules, this rank's RNG file, the world size in the marker, exact
    reload; a single-process checkpoint is refused where shards are expected."""
    from alignrl import distributed as dist
    from alignrl.models import load_causal_lm, load_tokenizer

    def parts():
        policy = dist.PolicyLogProbs(load_causal_lm(tiny_model))
        return policy, torch.optim.AdamW(policy.parameters(), lr=1e-2), torch.nn.Linear(32, 1)

    tok = load_tokenizer(tiny_model)
    policy, opt, head = parts()
    ids = torch.arange(4, 20)[None]
    policy.lm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = {"components": {}, "rng": checkpoint.rng_state(), "run": {}}
    path = checkpoint.save_checkpoint(
        tmp_path, 3, policy, tok, state, "x: 1\n", {"head": head}, {"algorithm": "sft"}, sharded=True, optimizer=opt
    )
    assert checkpoint.is_complete(path) and checkpoint.has_sharded_state(path) and (path / "rng-rank0.pt").is_file()
    assert checkpoint.read_marker(path)["world_size"] == 1 and not list(path.glob("module-*.safetensors"))
    saved = AutoModelForCausalLM.from_pretrained(path).state_dict()  # the HF files hold the current weights
    assert all(torch.equal(saved[n], p) for n, p in policy.lm.state_dict().items())
    policy2, opt2, head2 = parts()
    got = checkpoint.load_checkpoint(path, policy2, modules={"head": head2}, sharded=True, optimizer=opt2)
    assert got["step"] == 3 and got["components"] == {} and "rng" in got
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), policy2.parameters()))
    assert torch.equal(head.weight, head2.weight) and len(opt2.state) == len(opt.state) > 0
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    single = checkpoint.save_checkpoint(tmp_path, 4, policy.lm, tok, state)
    assert not checkpoint.has_sharded_state(single) and "world_size" not in checkpoint.read_marker(single)
    with pytest.raises(AlignRLError, match="written by a single-process run"):
        checkpoint.load_checkpoint(single, policy2, sharded=True, optimizer=opt2)


def test_hf_directory_from_given_weights(tiny_model, tmp_path):
    """The one HF writer (final/, checkpoints, PPO's critic) saves given full weights (FSDP's gathered ones)
    instead of the model's own, with the tokenizer, atomically."""
    from alignrl.models import load_causal_lm, load_tokenizer, save_pretrained_atomic

    model, tok = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    given = {k: v + 1.0 for k, v in model.state_dict().items()}
    save_pretrained_atomic(model, tok, tmp_path / "out", given)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in given.items())
    assert load_tokenizer(str(tmp_path / "out")).get_vocab() == tok.get_vocab()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_nonfinite_loss_skips_update_counts_and_aborts(tiny_model, tmp_path):
    cfg, run, model, tok, opt, sched = _tiny_run(tiny_model, tmp_path, "max_nonfinite_in_a_row=3")
    run.register(model, tok, optimizer=opt, scheduler=sched)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = _train_step(model, opt, sched, cfg, run, scale=float("nan"))
    assert m["skipped_update"] == 1.0 and m["skipped_updates_total"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # NaN grads never applied
    assert all(p.grad is None for p in model.parameters())
    m = _train_step(model, opt, sched, cfg, run, scale=float("inf"))
    assert m["skipped_update"] == 1.0 and run.nonfinite_in_a_row == 2
    m = _train_step(model, opt, sched, cfg, run)  # a finite update resets the run of failures
    assert m["skipped_update"] == 0.0 and run.nonfinite_in_a_row == 0 and m["skipped_updates_total"] == 2.0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    for _ in range(2):
        _train_step(model, opt, sched, cfg, run, scale=float("nan"))
    with pytest.raises(AlignRLError, match="3 updates in a row had a non-finite"):
        _train_step(model, opt, sched, cfg, run, scale=float("nan"))


def test_reliability_options_are_validated(tiny_model, tmp_path):
    with pytest.raises(AlignRLError, match="save_steps"):
        _tiny_run(tiny_model, tmp_path, "save_steps=-1")
    with pytest.raises(AlignRLError, match="resume: .* is not a directory"):
        _tiny_run(tiny_model, tmp_path, f"resume={tmp_path / 'nope'}")


def test_lora_resume_is_exact_and_checkpoint_is_merged_hf_dir(tiny_model, tmp_path, monkeypatch, restore_threads):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    write_jsonl(tmp_path / "sft.jsonl", rows)

    def cfg(out, *extra):
        return load_config(
            sft.SFTConfig,
            None,
            [
                f"model={tiny_model}",
                f"train_file={tmp_path / 'sft.jsonl'}",
                f"output_dir={tmp_path / out}",
                "max_steps=5",
                "batch_size=4",
                "learning_rate=1e-2",
                "lora_r=4",
                "lora_dropout=0.1",  # dropout draws from the torch RNG: restored too
                "eval_fraction=0.2",
                "eval_steps=2",
                "num_threads=1",
                "progress_bar=false",
                *extra,
            ],
        )

    ref_final = sft.train(cfg("ref", "save_steps=0"))
    real_log = loop.MetricsLogger.log

    def crash_after_step_3(self, step, metrics):
        real_log(self, step, metrics)
        if step == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop.MetricsLogger, "log", crash_after_step_3)
    with pytest.raises(RuntimeError):
        sft.train(cfg("run", "save_steps=2"))
    monkeypatch.setattr(loop.MetricsLogger, "log", real_log)
    ck = tmp_path / "run" / "checkpoint-2"
    assert not (ck / "adapter_config.json").exists()  # merged: a plain HF model directory
    AutoModelForCausalLM.from_pretrained(ck)
    assert set(load_file(ck / checkpoint.TRAINABLE_FILE)) and all(
        "lora_" in k for k in load_file(ck / checkpoint.TRAINABLE_FILE)
    )
    final = sft.train(cfg("run", "save_steps=2", "resume=auto"))
    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "ref")
    a, b = load_file(ref_final / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_reward_is_treated_like_none_and_inf_is_an_error(tmp_path):
    p = tmp_path / "r.py"
    p.write_text(
        "def a(prompts, completions, completion_ids, **kw):\n"
        "    return [1.0, None, float('nan'), None]\n"
        "def b(prompts, completions, completion_ids, **kw):\n"
        "    return [2.0, 3.0, float('nan'), None]\n"
        "def c(prompts, completions, completion_ids, **kw):\n"
        "    return [float('inf'), 0.0, 0.0, 0.0]\n"
    )
    fns = RewardFunctions([f"{p}:a", f"{p}:b"], [1.0, 0.5], set(), "data")
    raw = fns.score(["q"] * 4, ["x"] * 4, [[1]] * 4, {})
    assert raw[:, 0].isnan().tolist() == [False, True, True, True]
    assert fns.combine(raw).tolist() == [2.0, 1.5, 0.0, 0.0]  # NaN == None: function excluded; none left: 0
    assert int(raw.isnan().all(dim=1).sum()) == 2
    with pytest.raises(AlignRLError, match="reward function c returned inf at index 0"):
        RewardFunctions([f"{p}:c"], None, set(), "data").score(["q"] * 4, ["x"] * 4, [[1]] * 4, {})
    assert math.isnan(float(raw[2, 1]))


def test_signal_inside_stop_on_signals_saves_at_end_of_step(tiny_model, tmp_path):
    cfg, run, model, tok, opt, sched = _tiny_run(tiny_model, tmp_path, "save_steps=0")
    run.register(model, tok, optimizer=opt, scheduler=sched)
    # Python's own SIGINT handler, as in a foreground run (a background job inherits SIGINT ignored: next test)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with checkpoint.stop_on_signals():
            run.end_step(1)
            signal.raise_signal(signal.SIGINT)  # first signal: only a flag, no KeyboardInterrupt mid-step
            assert checkpoint.stop_requested() == signal.SIGINT
            with pytest.raises(checkpoint.TrainingStopped) as stopped:
                run.end_step(2)
            assert stopped.value.signum == signal.SIGINT and stopped.value.step == 2
            with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
                signal.raise_signal(signal.SIGINT)
        assert checkpoint.stop_requested() is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
    assert checkpoint.latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-2"
    # a fresh run in the same output_dir refuses to replace the earlier run; overwrite_output_dir=true replaces it
    with pytest.raises(AlignRLError, match=r"already holds an earlier train run \(checkpoint-2\); continue it with"):
        _tiny_run(tiny_model, tmp_path)
    assert checkpoint.latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-2"
    _tiny_run(tiny_model, tmp_path, "overwrite_output_dir=true")
    assert checkpoint.list_checkpoints(tmp_path / "run") == []


def test_ignored_sigint_stays_ignored_inside_stop_on_signals():
    """A job started in the background by a script (or under nohup) inherits SIGINT ignored: a Ctrl-C meant for
    the terminal's foreground job must not stop it. SIGTERM is still caught."""
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with checkpoint.stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            signal.raise_signal(signal.SIGINT)
            assert checkpoint.stop_requested() is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_grpo_counts_samples_without_applicable_reward(tiny_model, tmp_path):
    from alignrl.trainers import grpo

    write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(4)])
    (tmp_path / "r.py").write_text(
        "def half(prompts, completions, completion_ids, **kw):\n"
        "    return [None if i % 2 else float('nan') if i % 4 == 2 else 1.0 for i in range(len(completions))]\n"
    )
    cfg = load_config(
        grpo.GRPOConfig,
        None,
        [
            f"model={tiny_model}",
            f"train_file={tmp_path / 'rl.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            f"reward_funcs=[{tmp_path / 'r.py'}:half]",
            "prompts_per_step=2",
            "num_generations=4",
            "max_completion_length=3",
            "max_steps=1",
            "progress_bar=false",
        ],
    )
    grpo.train(cfg)
    (m,) = _metrics(tmp_path / "run")
    assert m["rewards/none_applicable"] == 6.0  # 4 None + 2 NaN of 8 samples
    assert m["rewards/half/mean"] == 1.0 and m["reward"] == 0.25  # excluded samples get 0 after combining
