"""Multi-process training pieces on 2 gloo processes (CPU): sharding, global reductions, DDP and FSDP2 updates equal
to the single-process update, generation with sharded parameters, final/ and sharded (DCP) checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alignrl import distributed as D
from alignrl.data import pad_batch

HERE = Path(__file__).parent


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node N ARGS...` (a free port each time) and fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    for _ in range(2):  # one retry when the rendezvous port was taken by a concurrent job (not a test failure)
        proc = _run_group(cmd, env, timeout)
        if proc.returncode == 0 or not any(e in proc.stderr for e in _PORT_ERRORS):
            break
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun starts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _run_group(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run cmd in its own process group and kill it and all its descendants afterwards, so a hung or timed-out
    run leaves no orphaned torchrun workers behind."""
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", f"timed out after {timeout}s"
        for pid in _descendants(popen.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
    return subprocess.CompletedProcess(cmd, popen.returncode, out, err)


_PORT_ERRORS = ("Address already in use", "EADDRINUSE", "DistNetworkError", "RendezvousConnectionError")


def test_shard_bounds_are_disjoint_whole_groups(monkeypatch):
    for n, group, world in [(10, 2, 2), (12, 3, 2), (8, 1, 3), (6, 2, 4), (0, 1, 2)]:
        shares = []
        for r in range(world):
            monkeypatch.setattr(D, "rank", lambda r=r: r)
            monkeypatch.setattr(D, "world_size", lambda w=world: w)
            a, b = D.shard_bounds(n, group)
            assert a % group == 0 and b % group == 0
            shares.append(list(range(a, b)))
        flat = [i for s in shares for i in s]
        assert flat == list(range(n)), (n, group, world, shares)
        sizes = [len(s) // group for s in shares]
        assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main()
    assert D.shard([1, 2, 3]) == [1, 2, 3] and D.all_reduce(2.5) == 2.5 and D.grad_scale() == 1.0
    assert D.reduce_metrics({"loss": 1.0}) == {"loss": 1.0}
    assert D.rank_seed(7) == 7


def test_torchrun_without_distributed_option_is_an_error(monkeypatch):
    from alignrl.errors import AlignRLError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(AlignRLError, match="distributed=ddp or fsdp"):
        D.init("none", "cpu")


def test_two_ranks_ddp_and_fsdp_match_single_process(tiny_model, tmp_path):
    """One torchrun job (about 20 s) checks every piece against references computed in-process on each rank."""
    torchrun([str(HERE / "dist_worker.py"), tiny_model, str(tmp_path)])
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world_size"] == 2, res
    assert res["shard"] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]], res
    assert res["all_reduce"] == 3.0 and res["all_gather"] == [0, 0, 1], res
    assert res["metrics"] == {"loss": 0.5, "tokens": 6.0, "time/x": 1.0}, res
    for mode in ("ddp", "fsdp"):
        assert res[f"{mode}_grad_err"] < 1e-6, res
        assert res[f"{mode}_param_rel_err"] < 1e-5, res
    assert res["gen_lengths"] == [3, 3, 7, 7], res  # rank 1 generated longer than rank 0 without a hang
    assert res["reload_err"] == 0.0 and res["reload_step_err"] == 0.0, res
    assert res["final_keys_match"] and res["final_err"] == 0.0, res
    assert res["ckpt_complete"] and res["ckpt_rng_ok"] == [True, True] and res["ckpt_reload_err"] == 0.0, res


def test_seeded_sampling_does_not_depend_on_the_batch_split(tiny_model):
    """Rows sampled with per-row seeds give the same completions in one batch or split in two (as over ranks)."""
    import torch

    from alignrl.generation import SamplingParams, generate
    from alignrl.models import load_causal_lm

    model = load_causal_lm(tiny_model).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20)
    seeds = [101, 102, 103, 104]
    whole = generate(model, *pad_batch(prompts, 0, left=True), params, [2], 0, seeds=seeds)
    parts = [
        generate(model, *pad_batch(prompts[a:b], 0, left=True), params, [2], 0, seeds=seeds[a:b])
        for a, b in ((0, 1), (1, 4))
    ]
    torch.manual_seed(123)  # the global RNG plays no part
    again = generate(model, *pad_batch(prompts, 0, left=True), params, [2], 0, seeds=seeds)
    assert whole.completion_lists() == parts[0].completion_lists() + parts[1].completion_lists()
    assert whole.completion_lists() == again.completion_lists()
    other = generate(model, *pad_batch(prompts, 0, left=True), params, [2], 0, seeds=[s + 7 for s in seeds])
    assert whole.completion_lists() != other.completion_lists()


def test_seeded_sampling_draws_from_the_filtered_distribution():
    """Inverse-CDF draws at uniform u have the frequencies of softmax(logits / T) after top-k (float64 reference)."""
    import torch

    from alignrl.generation import SamplingParams, _sample

    torch.manual_seed(0)
    logits = torch.randn(1, 12).repeat(40000, 1)
    params = SamplingParams(temperature=0.7, top_k=5)
    tok, _ = _sample(logits, params, torch.rand(40000))
    ref = torch.full((12,), float("-inf"), dtype=torch.float64)
    top = logits[0].double().topk(5).indices
    ref[top] = logits[0].double()[top] / 0.7
    expected = ref.softmax(-1)
    freq = torch.bincount(tok, minlength=12).double() / 40000
    assert (freq - expected).abs().max() < 0.01 and freq[expected == 0].sum() == 0


def test_unintegrated_algorithm_under_torchrun_is_a_one_line_error(monkeypatch, capsys):
    from alignrl import cli
    from alignrl.algorithms import ALGORITHMS, AlgorithmSpec

    toy = AlgorithmSpec("alignrl.trainers.ppo", "PPOConfig", "a trainer not integrated with torchrun", False)
    monkeypatch.setitem(ALGORITHMS._entries, "toy", toy)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "toy", "model=x", "distributed=ddp"]) == 2
    assert "toy: multi-process (torchrun) runs are not supported yet" in capsys.readouterr().err
