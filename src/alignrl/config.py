"""Configs are dataclasses loaded from YAML plus `key=value` overrides; unknown keys and wrong types are errors."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from alignrl import trackers
from alignrl.errors import AlignRLError

C = TypeVar("C")


@dataclass
class TrainConfig:
    """Options shared by every trainer: model, data, optimisation, logging."""

    model: str = ""  # local HF model directory
    tokenizer: str | None = None  # defaults to `model`
    output_dir: str = "runs/out"
    train_file: str = ""  # JSONL file or a local `datasets` directory
    eval_file: str | None = None
    eval_fraction: float = 0.0  # held out from train_file when eval_file is not given
    seed: int = 0
    # optimisation
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    max_steps: int = 100
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    # precision and device
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights
    autocast: Literal["none", "bfloat16", "float16"] = "none"  # mixed precision for forward passes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    # multi-process under torchrun (docs/distributed.md); ignored in a single process; batch sizes stay global
    distributed: Literal["none", "ddp", "fsdp"] = "none"  # ddp: replicate the model; fsdp: shard it (FSDP2)
    # LoRA (0 = full fine-tuning)
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # log-prob path
    logprob_chunk_tokens: int = 4096  # tokens per lm-head chunk; bounds the [tokens, vocab] float32 buffer
    # recompute each decoder layer's activations in backward: far less activation memory, ~1 more forward per update
    gradient_checkpointing: bool = False
    # padded tokens (prompt included) per forward/backward in the update, reference, critic and pair passes;
    # None: the default passes (trainers.loop.token_budget: up to 2048 tokens in one pass, else 1024-token passes
    # or 8 rows of long work, within the model's activation room, one sequence at least); 0: no limit
    micro_batch_tokens: int | None = None
    # logging
    logging_steps: int = 1
    eval_steps: int = 0  # 0: evaluate only at the end
    progress_bar: bool = True
    # experiment trackers (alignrl/trackers.py), each an optional extra: tensorboard, wandb, trackio, mlflow;
    # OUTPUT_DIR/metrics.jsonl (jsonl) is always written
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    run_name: str | None = None  # the trackers' run name; default: output_dir's name
    project: str | None = None  # wandb/trackio project, mlflow experiment; default: WANDB_PROJECT etc., else alignrl
    # checkpoints, resume and bad numbers (see alignrl/checkpoint.py)
    save_steps: int = 500  # checkpoint OUTPUT_DIR/checkpoint-STEP every N steps; 0: only on SIGINT/SIGTERM
    save_total_limit: int = 2  # keep the newest N checkpoints; 0 keeps all
    resume: str | None = None  # auto (latest complete checkpoint in output_dir, else start fresh) or a checkpoint dir
    # a fresh run refuses an output_dir holding an earlier run; true replaces that run's checkpoints, final/ and logs
    overwrite_output_dir: bool = False
    max_nonfinite_in_a_row: int = 10  # abort after N consecutive updates skipped for a non-finite loss/grad; 0: never

    # options a checkpoint's state depends on: resume refuses to change them (others are reported)
    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("model", "tokenizer", "lora_r", "lora_alpha", "lora_target_modules")

    def validate(self) -> None:
        """Ranges of the shared options (trainer configs extend this)."""
        checks = {  # option: (holds, the rule the message states)
            "learning_rate": (self.learning_rate > 0, "must be > 0"),
            "max_steps": (self.max_steps >= 1, "must be ≥ 1"),
            "weight_decay": (self.weight_decay >= 0, "must be ≥ 0"),
            "adam_beta1": (0 <= self.adam_beta1 < 1, "must be in [0, 1)"),
            "adam_beta2": (0 <= self.adam_beta2 < 1, "must be in [0, 1)"),
            "adam_epsilon": (self.adam_epsilon > 0, "must be > 0"),
            "warmup_steps": (self.warmup_steps >= 0, "must be ≥ 0"),
            "max_grad_norm": (self.max_grad_norm >= 0, "must be ≥ 0"),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, "must be ≥ 1"),
            "eval_fraction": (0 <= self.eval_fraction < 1, "must be in [0, 1)"),
            "num_threads": (self.num_threads >= 0, "must be ≥ 0"),
            "lora_r": (self.lora_r >= 0, "must be ≥ 0"),
            "lora_alpha": (self.lora_alpha > 0, "must be > 0"),
            "lora_dropout": (0 <= self.lora_dropout < 1, "must be in [0, 1)"),
            "logprob_chunk_tokens": (self.logprob_chunk_tokens >= 1, "must be ≥ 1"),
            "micro_batch_tokens": ((self.micro_batch_tokens or 0) >= 0, "must be ≥ 0 (0: no limit)"),
            "logging_steps": (self.logging_steps >= 1, "must be ≥ 1"),
            "eval_steps": (self.eval_steps >= 0, "must be ≥ 0"),
            "save_steps": (self.save_steps >= 0, "must be ≥ 0"),
            "save_total_limit": (self.save_total_limit >= 0, "must be ≥ 0"),
            "max_nonfinite_in_a_row": (self.max_nonfinite_in_a_row >= 0, "must be ≥ 0"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise AlignRLError(f"{name}: {rule}, got {getattr(self, name)!r}")
        trackers.check_names(self.report_to)


def algorithm_of(cfg: Any) -> str:
    """The registered name of the algorithm a config belongs to (alignrl.algorithms)."""
    from alignrl.algorithms import name_of

    return name_of(cfg)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (after YAML parsing); converts int->float only."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except AlignRLError as e:
                errors.append(str(e))
        raise AlignRLError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise AlignRLError(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # `key=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise AlignRLError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = args[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise AlignRLError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AlignRLError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise AlignRLError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise AlignRLError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise AlignRLError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise AlignRLError(f"{where}: expected a string, got {value!r}")
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise AlignRLError(f"{source}: unknown key {unknown[0]!r} for {cls.__name__}")
    kwargs = {k: _coerce(v, hints[k], f"{source}: {k}") for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings; values are read as YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AlignRLError(f"override {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_config(cls: type[C], path: str | None, overrides: list[str] | None = None) -> C:
    """Load `cls` from a YAML file (optional) with command-line `key=value` overrides applied on top."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise AlignRLError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise AlignRLError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise AlignRLError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise AlignRLError(f"{path}: expected a mapping of option: value at top level")
        data.update(loaded or {})
    source = path or "config"
    cfg = config_from_dict(cls, data, source)
    over = parse_overrides(overrides or [])
    if over:
        unknown = sorted(set(over) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise AlignRLError(f"command line: unknown option {unknown[0]!r} for {cls.__name__}")
        hints = typing.get_type_hints(cls)
        for k, v in over.items():
            setattr(cfg, k, _coerce(v, hints[k], f"command line: {k}"))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
