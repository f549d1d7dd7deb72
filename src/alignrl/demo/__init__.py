"""The embedded demo: from nothing to SFT to RL on a synthetic arithmetic task, with a before/after table.

Shared pipeline here (task data, tiny model, SFT, accuracy); each algorithm's stage is a module in this
package (`alignrl.demo.grpo`, ...) exposing `run(ctx: DemoContext) -> list[tuple[str, str]]` table rows.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignrl.algorithms import ALGORITHMS
from alignrl.data import load_rows, write_jsonl
from alignrl.demo.task import DemoTask, make_task
from alignrl.errors import AlignRLError

# the registered algorithms with a demo stage in this package (the SFT stage runs before every one of them)
ALGOS = tuple(a for a in ALGORITHMS if importlib.util.find_spec(f"alignrl.demo.{a}") is not None)
SFT_STEPS = 1200
# the run directories (under --out) of each demo, in the order its report shows them: the demo's stage first
DEMO_RUNS = {"grpo": ("grpo", "sft"), "dpo": ("dpo", "sft"), "rm": ("rm", "sft"), "ppo": ("ppo", "rm", "sft"),
             "smollm2": ("smollm2/grpo",)}  # fmt: skip


@dataclass
class DemoContext:
    """What every demo stage shares: paths, seed, the task, the SFT model and the accuracy measure."""

    root: Path
    seed: int
    quick: bool
    task: DemoTask
    t0: float = field(default_factory=time.perf_counter)
    rollout_engine: str = "native"  # what samples the RL stage's rollouts (the evaluation stays native)

    def data(self, name: str) -> str:
        return str(self.root / "data" / f"{name}.jsonl")

    def log(self, msg: str) -> None:
        print(f"[demo {time.perf_counter() - self.t0:5.0f}s] {msg}", flush=True)

    def steps(self, full: int, quick: int = 2) -> int:
        return quick if self.quick else full

    def sft_model(self) -> str:
        """The SFT model directory, trained once per (seed, quick) and reused by later demo runs."""
        from alignrl.config import load_config
        from alignrl.models import init_model
        from alignrl.trainers import sft

        final = self.root / "sft" / "final"
        marker = self.root / "sft" / "demo.json"
        key = {"seed": self.seed, "steps": self.steps(SFT_STEPS, 20)}
        if (final / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
            self.log(f"reusing SFT model {final}")
            return str(final)
        self.log(f"creating a tiny model in {self.root / 'model'}")
        init_model(self.root / "model", hidden_size=128, num_layers=4, num_heads=4, max_length=64, seed=self.seed,
                   overwrite=True)  # the demo's own working directory
        self.log("SFT on the careless teacher's worked solutions")
        cfg = load_config(sft.SFTConfig, None, [
            f"model={self.root / 'model'}", f"train_file={self.data('sft')}", f"output_dir={self.root / 'sft'}",
            f"seed={self.seed}", "batch_size=64", "max_length=32", "learning_rate=1e-3", "warmup_steps=50",
            "lr_scheduler=cosine", f"max_steps={key['steps']}", "weight_decay=0.01",
            f"logging_steps={self.steps(20, 2)}", "overwrite_output_dir=true",
        ])  # fmt: skip
        out = str(sft.train(cfg))
        marker.write_text(json.dumps(key))
        return out

    def accuracy(self, model_dir: str) -> float:
        """Greedy exact-match accuracy of the final answer on the held-out test set (`alignrl eval`)."""
        from alignrl.evaluation import evaluate_model

        return evaluate_model(model_dir, self.data("test"), ["gsm8k"], max_new_tokens=24, batch_size=250).accuracy


def run_demo(
    algo: str, out: str, seed: int = 0, quick: bool = False, model: str = "tiny", rollout_engine: str = "native"
) -> list[tuple[str, str]]:
    """Run SFT then the chosen algorithm's stage (or, with model=smollm2, GRPO on the real model), print a
    before/after table and the path of the runs' report (`alignrl report`), return the table's rows."""
    if algo not in ALGOS:
        raise AlignRLError(f"--algo: {algo!r} is not a demo (choose from {', '.join(ALGOS)})")
    if rollout_engine != "native" and algo != "grpo":
        raise AlignRLError(f"--rollout-engine {rollout_engine}: the GRPO demo only (leave out --algo)")
    if model not in ("tiny", "smollm2"):
        raise AlignRLError(f"--model: {model!r} is not a demo model (choose from tiny, smollm2)")
    t0 = time.perf_counter()
    if model == "smollm2":
        if algo != "grpo":
            raise AlignRLError("--model smollm2 runs the GRPO demo (leave out --algo)")
        from alignrl.demo import smollm2

        rows = smollm2.run(out, seed=seed, quick=quick, rollout_engine=rollout_engine)
    else:
        try:
            stage = importlib.import_module(f"alignrl.demo.{algo}")
        except ModuleNotFoundError:
            raise AlignRLError(f"--algo: the {algo} demo is not available in this version") from None
        root = Path(out)
        ctx = DemoContext(root=root, seed=seed, quick=quick, task=make_task(seed), t0=t0, rollout_engine=rollout_engine)
        write_jsonl(ctx.data("sft"), ctx.task.sft)
        write_jsonl(ctx.data("rl"), ctx.task.rl)
        write_jsonl(ctx.data("test"), ctx.task.test)
        load_rows(ctx.data("test"))  # the same loader users' data goes through
        rows = stage.run(ctx)
    wall = time.perf_counter() - t0
    print_table(rows, wall)
    print(f"\nreport: {write_report(Path(out), 'smollm2' if model == 'smollm2' else algo)}")
    return rows + [("wall time", f"{wall:.0f}s")]


def print_table(rows: list[tuple[str, str]], wall: float) -> None:
    """A demo's before/after table and its wall time."""
    width = max(len(r[0]) for r in rows) + 2
    print()
    for name, value in rows:
        print(f"  {name:<{width}}{value}")
    print(f"  {'wall time':<{width}}{wall:.0f}s")


def write_report(root: Path, demo: str) -> Path:
    """`alignrl report` of a demo's runs (those of DEMO_RUNS[demo] under `root`): ROOT/report-DEMO.html."""
    from alignrl.report import make_report

    runs = [root / d for d in DEMO_RUNS[demo] if (root / d / "metrics.jsonl").is_file()]
    title = "alignrl demo --model smollm2" if demo == "smollm2" else f"alignrl demo --algo {demo}"
    return make_report(runs, root / f"report-{demo}.html", title=title)
