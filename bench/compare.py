"""alignrl vs TRL on identical workloads, one run: `python -m bench.compare [--sizes 4m,30m] [--reps 3] ...`.

Builds the model directories and data, measures matmul FLOP/s per precision, checks first-step loss
equivalence with TRL, then runs every workload in its own subprocess (clean peak RSS), alternating alignrl
and TRL within each repetition, and writes medians and alignrl/TRL ratios to OUT/results.json and
OUT/results.md after every workload (partial results survive an interrupted run).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.setup import build_model, write_pairs, write_prompts


def matmul_flops(precision: str, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps FLOP/s of an n×n matmul (2n³ FLOPs) in fp32 or bf16: the MFU denominator."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_params(model_dir: Path) -> tuple[int, int, int]:
    """(matmul parameters excluding the embedding lookup and lm head, hidden size, vocab size) from config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    h, inter, n_layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * inter  # q,o + k,v (grouped-query: kv < q) + gate,up,down
    return n_layers * per_layer, h, vocab


def train_flops(model_dir: Path, n_seqs: int, seq_len: int, scored: int) -> float:
    """FLOPs of one training forward+backward: 6·N_trunk·tokens + 6·h·V·scored (lm head on scored tokens only).

    Attention score FLOPs (≈ 12·layers·h·seq per token) are left out: < 10% at these lengths, so MFU is a
    slight underestimate. TRL's extra lm-head work on prompt positions is not credited to it either.
    """
    n_trunk, h, vocab = model_params(model_dir)
    return 6 * n_trunk * n_seqs * seq_len + 6 * h * vocab * scored


def size_setting(text: str) -> dict[str, int] | int:
    """argparse type of a per-size option: "2" (every size) or "4m=4,30m=2"; a malformed value is a usage error."""
    try:
        if "=" not in text:
            return int(text)
        return {k: int(v) for k, v in (kv.split("=", 1) for kv in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or SIZE=N,SIZE=N (e.g. 4m=4,30m=2)") from None


def per_size(setting: dict[str, int] | int, size: str, default: int) -> int:
    """The value of a `size_setting` for one model size (`default` for sizes it does not name)."""
    return setting if isinstance(setting, int) else setting.get(size, default)


def run_worker(spec: dict | list[dict], out: Path):
    """Run bench.worker on a spec (or a list of specs, run one after another in one process) in a subprocess;
    its result (or list of results)."""
    spec_path, res_path = out / "spec.json", out / "result.json"
    spec_path.write_text(json.dumps(spec))
    res_path.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[1])  # so `bench` imports from any working directory
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.worker", str(spec_path), str(res_path)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        what = f"{spec['lib']} {spec['algo']}" if isinstance(spec, dict) else f"{len(spec)} workloads"
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(res_path.read_text())


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def alternate(libs: list[str], reps: int, make_spec, out: Path, label: str, runs: dict | None = None) -> dict:
    """Run `reps` repetitions of every library's workload, each in its own subprocess, the order of the libraries
    flipping every repetition; `make_spec(lib, rep)` gives the worker spec. Results are appended to `runs`
    (lib -> list of worker results), which is returned; repetitions already in it are not rerun."""
    runs = runs if runs is not None else {lib: [] for lib in libs}
    for rep in range(min(len(rs) for rs in runs.values()), reps):
        for lib in libs if rep % 2 == 0 else libs[::-1]:  # alternate which library goes first
            r = run_worker(make_spec(lib, rep), out)
            runs[lib].append(r)
            print(f"{label} {lib} rep{rep}: step {med(r['step']):.2f}s peak {r['peak_rss'] / 2**20:.0f} MiB",
                  flush=True)  # fmt: skip
    return runs


def lib_summary(rs: list[dict]) -> dict:
    """Medians over one library's repetitions of a workload: step time (over all timed steps), peak and
    pre-training RSS; for online algorithms also generation time and share, update time and completion length."""
    steps = [s for r in rs for s in r["step"]]
    d = {"step_s": med(steps), "steps": len(steps), "step_all_s": steps,
         "peak_rss_mib": med([r["peak_rss"] / 2**20 for r in rs]),
         "rss_before_mib": med([r["rss_before"] / 2**20 for r in rs])}  # fmt: skip
    if "generation" in rs[0]:
        d["gen_s"] = med([g for r in rs for g in r["generation"]])
        d["gen_share"] = d["gen_s"] / d["step_s"]
        d["update_s"] = med([u for r in rs for u in r["update"]])
        d["completion_length"] = statistics.mean(x for r in rs for x in r["completion_length"])
    else:
        d["train_total_s"] = med([r["total"] for r in rs])
    return d


def workload_spec(a: argparse.Namespace, out: Path, prompts: Path, row: dict, model: Path, lib: str, rep: int) -> dict:
    """The worker spec of one library's repetition of a workload (`row`: its size, algo, length, precision)."""
    algo, L = row["algo"], row["length"]
    spec = {
        "lib": lib, "algo": algo, "model": str(model), "precision": row["precision"],
        "steps": a.steps, "warmup": a.warmup, "threads": a.threads,
        "beta": a.beta if algo == "grpo" else 0.1,
        "out_dir": str(out / "runs" / f"{lib}_{algo}_{row['size']}_{L}_{row['precision']}_{rep}"),
    }  # fmt: skip
    if algo == "grpo":
        spec.update(data=str(prompts), prompts=a.prompts, G=a.G, length=L, micro_batch=row["alignrl_micro_batch"])
    else:
        spec.update(data=str(write_pairs(out, L)), batch=a.dpo_batch, max_length=L + 8,
                    accum=row["alignrl_accum"] if lib == "alignrl" else 1,
                    **({"ref_batch": a.dpo_ref_batch} if a.dpo_ref_batch else {}))  # fmt: skip
    return spec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--sizes", default="4m,30m")
    ap.add_argument("--lengths", default="64,128")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--algos", default="grpo,dpo")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    ap.add_argument("--G", type=int, default=8, help="GRPO completions per prompt")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--dpo-len", type=int, default=256)
    ap.add_argument("--dpo-batch", type=int, default=8, help="DPO pairs per optimizer step (both libraries)")
    ap.add_argument(
        "--dpo-accum",
        type=size_setting,
        default="1",
        help="alignrl DPO micro-batches per step: one number, or SIZE=N pairs (sizes not named: 1; the default "
        "leaves memory to micro_batch_tokens)",
    )
    ap.add_argument("--dpo-ref-batch", type=int, default=0,
                    help="alignrl DPO pairs per reference-pass forward (0: the trainer's default eval_batch_size)")
    ap.add_argument("--libs", default="alignrl,trl")
    ap.add_argument(
        "--micro-batch",
        type=size_setting,
        default="0",
        help="alignrl GRPO micro_batch_size (0: the trainer's default token budget): one number, or SIZE=N pairs "
        "(sizes not named: 0)",
    )
    ap.add_argument("--no-equivalence", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every workload (0: torch default)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    libs = [x for x in a.libs.split(",") if x != "trl" or importlib.util.find_spec("trl")]
    import torch

    results: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "command": " ".join([sys.executable, "-m", "bench.compare", *(argv if argv is not None else sys.argv[1:])]),
        "matmul_flops": {},
        "equivalence": {},
        "rows": [],
    }

    def save() -> None:
        # MFU against the best matmul rate measured in this run (at start and before every workload)
        for row in results["rows"]:
            for lib in libs:
                d = row.get(lib, {})
                if "train_flops" in d:
                    d["train_mfu"] = d["train_flops"] / d["update_s"] / results["matmul_flops"][row["precision"]]
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(to_markdown(results))

    precisions = a.precisions.split(",")
    if a.threads:
        torch.set_num_threads(a.threads)
        results["machine"]["torch_threads"] = a.threads
    results["machine"]["loadavg_start"] = os.getloadavg()
    for p in precisions:
        results["matmul_flops"][p] = matmul_flops(p)
        print(f"matmul 2048² {p}: {results['matmul_flops'][p] / 1e9:.0f} GFLOP/s", flush=True)
    prompts = write_prompts(out)
    if "trl" in libs and not a.no_equivalence:
        from bench.equivalence import grpo_losses

        ours, theirs = grpo_losses(str(build_model(out, "tiny")), str(prompts), beta=a.beta)
        results["equivalence"]["grpo"] = {"alignrl": ours, "trl": theirs, "abs_diff": abs(ours - theirs)}
        print(f"GRPO first-step loss: alignrl {ours:.8f}  TRL {theirs:.8f}  |diff| {abs(ours - theirs):.2e}")
        assert abs(ours - theirs) <= 1e-4, "GRPO loss differs from TRL's"
        save()
    has_dpo = importlib.util.find_spec("alignrl.trainers.dpo") is not None
    if "trl" in libs and not a.no_equivalence and has_dpo and "dpo" in a.algos:
        from bench.equivalence import dpo_losses

        ours, theirs = dpo_losses(str(build_model(out, "tiny", never_eos=False)), str(write_pairs(out, 32)))
        results["equivalence"]["dpo"] = {"alignrl": ours, "trl": theirs, "abs_diff": abs(ours - theirs)}
        print(f"DPO first-step loss: alignrl {ours:.8f}  TRL {theirs:.8f}  |diff| {abs(ours - theirs):.2e}")
        assert abs(ours - theirs) <= 1e-4, "DPO loss differs from TRL's"
        save()
    for size in a.sizes.split(","):
        model = build_model(out, size)
        work = []
        if "grpo" in a.algos:
            work += [("grpo", L, p) for L in map(int, a.lengths.split(",")) for p in precisions]
        if "dpo" in a.algos and has_dpo:
            work += [("dpo", a.dpo_len, p) for p in precisions]
        for algo, L, prec in work:
            model = build_model(out, size, never_eos=algo == "grpo")
            results["matmul_flops"][prec] = max(results["matmul_flops"][prec], matmul_flops(prec))
            row = {"size": size, "params": sum(model_params(model)[:1]), "algo": algo, "length": L, "precision": prec}
            if algo == "grpo":
                row["alignrl_micro_batch"] = per_size(a.micro_batch, size, 0)
            else:
                row["alignrl_accum"] = per_size(a.dpo_accum, size, 1)
            make_spec = functools.partial(workload_spec, a, out, prompts, row, model)
            runs = alternate(libs, a.reps, make_spec, out, f"{size} {algo} L={L} {prec}")
            for lib, rs in runs.items():
                row[lib] = lib_summary(rs)
                if algo == "grpo":
                    n = a.prompts * a.G
                    row[lib]["train_flops"] = train_flops(model, n, 12 + L, n * L)
            if "alignrl" in row and "trl" in row:
                row["ratio_step"] = row["alignrl"]["step_s"] / row["trl"]["step_s"]
                row["ratio_peak_rss"] = row["alignrl"]["peak_rss_mib"] / row["trl"]["peak_rss_mib"]
            row["loadavg"] = os.getloadavg()[0]
            results["rows"].append(row)
            save()
    print(to_markdown(results))
    return results


def to_markdown(res: dict) -> str:
    lines = [
        "| size | algo | len | prec | alignrl step s | TRL step s | ratio | alignrl gen share | TRL gen share "
        "| alignrl peak MiB | TRL peak MiB | ratio | alignrl train MFU | TRL train MFU |",
        "|" + "---|" * 14,
    ]
    for r in res["rows"]:
        a, t = r.get("alignrl", {}), r.get("trl", {})

        def f(d, k, fmt="{:.2f}"):
            return fmt.format(d[k]) if k in d else "–"

        lines.append(
            f"| {r['size']} | {r['algo']} | {r['length']} | {r['precision']} | {f(a, 'step_s')} | {f(t, 'step_s')} "
            f"| {f(r, 'ratio_step')} | {f(a, 'gen_share', '{:.0%}')} | {f(t, 'gen_share', '{:.0%}')} "
            f"| {f(a, 'peak_rss_mib', '{:.0f}')} | {f(t, 'peak_rss_mib', '{:.0f}')} | {f(r, 'ratio_peak_rss')} "
            f"| {f(a, 'train_mfu', '{:.0%}')} | {f(t, 'train_mfu', '{:.0%}')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
