"""The benchmark grid: every cell alignrl and TRL side by side in one run, alternating, medians.

    python -m bench.grid                                            # the whole grid (hours; see --only)
    python -m bench.grid --only algo=grpo,model=4m --steps 2 --reps 3 # one part of it
    python -m bench.grid --smoke                                    # every algorithm once, tiny model (CI)

Cells: model (1m, 4m, 30m: bench.setup Llamas; smollm2: SmolLM2-135M-Instruct full fine-tune; smollm2-lora: the
same with LoRA r 16 on q/k/v/o) × algorithm (grpo, dpo, sft, rm, ppo) × completion length (8, 32, 128, 512) ×
precision (fp32, bf16 autocast), plus with --natural the online algorithms with real EOS (lengths up to L, the
mean recorded per side). In natural cells SmolLM2-Instruct gets the arithmetic questions as conversations, a task
it was trained for, and ends its answers itself; the random-weight bench models stop at their untrained EOS rate.
Forced-length cells sample from a copy of the model whose EOS id lies outside its vocabulary
(bench.setup.build_model), so both libraries generate exactly L tokens. alignrl runs with its defaults
(micro-batches by micro_batch_tokens); TRL with the settings of bench/worker.py. Offline algorithms train on 16
prompt tokens + L response tokens (+ EOS).

Each workload runs in its own subprocess (bench.worker: clean peak RSS), the libraries alternating; a cell runs
--reps repetitions of --warmup + --steps steps each, fewer when its first repetition shows that the rest would
overrun --cell-budget seconds (the steps measured are recorded per side). The run also measures the matmul
FLOP/s and the memory bandwidth (a large tensor copy) of this machine, and rates alignrl's decode speed
(completion tokens / generation time) against the decode roofline at that batch: min(FLOP-bound, bandwidth-bound),
with 2·N FLOPs per token and the weights (+ the KV cache) read once per decode step. The results JSON and a
markdown table next to it are rewritten after every cell.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from bench.compare import alternate, lib_summary, matmul_flops, model_params, run_worker
from bench.setup import PRETRAINED, build_model, write_chat_prompts, write_pairs, write_prompts, write_sft
from bench.worker import RUNNERS

MODELS = ("1m", "4m", "30m", "smollm2", "smollm2-lora")
ALGOS = ("grpo", "dpo", "sft", "rm", "ppo")
ONLINE = ("grpo", "ppo")
LORA_RANK = 16
PROMPT_TOKENS = 16  # offline algorithms: prompt tokens before the L response tokens
# per-step work, the same for both libraries: completions (grpo: prompts × G; ppo: prompts × 1), pairs, sequences
SHAPES = {
    "full": {"grpo": {"prompts": 4, "G": 8}, "ppo": {"prompts": 32}, "dpo": {"batch": 8}, "rm": {"batch": 8},
             "sft": {"batch": 32}},
    "smoke": {"grpo": {"prompts": 1, "G": 2}, "ppo": {"prompts": 2}, "dpo": {"batch": 2}, "rm": {"batch": 2},
              "sft": {"batch": 2}},
}  # fmt: skip
ONLY_KEYS = {"model": "model", "size": "model", "algo": "algo", "length": "length", "len": "length",
             "precision": "precision", "prec": "precision", "eos": "eos"}  # fmt: skip


def only_filter(text: str) -> dict[str, set[str]]:
    """argparse type of --only: KEY=VALUE pairs, comma-separated; a key given twice matches either value."""
    out: dict[str, set[str]] = {}
    for kv in filter(None, text.split(",")):
        key, _, value = kv.partition("=")
        if key not in ONLY_KEYS or not value:
            raise argparse.ArgumentTypeError(f"{kv!r}: expected KEY=VALUE with KEY one of {', '.join(ONLY_KEYS)}")
        out.setdefault(ONLY_KEYS[key], set()).add(value)
    return out


def grid_cells(a: argparse.Namespace) -> list[dict]:
    """The cells of the grid (model-major, so each model directory is built once) that pass one of the --only
    filters (all cells without one)."""
    cells = []
    for model in a.models.split(","):
        for algo in a.algos.split(","):
            modes = (["forced", "natural"] if a.natural else ["forced"]) if algo in ONLINE else ["-"]
            for length in a.lengths.split(","):
                for prec in a.precisions.split(","):
                    for eos in modes:
                        cell = {"model": model, "algo": algo, "length": int(length), "precision": prec, "eos": eos}
                        if not a.only or any(all(str(cell[k]) in v for k, v in f.items()) for f in a.only):
                            cell["name"] = "_".join(str(v) for v in cell.values())
                            cells.append(cell)
    return cells


def copy_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Best-of-reps bytes/s of a float32 tensor copy (read + write), far larger than the last-level cache."""
    import torch

    src = torch.ones(mib * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def decode_roofline(model: Path, rows: int, context: float, precision: str, flops: float, bandwidth: float) -> dict:
    """Tokens/s a decode step over `rows` sequences can reach at most: 2·N FLOPs per token (N: every matmul
    weight, the lm head included), and per step the weights and the KV cache at `context` positions read once, both
    in bf16 in the bf16 column (as alignrl keeps them there), float32 otherwise."""
    c = json.loads((model / "config.json").read_text())
    trunk, h, vocab = model_params(model)
    n = trunk + h * vocab
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    width = 2 if precision == "bf16" else 4
    kv_bytes = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * width
    step_bytes = n * width + kv_bytes * rows * context
    bounds = {"flop_bound_tok_s": flops / (2 * n), "bandwidth_bound_tok_s": rows * bandwidth / step_bytes}
    return {**bounds, "roofline_tok_s": min(bounds.values()), "decode_params": n}


def prompt_tokens(model: Path, prompts: Path) -> float:
    """Mean tokenized length of the GRPO/PPO prompts for this model's tokenizer."""
    from alignrl.models import load_tokenizer

    tok = load_tokenizer(str(model))
    rows = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    texts = [p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in rows]  # fmt: skip
    return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts) / len(texts)


class Grid:
    """Inputs shared by the cells of one run (directories, data, per-step shapes, measured machine rates)."""

    def __init__(self, a: argparse.Namespace, out: Path, libs: list[str], results: dict):
        self.a, self.out, self.libs, self.results = a, out, libs, results
        self.shape = results["shapes"]
        self.prompts, self.chat_prompts = write_prompts(out), write_chat_prompts(out)

    def model_dir(self, cell: dict) -> Path:
        base = cell["model"].removesuffix("-lora")
        return build_model(self.out, base, never_eos=cell["eos"] == "forced")

    def data(self, cell: dict) -> Path:
        base = cell["model"].removesuffix("-lora")
        if cell["algo"] in ONLINE:
            # natural lengths on a trained task: the instruction-tuned model answers the questions in its chat format
            return self.chat_prompts if cell["eos"] == "natural" and base in PRETRAINED else self.prompts
        tok = None
        if base in PRETRAINED:
            from alignrl.models import load_tokenizer

            tok = load_tokenizer(str(self.model_dir(cell)))
        L = cell["length"]
        pairs = write_pairs(self.out, PROMPT_TOKENS + L, prompt_len=PROMPT_TOKENS, tokenizer=tok,
                            tag=base if tok else "")  # fmt: skip
        return write_sft(pairs) if cell["algo"] == "sft" else pairs

    def spec(self, cell: dict, lib: str, rep: int) -> dict:
        a, algo, L = self.a, cell["algo"], cell["length"]
        spec = {
            "lib": lib, "algo": algo, "model": str(self.model_dir(cell)), "data": str(self.data(cell)),
            "precision": cell["precision"], "steps": a.steps, "warmup": a.warmup, "threads": a.threads,
            "lora": LORA_RANK if cell["model"].endswith("-lora") else 0,
            "out_dir": str(self.out / "runs" / f"{lib}_{cell['name']}_{rep}"), **self.shape[algo],
        }  # fmt: skip
        if algo in ONLINE:
            spec.update(length=L, natural=cell["eos"] == "natural", beta=0.04)
        else:
            spec.update(max_length=PROMPT_TOKENS + L + 8, beta=0.1)
        return spec

    def rows_per_step(self, algo: str) -> int:
        s = self.shape[algo]
        return s["prompts"] * s.get("G", 1) if algo in ONLINE else s["batch"] * (1 if algo == "sft" else 2)

    def libs_of(self, cell: dict) -> list[str]:
        """The libraries that run this cell (TRL 1.16 has no PPO trainer)."""
        return [lib for lib in self.libs if (lib, cell["algo"]) in RUNNERS]

    def measure_machine(self) -> None:
        """The best matmul rate per precision and copy bandwidth seen in this run (measured again per cell)."""
        res, small = self.results, self.a.smoke
        for p in self.a.precisions.split(","):
            res["matmul_flops"][p] = max(res["matmul_flops"].get(p, 0.0), matmul_flops(p, 512 if small else 2048))
        res["copy_bandwidth"] = max(res.get("copy_bandwidth", 0.0), copy_bandwidth(64 if small else 512))


def summarize(grid: Grid, cell: dict, runs: dict[str, list[dict]]) -> dict:
    """A cell's row: per-library medians, alignrl/TRL ratios and, for online algorithms, decode speed against
    the roofline at this batch."""
    row = {k: v for k, v in cell.items() if k != "name"}
    if "trl" in grid.libs and "trl" not in grid.libs_of(cell):
        row["note"] = f"TRL {metadata.version('trl')} has no {cell['algo'].upper()} trainer (none in trl.experimental)"
    rows = grid.rows_per_step(cell["algo"])
    lora = LORA_RANK if cell["model"].endswith("-lora") else 0
    row.update(rows_per_step=rows, params=model_params(grid.model_dir(cell))[0], lora_r=lora)
    for lib, rs in runs.items():
        row[lib] = d = lib_summary(rs)
        if "gen_s" in d:
            d["decode_tok_s"] = rows * d["completion_length"] / d["gen_s"]
    if "alignrl" in row and "trl" in row:
        row["ratio_step"] = row["alignrl"]["step_s"] / row["trl"]["step_s"]
        row["ratio_peak_rss"] = row["alignrl"]["peak_rss_mib"] / row["trl"]["peak_rss_mib"]
    if "decode_tok_s" in row.get("alignrl", {}):
        a = row["alignrl"]
        context = prompt_tokens(grid.model_dir(cell), grid.data(cell)) + a["completion_length"] / 2
        prec = cell["precision"]
        row["decode"] = decode_roofline(grid.model_dir(cell), rows, context, prec, grid.results["matmul_flops"][prec],
                                        grid.results["copy_bandwidth"])  # fmt: skip
        if rows >= 32:
            row["decode"]["alignrl_pct_roofline"] = a["decode_tok_s"] / row["decode"]["roofline_tok_s"]
    return row


def run_cell(grid: Grid, cell: dict) -> dict:
    """Both libraries' repetitions of one cell, alternating: the first repetition, then as many more (up to
    --reps) as fit in --cell-budget at the first one's pace."""
    a, label, libs = grid.a, cell["name"], grid.libs_of(cell)
    t0 = time.perf_counter()
    runs = alternate(libs, 1, lambda lib, rep: grid.spec(cell, lib, rep), grid.out, label)
    per_rep = time.perf_counter() - t0
    reps = max(1, min(a.reps, math.floor(a.cell_budget / per_rep))) if per_rep > 0 else a.reps
    alternate(libs, reps, lambda lib, rep: grid.spec(cell, lib, rep), grid.out, label, runs)
    row = summarize(grid, cell, runs)
    row["reps"], row["wall_s"] = reps, time.perf_counter() - t0
    return row


def run_smoke(grid: Grid, cells: list[dict]) -> list[dict]:
    """All cells' workloads of one library in one worker process (one interpreter start per library)."""
    runs: dict[str, dict[str, list[dict]]] = {c["name"]: {} for c in cells}
    for lib in grid.libs:
        mine = [c for c in cells if lib in grid.libs_of(c)]
        for c, r in zip(mine, run_worker([grid.spec(c, lib, 0) for c in mine], grid.out)):
            runs[c["name"]][lib] = [r]
    return [{**summarize(grid, c, runs[c["name"]]), "reps": 1} for c in cells]


def machine_facts() -> dict:
    import torch

    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
    versions = {m: metadata.version(m) for m in ("transformers", "trl", "peft") if importlib.util.find_spec(m)}
    return {
        "cpus": os.cpu_count(), "cpu": names[0] if names else platform.processor(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, **versions,
        "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "loadavg_start": os.getloadavg(), "start_utc": utc_now(),
    }  # fmt: skip


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/grid", help="model directories, data and run directories")
    ap.add_argument("--results", default="bench/results/grid.json", help="results JSON (overwritten; .md beside it)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--lengths", default="8,32,128,512")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--natural", action="store_true", help="also the online algorithms with real EOS")
    keys = ", ".join(ONLY_KEYS)
    ap.add_argument("--only", type=only_filter, action="append", default=[],
                    help=f"e.g. algo=grpo,model=4m (keys: {keys}); given again: the cells of either")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3, help="repetitions per library (alternating)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per repetition (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cell-budget", type=float, default=900.0, help="seconds a cell may take before reps are cut")
    ap.add_argument("--libs", default="alignrl,trl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every workload (0: torch default)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, length 4, 1 step, every algorithm once")
    a = ap.parse_args(argv)
    if a.smoke:
        smoke = {"models": "tiny", "algos": ",".join(ALGOS), "lengths": "4", "precisions": "fp32", "steps": 1,
                 "warmup": 0, "reps": 1}  # fmt: skip
        vars(a).update(smoke)
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    res_path = Path(a.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    libs = [x for x in a.libs.split(",") if x != "trl" or importlib.util.find_spec("trl")]
    command = " ".join([sys.executable, "-m", "bench.grid", *(argv if argv is not None else sys.argv[1:])])
    shapes = SHAPES["smoke" if a.smoke else "full"]
    res: dict = {"command": command, "machine": machine_facts(), "shapes": shapes, "matmul_flops": {}, "cells": []}
    grid = Grid(a, out, libs, res)
    grid.measure_machine()
    print(f"matmul GFLOP/s {({p: round(f / 1e9) for p, f in res['matmul_flops'].items()})}, "
          f"copy {res['copy_bandwidth'] / 1e9:.1f} GB/s", flush=True)  # fmt: skip

    def save() -> None:
        res["machine"]["end_utc"] = utc_now()
        res_path.write_text(json.dumps(res, indent=1) + "\n")
        res_path.with_suffix(".md").write_text(to_markdown(res))

    cells = grid_cells(a)
    if a.smoke:
        res["cells"] = run_smoke(grid, cells)
    for cell in [] if a.smoke else cells:
        grid.measure_machine()
        try:
            row = run_cell(grid, cell)
        except RuntimeError as e:  # a failed workload (e.g. out of memory) is recorded, the grid goes on
            row = {k: v for k, v in cell.items() if k != "name"} | {"error": str(e)[-2000:]}
            print(f"{cell['name']}: FAILED\n{row['error']}", flush=True)
        row["loadavg"] = os.getloadavg()[0]
        res["cells"].append(row)
        shutil.rmtree(out / "runs", ignore_errors=True)  # final models of finished runs (SmolLM2: 0.5 GB each)
        save()
    save()
    print(to_markdown(res))
    return res


def _fmt(d: dict, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(d[key]) if isinstance(d.get(key), (int, float)) and not math.isnan(d[key]) else "–"


def to_markdown(res: dict) -> str:
    m = res["machine"]
    head = [
        f"Command: `{res['command']}`",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), torch {m['torch']} with {m['torch_threads']} threads, "
        f"transformers {m.get('transformers', '–')}, TRL {m.get('trl', '–')}, load average at start "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg_start'])}, {m['start_utc']} – {m.get('end_utc', '')} UTC. "
        "Matmul " + ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in res["matmul_flops"].items())
        + f", copy bandwidth {res['copy_bandwidth'] / 1e9:.1f} GB/s.",
        "",
        "| model | algo | len | prec | EOS (mean len a / T) | alignrl step s | TRL step s | ratio | gen share a / T "
        "| alignrl peak MiB | TRL peak MiB | ratio | decode tok/s (% roofline) | steps a / T | note |",
        "|" + "---|" * 15,
    ]
    shapes = "; ".join(f"{algo} " + ", ".join(f"{k} {v}" for k, v in d.items()) for algo, d in res["shapes"].items())
    legend = [
        "",
        "Step s: median over all timed steps of all repetitions; peak MiB: median of the workers' peak RSS (VmHWM). "
        f"Work per step: {shapes}. Decode tok/s: "
        "alignrl's completion tokens / its generation phase (prefill, sampling, rewards), and in brackets its share "
        "of the decode roofline at that batch (batches of ≥ 32 rows): min(matmul FLOP/s / 2N, bandwidth × rows / "
        "bytes read per step), N every matmul weight incl. the lm head, bytes = weights + KV cache (both bf16 in "
        "bf16 cells).",
    ]
    lines = []
    for r in res["cells"]:
        a, t = r.get("alignrl", {}), r.get("trl", {})
        eos = r["eos"] if r["eos"] != "natural" else f"natural ({_fmt(a, 'completion_length', '{:.1f}')} / " \
            f"{_fmt(t, 'completion_length', '{:.1f}')})"  # fmt: skip
        gen = f"{_fmt(a, 'gen_share', '{:.0%}')} / {_fmt(t, 'gen_share', '{:.0%}')}" if "gen_share" in a else "–"
        dec = r.get("decode", {})
        decode = f"{_fmt(a, 'decode_tok_s', '{:.0f}')} ({_fmt(dec, 'alignrl_pct_roofline', '{:.0%}')})" if dec else "–"
        note = r.get("note", "") + (" FAILED: " + r["error"].strip().splitlines()[-1] if "error" in r else "")
        lines.append(
            f"| {r['model']} | {r['algo']} | {r['length']} | {r['precision']} | {eos} | {_fmt(a, 'step_s')} "
            f"| {_fmt(t, 'step_s')} | {_fmt(r, 'ratio_step')} | {gen} | {_fmt(a, 'peak_rss_mib', '{:.0f}')} "
            f"| {_fmt(t, 'peak_rss_mib', '{:.0f}')} | {_fmt(r, 'ratio_peak_rss')} | {decode} "
            f"| {a.get('steps', '–')} / {t.get('steps', '–')} | {note.strip()} |"
        )
    return "\n".join(head + lines + legend) + "\n"


if __name__ == "__main__":
    main()
