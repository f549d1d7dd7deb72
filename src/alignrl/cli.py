"""Command line: `alignrl init-model`, `alignrl train ALGO --config FILE [key=value ...]`, `alignrl eval`,
`alignrl demo`, `alignrl report`, `alignrl vllm-serve MODEL`."""

from __future__ import annotations

import argparse
import os
import sys

from alignrl.algorithms import ALGORITHMS
from alignrl.errors import AlignRLError


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_training(algo: str, config: str | None, overrides: list[str]):
    """Load ALGO's config (YAML + overrides) and train; returns the final model directory."""
    from alignrl.config import load_config

    spec = ALGORITHMS[algo]  # an unknown name: one line listing the choices
    module, config_class = spec.load()
    from alignrl.distributed import env_world_size, shutdown

    if env_world_size() > 1 and not spec.multi_process:
        raise AlignRLError(f"{algo}: multi-process (torchrun) runs are not supported yet; run it in one process")
    cfg = load_config(config_class, config, overrides)
    final = module.train(cfg)
    shutdown()  # torchrun: leave the process group now that train() and its DDP/FSDP wrappers are gone
    return final


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 on bad input (one line on stderr), 1 on a system error, 128+N after a
    signal."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also during start-up (imports, model loading), before any handler is installed
        print("alignrl: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="alignrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_init = sub.add_parser("init-model", help="create a small Llama-style model with a character tokenizer")
    p_init.add_argument("--out", required=True, help="output directory (a normal HF model directory)")
    p_init.add_argument("--hidden-size", type=int, default=128)
    p_init.add_argument("--layers", type=int, default=4)
    p_init.add_argument("--heads", type=int, default=4)
    p_init.add_argument("--max-length", type=int, default=256)
    p_init.add_argument("--seed", type=int, default=0)
    p_init.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")

    p_train = sub.add_parser("train", help="train with an algorithm: " + ", ".join(ALGORITHMS))
    p_train.description = "algorithms:\n" + "\n".join(f"  {n:<13} {ALGORITHMS[n].summary}" for n in ALGORITHMS)
    p_train.formatter_class = argparse.RawDescriptionHelpFormatter
    p_train.add_argument("algo")
    p_train.add_argument("--config", help="YAML config file")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides")

    p_eval = sub.add_parser("eval", help="accuracy of a model on a prompt file with reward functions")
    p_eval.add_argument("--model", required=True, help="HF model directory or .gguf file")
    p_eval.add_argument("--data", required=True, help="JSONL file or datasets directory with a prompt column")
    p_eval.add_argument("--reward-funcs", default="", help="comma-separated: built-ins, module:function, file.py:fn")
    p_eval.add_argument("--environment", help="multi-turn episodes with this environment (built-in or module:Class)")
    p_eval.add_argument("--tools", default="", help="comma-separated tool functions for the episodes")
    p_eval.add_argument("--max-turns", type=int, default=0, help="assistant turns per episode (0: the environment's)")
    p_eval.add_argument("--json", help="also write the results as JSON to this file")
    p_eval.add_argument("--max-new-tokens", type=int, default=256)
    p_eval.add_argument("--max-prompt-length", type=int, default=1024)
    p_eval.add_argument("--batch-size", type=int, default=32)
    p_eval.add_argument("--threshold", type=float, default=1.0, help="a prompt counts as solved at this reward")
    p_eval.add_argument("--pass-k", type=int, default=0, help="also sample k completions per prompt: pass@k")
    p_eval.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k")
    p_eval.add_argument("--limit", type=int, default=0, help="evaluate the first N prompts only (0: all)")
    p_eval.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p_eval.add_argument("--device", default="auto")
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--rollout-engine", default="native", choices=["native", "vllm"], help="what samples")
    p_eval.add_argument("--vllm-kv-cache-gib", type=float, help="vLLM's KV cache in GiB (default: vLLM's)")

    p_demo = sub.add_parser("demo", help="end-to-end demo on a synthetic arithmetic task (CPU, minutes)")
    p_demo.add_argument("--env", help="multi-turn demo through a built-in environment: guess (SFT, then GRPO)")
    p_demo.add_argument("--algo", default="grpo", help="RL stage after SFT (default: grpo)")
    p_demo.add_argument("--out", default="demo_out", help="working directory for models, data and runs")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p_demo.add_argument("--model", default="tiny", help="tiny (built from scratch, default) or smollm2 (real model)")
    p_demo.add_argument("--rollout-engine", default="native", choices=["native", "vllm"],
                        help="what samples the GRPO rollouts (vllm: the vllm extra)")  # fmt: skip

    p_report = sub.add_parser("report", help="one self-contained HTML file of runs' configs, curves and samples")
    p_report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run (several: overlaid)")
    p_report.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html for one run)")
    p_report.add_argument("--title", help="page title (default: the runs' names)")
    p_report.add_argument("--force", action="store_true", help="replace --out even if it is not an alignrl report")

    p_serve = sub.add_parser("vllm-serve", help="serve rollouts with vLLM over HTTP (rollout_engine=vllm_server)")
    p_serve.add_argument("model", metavar="MODEL", help="HF model directory or .gguf file")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the model's)")
    p_serve.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB (CPU; default: vLLM's)")
    p_serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    # key=value overrides may come before or after --config: collect the ones argparse left over
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if args.command != "train" or a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "train":
        args.overrides = list(args.overrides) + extra
    if args.command == "report":  # no torch or transformers needed
        return _one_line_errors(_dispatch, args)
    _quiet_transformers()
    if args.command == "vllm-serve":  # no training step to stop at: SIGINT/SIGTERM stop the server at once
        return _one_line_errors(_dispatch, args)
    from alignrl.checkpoint import TrainingStopped, stop_on_signals

    def dispatch_until_stopped(args: argparse.Namespace) -> None:
        with stop_on_signals():  # SIGINT/SIGTERM: save a checkpoint at the end of the step, exit 128+signal
            _dispatch(args)

    try:
        return _one_line_errors(dispatch_until_stopped, args)
    except TrainingStopped as e:
        print(f"alignrl: {e}", file=sys.stderr)
        return 128 + e.signum


def _one_line_errors(fn, args: argparse.Namespace) -> int:
    """fn(args); bad input is one line and exit status 2, a system error one line and 1."""
    try:
        fn(args)
    except AlignRLError as e:
        print(f"alignrl: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system, not the input: unwritable directory, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"alignrl: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    """Run one sub-command (errors propagate to main)."""
    if args.command == "init-model":
        from alignrl.models import init_model

        out = init_model(
            args.out,
            args.hidden_size,
            args.layers,
            args.heads,
            args.max_length,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        print(f"created {out}")
    elif args.command == "train":
        final = run_training(args.algo, args.config, args.overrides)
        print(f"final model: {final}")
    elif args.command == "eval":
        from alignrl.evaluation import evaluate_model, report

        result = evaluate_model(
            args.model, args.data, [f.strip() for f in args.reward_funcs.split(",") if f.strip()],
            max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length, batch_size=args.batch_size,
            threshold=args.threshold, pass_k=args.pass_k, temperature=args.temperature, limit=args.limit,
            dtype=args.dtype, device=args.device, seed=args.seed, environment=args.environment,
            tools=[t.strip() for t in args.tools.split(",") if t.strip()], max_turns=args.max_turns,
            rollout_engine=args.rollout_engine, vllm_kv_cache_gib=args.vllm_kv_cache_gib,
        )  # fmt: skip
        print(report(result, args.json))
    elif args.command == "demo":
        from alignrl.demo import run_demo

        if args.env:
            from alignrl.demo.envs import run_env_demo

            run_env_demo(args.env, args.out, seed=args.seed, quick=args.quick)
        else:
            run_demo(args.algo, args.out, seed=args.seed, quick=args.quick, model=args.model,
                     rollout_engine=args.rollout_engine)  # fmt: skip
    elif args.command == "report":
        from alignrl.report import make_report

        print(make_report(args.run_dirs, args.out, force=args.force, title=args.title))
    elif args.command == "vllm-serve":
        from alignrl.engines.vllm_server import serve

        serve(args.model, args.host, args.port, args.max_model_len, args.kv_cache_gib, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
