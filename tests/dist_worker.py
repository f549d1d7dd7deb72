"""Worker for tests/test_distributed.py, run as `torchrun --nproc_per_node 2 tests/dist_worker.py MODEL OUT`.

Checks the pieces of alignrl.distributed on 2 gloo processes against single-process references computed on
every rank, and writes the measured errors to OUT/result.json (rank 0) for the test to assert on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from alignrl import checkpoint as ck
from alignrl import distributed as D
from alignrl.generation import SamplingParams, generate
from alignrl.models import load_causal_lm, load_tokenizer, save_pretrained_atomic


def grad_error(mode: str, model_dir: str, ids, attn, tmask) -> tuple[float, float]:
    """Max |grad - single-process grad| and max |param after one SGD step - reference| for a token-mean loss."""
    ref = D.PolicyLogProbs(load_causal_lm(model_dir))
    lp, _ = ref(ids, attn, tmask, start=1, chunk_tokens=7)
    (-lp.sum() / tmask.sum()).backward()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_opt.step()
    pol = D.wrap_model(D.PolicyLogProbs(load_causal_lm(model_dir)), mode, torch.device("cpu"))
    a, b = D.shard_bounds(ids.shape[0])
    n_global = D.all_reduce(int(tmask[a:b].sum()))
    lp, _ = pol(ids[a:b], attn[a:b], tmask[a:b], start=1, chunk_tokens=7)
    (-lp.sum() / n_global * D.grad_scale()).backward()
    opt = torch.optim.SGD(pol.parameters(), lr=0.5)
    g_err = 0.0
    for n, p in pol.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        g_err = max(g_err, float((g - ref_grads[n.removeprefix("module.")]).abs().max()))
    opt.step()
    full = D.full_state_dict(pol)
    p_err = 0.0
    if D.is_main():
        ref_sd = ref.lm.state_dict()
        p_err = max(float((v - ref_sd[k]).abs().max() / ref_sd[k].abs().max()) for k, v in full.items())
    return g_err, p_err


def main() -> None:
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    D.init("ddp", "cpu")
    res: dict = {"world_size": D.world_size()}
    # helpers
    res["shard"] = D.all_gather_objects([D.shard(list(range(10)), group=2)])
    res["all_reduce"] = D.all_reduce(D.rank() + 1.0)
    res["all_gather"] = D.all_gather(torch.arange(D.rank() + 1)).tolist()
    m = D.reduce_metrics({"loss": float(D.rank()), "tokens": 3.0, "time/x": float(D.rank())}, sum_keys=["tokens"])
    res["metrics"] = m
    torch.manual_seed(0)
    ids = torch.randint(4, 90, (4, 12))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # some left padding
    tmask = attn[:, 1:].clone()
    tmask[:, :4] = 0  # score the "completion" only
    for mode in ("ddp", "fsdp"):
        g, p = grad_error(mode, model_dir, ids, attn, tmask)
        res[f"{mode}_grad_err"] = D.all_reduce(g, "max")
        res[f"{mode}_param_rel_err"] = p
    # generation with sharded parameters: ranks stop at different lengths, twice, then training still works
    pol = D.wrap_model(D.PolicyLogProbs(load_causal_lm(model_dir)), "fsdp", torch.device("cpu"))
    lens = []
    for _ in range(2):
        with D.full_params(pol) as lm:
            torch.manual_seed(D.rank_seed(1))
            ro = generate(lm, ids[:2, :4], attn[:2, :4], SamplingParams(max_new_tokens=3 + 4 * D.rank()), [2], 0)
        lens.append(ro.completion_ids.shape[1])
    res["gen_lengths"] = D.all_gather_objects(lens)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-2)
    lp, _ = pol(ids, attn, tmask, start=1)
    lp.sum().backward()
    opt.step()
    opt.zero_grad()
    # final/ and sharded checkpoints
    tok = load_tokenizer(model_dir)
    full = D.full_state_dict(pol)
    if D.is_main():  # what loop.finish writes under fsdp
        save_pretrained_atomic(D.inner(pol), tok, out / "final", full)
    ck.save_sharded(out / "ckpt", pol, opt)
    with torch.no_grad():
        before, _ = pol(ids, attn, tmask, start=1)
    pol2 = D.wrap_model(D.PolicyLogProbs(load_causal_lm(model_dir)), "fsdp", torch.device("cpu"))
    opt2 = torch.optim.AdamW(pol2.parameters(), lr=1e-2)
    ck.load_sharded(out / "ckpt", pol2, opt2)
    with torch.no_grad():
        after, _ = pol2(ids, attn, tmask, start=1)
    res["reload_err"] = D.all_reduce(float((before - after).abs().max()), "max")
    # one more identical step on both: optimizer state must have been restored too
    for p_, o_ in ((pol, opt), (pol2, opt2)):
        lp, _ = p_(ids, attn, tmask, start=1)
        lp.sum().backward()
        o_.step()
    with torch.no_grad():
        res["reload_step_err"] = D.all_reduce(
            float((pol(ids, attn, tmask, start=1)[0] - pol2(ids, attn, tmask, start=1)[0]).abs().max()), "max"
        )
    # checkpoint-STEP layout: consolidated HF files + DCP shards + per-rank RNG, complete marker, exact reload
    torch.manual_seed(D.rank_seed(5))
    state = {"components": {}, "rng": ck.rng_state(), "run": {}}
    path = ck.save_checkpoint(out, 3, pol, tok, state, "x: 1\n", sharded=True, optimizer=opt)
    expected_rng = torch.rand(3)
    pol3 = D.wrap_model(D.PolicyLogProbs(load_causal_lm(model_dir)), "fsdp", torch.device("cpu"))
    opt3 = torch.optim.AdamW(pol3.parameters(), lr=1e-2)
    state = ck.load_checkpoint(path, pol3, sharded=True, optimizer=opt3)
    ck.set_rng_state(state["rng"])
    res["ckpt_complete"] = ck.is_complete(path) and (path / "distributed").is_dir() and state["step"] == 3
    res["ckpt_rng_ok"] = D.all_gather_objects([bool(torch.equal(torch.rand(3), expected_rng))])
    with torch.no_grad():
        res["ckpt_reload_err"] = D.all_reduce(
            float((pol(ids, attn, tmask, start=1)[0] - pol3(ids, attn, tmask, start=1)[0]).abs().max()), "max"
        )
    if D.is_main():
        from transformers import AutoModelForCausalLM

        sd = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
        res["final_err"] = max(float((sd[k] - v).abs().max()) for k, v in full.items())
        res["final_keys_match"] = sorted(full) == sorted(k for k in sd if k in full) and len(full) > 0
        (out / "result.json").write_text(json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
