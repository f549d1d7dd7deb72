"""Models and tokenizers: create a tiny Llama from scratch, load any local HF causal LM (or GGUF file), save
atomically."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignrl.errors import AlignRLError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level HF tokenizer over printable ASCII and newline, with pad/bos/eos/unk and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def init_model(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_length: int = 256,
    intermediate_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Create a small Llama-style model with a character tokenizer and save both as a normal HF directory.
    An existing `out_dir` is refused (a file always; a non-empty directory unless `overwrite`)."""
    for flag, value in (("--hidden-size", hidden_size), ("--layers", num_layers), ("--heads", num_heads),
                        ("--max-length", max_length), ("--intermediate-size", intermediate_size or 1)):  # fmt: skip
        if value < 1:
            raise AlignRLError(f"{flag}: must be ≥ 1, got {value}")
    if hidden_size % num_heads:
        raise AlignRLError(f"--hidden-size {hidden_size} must be divisible by --heads {num_heads}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AlignRLError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise AlignRLError(f"--out: {out} is not empty; choose another directory or pass --overwrite to replace it")
        if not (out / "config.json").is_file():  # --overwrite replaces a model, not an arbitrary directory
            raise AlignRLError(
                f"--out: {out} is not empty and holds no model (config.json); --overwrite replaces only a model"
            )
    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_length,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    save_pretrained_atomic(model, tok, out_dir)
    return Path(out_dir)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AlignRLError(f"device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlignRLError(f"device: {device!r} requested but CUDA is not available")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str, option: str = "model") -> None:
    """One-line errors for a model path that is unset, missing or not an HF model directory (a `.gguf` file is
    converted here, once, so that its errors come first)."""
    if not path:
        raise AlignRLError(f"{option}: no model given (set {option}=PATH in the config or on the command line)")
    path = resolve_model_path(path, option)
    if not Path(path).exists():
        raise AlignRLError(f"{option}: {path} does not exist")
    if not (Path(path) / "config.json").is_file():
        raise AlignRLError(f"{option}: {path} is not a Hugging Face model directory (no config.json)")


def load_tokenizer(path: str, option: str = "tokenizer") -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (or a `.gguf` file's conversion); set a pad token (eos) if it has
    none."""
    path = resolve_model_path(path, option)
    if not path or not Path(path).is_dir():
        raise AlignRLError(f"{option}: {path or '(empty)'} is not a directory")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise AlignRLError(f"{option}: cannot load a tokenizer from {path} ({_first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str, dtype: str = "float32", device: torch.device | str = "cpu", option: str = "model"
) -> PreTrainedModel:
    """Load a local causal LM (a directory, or a `.gguf` file's conversion cast to `dtype`) with dropout off-able
    via `model.eval()`; never downloads."""
    path = resolve_model_path(path, option)
    check_model_dir(path, option)
    with model_load_errors(path, option):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    return model.to(device)


@contextlib.contextmanager
def model_load_errors(path: str, option: str = "model") -> Iterator[None]:
    """Turn what transformers/safetensors raise on a truncated or corrupt weights file, or an unknown
    architecture, into one line naming the directory."""
    try:
        yield
    except AlignRLError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' SafetensorError, ...
        raise AlignRLError(f"{option}: cannot load {path}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def packed_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None, rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x·Wᵀ + b in `dtype` (default W's; x is cast to it, as autocast does), inference only. On CPU with
    oneDNN, W is pre-packed once: a plain CPU matmul repacks W at every call, which at few rows costs more than
    the product (2.2x at 32 x 512 x 1536 in fp32, 1.2x in bf16; +15-35% at 560 rows in fp32, measured here).
    Only the packed copy is kept (plus `weight` itself, which the caller owns)."""
    w = weight.detach().to(dtype or weight.dtype)
    dt = w.dtype
    b = None if bias is None else bias.detach().to(dt)
    if _packable(w):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        del w  # a cast or concatenated copy would otherwise live as long as the packed one
        return lambda x: torch.ops.mkldnn._linear_pointwise(x.to(dt), packed, b, "none", [], "")
    return lambda x: F.linear(x.to(dt), w, b)


def _packable(w: torch.Tensor) -> bool:
    cpu = w.device.type == "cpu" and torch.backends.mkldnn.is_available()
    return cpu and w.dtype in (torch.float32, torch.bfloat16)


def _shared_param_ids(model: nn.Module) -> set[int]:
    """ids of parameters owned by modules other than nn.Linear (tied embeddings): left alone when casting or
    packing the linear layers."""
    return {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}


class _PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight is held pre-packed for oneDNN (CPU)."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fn = packed_linear(linear.weight, linear.bias, None, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def pack_frozen_linears(model: nn.Module, rows: int = 512) -> int:
    """Replace the nn.Linear layers of a frozen CPU model (no grads: a reference policy) by oneDNN pre-packed
    ones (`packed_linear`). The packed weight replaces the original (no extra memory); weights shared with other
    modules (tied embeddings) are left alone. Returns how many were packed (0 where oneDNN is unavailable or the
    model is not on CPU)."""
    shared = _shared_param_ids(model)
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and type(child.weight) is nn.Parameter
        and _packable(child.weight)
        and id(child.weight) not in shared
    ]
    for parent, name, child in swaps:
        setattr(parent, name, _PackedLinear(child, rows))
    return len(swaps)


def cast_linear_weights(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Hold the float32 weights and biases of nn.Linear layers in `dtype`: the numbers autocast(dtype) computes
    with at every forward, cast once. Parameters shared with other modules (tied embeddings) are left alone.
    Returns (parameter, float32 data) pairs, to restore with `p.data = data`."""
    shared = _shared_param_ids(model)
    kept = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            for p in m.parameters(recurse=False):
                if p.dtype == torch.float32 and id(p) not in shared:
                    kept.append((p, p.data))
                    p.data = p.data.to(dtype)
    return kept


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (RL needs identical forwards for ratios and KL)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers' activation
    checkpointing, non-reentrant): activation memory drops to the layer inputs, for about one more forward."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise AlignRLError(
            f"gradient_checkpointing: {type(model).__name__} does not support activation checkpointing; "
            "set gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' current name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap `model` with a LoRA adapter (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise AlignRLError(f"lora_target_modules: {missing[0]!r} is not a module name of this model")
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run a LoRA model as its frozen base (the reference policy) without a second copy in memory."""
    with model.disable_adapter():  # type: ignore[operator]
        yield


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The underlying transformers model (through DDP/peft wrappers)."""
    inner = getattr(model, "module", model)
    if is_peft(inner):
        inner = inner.get_base_model()  # type: ignore[operator]
    return inner  # type: ignore[return-value]


def merged_weights(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under its checkpoint's names, each LoRA linear's as W + s·B·A (peft's merge, for the
    active adapters), without changing the model. `state`: the model's full state dict when its parameters are
    sharded (FSDP), else the model's own."""
    wrapped = getattr(model, "module", model)
    if not is_peft(wrapped):
        yield from (state if state is not None else unwrap(model).state_dict()).items()
        return
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    base = unwrap(model)
    if state is None:
        state = base.state_dict()
    else:
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
                continue
            for a in (a for a in module.active_adapters if a in module.lora_A):
                lora_bias = getattr(module, "lora_bias", {}).get(a, False)
                if not isinstance(module, LoraLinear) or module.use_dora[a] or module.fan_in_fan_out or lora_bias:
                    raise AlignRLError(f"{name}: only plain LoRA on linear layers can be merged for the rollout engine")
                B, A = state[f"{name}.lora_B.{a}.weight"], state[f"{name}.lora_A.{a}.weight"]
                delta = (B @ A) * module.scaling[a]
                deltas[f"{name}.weight"] = deltas[f"{name}.weight"] + delta if f"{name}.weight" in deltas else delta
        for key, value in state.items():
            if "lora_" in key or ".original_module." in key:
                continue
            key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key.replace(".base_layer.", "."))
            yield key, value + deltas[key].to(value.dtype) if key in deltas else value


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (some filesystems cannot fsync a directory: skipped)."""
    with contextlib.suppress(OSError) if path.is_dir() else contextlib.nullcontext():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flush every file under `path`, then every directory (deepest first), so that renaming `path` into place
    never exposes names without their data after a crash."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def atomic_dir(final: str | Path):
    """Context manager yielding a temporary sibling directory that replaces `final` only on success: its files
    and directories are fsynced, it is renamed over `final`, and the parent directory is fsynced."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _cm() -> Iterator[Path]:
        with disk_errors(final):
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            with disk_errors(final):
                yield tmp
                _fsync_dir(tmp)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    return _cm()


@contextlib.contextmanager
def disk_errors(target: Path) -> Iterator[None]:
    """A full disk while writing `target` becomes one line saying so and where (torch and safetensors report it
    as RuntimeError or their own errors, not always as OSError ENOSPC)."""
    try:
        yield
    except Exception as e:
        free = _free_bytes(target.parent)
        full = free is not None and free < 1 << 20
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or full:
            raise AlignRLError(f"no space left on device writing {target} ({free} bytes free there)") from None
        raise


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def save_pretrained_atomic(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a loadable HF directory (safetensors + tokenizer) at `out_dir`, atomically (`atomic_dir`): final/,
    PPO's value_model/; `write_pretrained` (which checkpoints call inside their own temp dir) says what is written."""
    with atomic_dir(out_dir) as tmp:
        write_pretrained(model, tokenizer, tmp, state_dict)


def write_pretrained(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model and tokenizer into an existing directory (`save_pretrained`, safetensors). The weights are
    `state_dict` when given (full weights in the model's own keys, e.g. gathered from FSDP shards), else the
    model's own, with LoRA adapters merged (`merged_weights`: the training model is left as it is)."""
    if state_dict is None and is_peft(getattr(model, "module", model)):
        state_dict = dict(merged_weights(model))
    unwrap(model).save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- GGUF files

GGUF_SUFFIX = ".gguf"
GGUF_INSTALL = "pip install 'gguf>=0.10' (or install alignrl[real])"
# part of the cache key: raising it makes every process redo conversions written by an older alignrl
_GGUF_CONVERSION = 1


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its suffix)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    """Where alignrl keeps converted models: $ALIGNRL_CACHE, else $XDG_CACHE_HOME/alignrl, else ~/.cache/alignrl."""
    if os.environ.get("ALIGNRL_CACHE"):
        return Path(os.environ["ALIGNRL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):  # no usable home directory
        base = os.path.join(tempfile.gettempdir(), f"alignrl-{os.getuid()}")
    return Path(base) / "alignrl"


def gguf_cache_dir(gguf: str | Path) -> Path:
    """The HF directory a GGUF file converts to, keyed by the file's contents and the converting versions (not
    its path: every clone's or venv's copy of a packaged model shares one conversion)."""
    from importlib.metadata import PackageNotFoundError, version

    src = Path(gguf).resolve()
    st = src.stat()
    versions = []
    for package in ("transformers", "gguf"):
        try:
            versions.append(version(package))
        except PackageNotFoundError:
            versions.append("-")
    digest = _file_digest(str(src), st.st_size, st.st_mtime_ns)
    key = hashlib.sha256(f"{digest}\0{versions}\0{_GGUF_CONVERSION}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{src.stem}-{key[:16]}"


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, once per (path, size, modification time) in this process: every loader resolves the
    same `.gguf` path (model, tokenizer, reference), and reading a model file each time is not free."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model_path(path: str, option: str = "model") -> str:
    """`path` itself unless it names a `.gguf` file; for one, the HF directory it converts to (converted on first
    use, once across processes, then shared)."""
    if not path or not is_gguf(path):
        return path
    src = Path(path)
    if not src.is_file():
        raise AlignRLError(f"{option}: {path} " + ("is not a file" if src.exists() else "does not exist"))
    out = gguf_cache_dir(src)
    if (out / "config.json").is_file():  # atomic_dir moves only a finished conversion into place
        return str(out)
    _require_gguf(path, option)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AlignRLError(
            f"{option}: cannot create the cache {out.parent} for the converted {path} ({e.strerror}); "
            "set ALIGNRL_CACHE to a writable directory"
        ) from None
    try:
        with _file_lock(out.with_name(out.name + ".lock")):
            if not (out / "config.json").is_file():  # another process may have converted it while this one waited
                print(f"alignrl: converting {path} to {out} (once)", file=sys.stderr)
                convert_gguf(src, out, option)
    except PermissionError as e:
        raise AlignRLError(
            f"{option}: cannot write the converted {path} under {out.parent} ({e.strerror}); set ALIGNRL_CACHE to a "
            "writable directory"
        ) from None
    return str(out)


def _require_gguf(path: str, option: str) -> None:
    """One line when the `gguf` package transformers reads GGUF files with is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise AlignRLError(f"{option}: {path} is a GGUF file, which needs the gguf package: {GGUF_INSTALL}") from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (best effort: where the filesystem has no locks, none is taken)."""
    try:
        import fcntl
    except ImportError:  # no flock here; atomic_dir still keeps each directory whole
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                raise
        yield


def convert_gguf(src: Path, out: Path, option: str = "model") -> None:
    """Dequantise a GGUF causal LM to float32 and write it, with its tokenizer as a plain fast tokenizer and its
    chat template, as an HF directory at `out` (atomically)."""
    kwargs: dict[str, str | bool] = {"gguf_file": src.name, "local_files_only": True}
    with _gguf_errors(str(src), option):
        tok = AutoTokenizer.from_pretrained(src.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src.parent, dtype=torch.float32, **kwargs, **_dequantize())
    if getattr(model, "hf_quantizer", None) is not None:  # a dense model still marked quantized is not saved
        model.hf_quantizer.remove_quantization_config(model)
    if any(p.dtype != torch.float32 for p in model.parameters()):  # GGUF blocks left packed (uint8)
        raise AlignRLError(f"{option}: {src}: transformers kept some weights quantised; cannot convert it")
    with atomic_dir(out) as tmp:
        write_pretrained(model, fast_tokenizer(tok, model.config.max_position_embeddings), tmp)
        umask = os.umask(0)
        os.umask(umask)
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp makes it private: a shared ALIGNRL_CACHE must be readable
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _dequantize() -> dict[str, object]:
    """from_pretrained keywords that make transformers unpack every GGUF weight into a dense float tensor (versions
    that can keep GGUF blocks packed take a GgufConfig; older ones always unpack)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def fast_tokenizer(tok: PreTrainedTokenizerBase, max_length: int | None) -> PreTrainedTokenizerBase:
    """`tok` rebuilt as transformers' plain fast tokenizer over the same `tokenizers` object, special tokens and chat
    template, so that the saved tokenizer_config names the class that reads tokenizer.json (a GGUF tokenizer may
    be labelled with a slow class such as LlamaTokenizer: a warning on every load, byte symbols for other readers)."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise AlignRLError(f"tokenizer: {type(tok).__name__} has no `tokenizers` backend to save")
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length or int(1e30),
        **{k: str(v) for k, v in special.items() if v is not None},
    )
    fast.chat_template = tok.chat_template
    return fast


@contextlib.contextmanager
def _gguf_errors(path: str, option: str) -> Iterator[None]:
    """What reading a GGUF file raises (not a GGUF file, truncated, an architecture transformers cannot load,
    too old a gguf package) as one line naming the file."""
    try:
        yield
    except AlignRLError:
        raise
    except Exception as e:  # noqa: BLE001 - ValueError, struct.error, ImportError, KeyError, ...
        kind = "truncated or corrupt" if isinstance(e, (struct.error, EOFError)) else type(e).__name__
        raise AlignRLError(f"{option}: cannot convert the GGUF file {path} ({kind}: {_first_line(e)})") from None
