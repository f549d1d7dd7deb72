"""Configs are dataclasses loaded from YAML plus `key=value` overrides; unknown keys and wrong types are errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

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
    # logging
    logging_steps: int = 1
    eval_steps: int = 0  # 0: evaluate only at the end
    progress_bar: bool = True
    # checkpoints, resume and bad numbers (see alignrl/checkpoint.py)
    save_steps: int = 500  # checkpoint OUTPUT_DIR/checkpoint-STEP every N steps; 0: only on SIGINT/SIGTERM
    save_total_limit: int = 2  # keep the newest N checkpoints; 0 keeps all
    resume: str | None = None  # auto (latest complete checkpoint in output_dir, else start fresh) or a checkpoint dir
    max_nonfinite_in_a_row: int = 10  # abort after N consecutive updates skipped for a non-finite loss/grad; 0: never


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise AlignRLError(f"{where}: expected a number, got {value!r}")
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
            loaded = yaml.safe_load(p.read_text())
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
