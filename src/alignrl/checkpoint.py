"""Checkpoints and exact resume: the one save/load path every trainer uses, in one process and under torchrun.

How to add checkpointing to a trainer (a few lines; sft.py and grpo.py are the worked examples):

    run = loop.start_run(cfg)                      # resolves cfg.resume, keeps metrics.jsonl up to that step
    model, tok = loop.load_policy(cfg, run.device, rl=True)
    opt = loop.build_optimizer(model, cfg)
    sched = loop.build_scheduler(opt, cfg, total_updates)
    stream = checkpoint.ReplayStream(lambda: infinite_batches(len(data), bs, random.Random(cfg.seed)))
    first = run.register(model, tok, optimizer=opt, scheduler=sched, data=stream, kl_ctl=kl_ctl)
    if first == 1: ...                             # things done once before step 1 (e.g. the step-0 eval)
    for step in range(first, cfg.max_steps + 1):
        ...
        upd = loop.optimizer_step(model, opt, sched, cfg, loss=loss, run=run)  # skip + count non-finite updates
        run.metrics.log(step, metrics)
        run.end_step(step)                         # every save_steps, and on SIGINT/SIGTERM: save (and stop)
    return loop.finish(run, model, tok)

`register` takes any objects with `state_dict()` / `load_state_dict()` (optimizer, scheduler, KL controller, ...)
by keyword; `nn.Module` components (a value head, a critic, a second policy) are saved as safetensors. The
python/numpy/torch/CUDA RNG states, the step and the run's counters (non-finite skips) are always saved. Only
the trained model's weights and registered components are restored: frozen models (reference, reward model) are
reloaded from their own paths as in a fresh run. The data stream must be restorable: wrap a deterministic
generator factory in `ReplayStream` (its state is the number of items drawn; resuming rebuilds the generator and
skips that many), or pass an object with state_dict/load_state_dict. Anything else random must draw from the
global RNGs or be registered. Pass `loss=` and `run=` to loop.optimizer_step so non-finite updates are counted
(metric skipped_updates_total) and max_nonfinite_in_a_row consecutive ones abort with a clear message.

Layout of OUTPUT_DIR/checkpoint-STEP/ (written in a temporary sibling directory, fsynced, renamed):
- a normal HF model directory (config.json, model.safetensors, tokenizer files); LoRA adapters are merged, FSDP
  shards gathered;
- trainable.safetensors: the trainable parameters as they are in the training model (LoRA adapter weights),
  so a resume restores them exactly; only for peft models (a full model is restored from model.safetensors);
- module-NAME.safetensors: each registered nn.Module component;
- trainer_state.pt: the registered components' states, RNG states and counters (read with weights_only=True);
- config.yaml: the run's config; alignrl_checkpoint.json: the completion marker, written last, listing every
  file with its size and SHA-256, and the algorithm. A directory without a valid marker (half-written) is never loaded.
A multi-process run (torchrun; "sharded") keeps the model, the optimiser and the nn.Module components in
distributed/ instead (torch.distributed.checkpoint shards written by every rank, loadable onto any world size; no
trainable.safetensors or module-NAME.safetensors), each rank's RNG states in rng-rankR.pt, and its world size in
the marker; rank 0 writes the rest and the marker once every rank's shards are on disk. Its resumes, in one
process too, stay sharded.

Signals: inside `stop_on_signals()` (the CLI wraps every command in it) the first SIGINT/SIGTERM asks the loop to
save a checkpoint at the end of the current step and raise `TrainingStopped`; the CLI then exits with status
128 + signal number (130 for SIGINT, 143 for SIGTERM), so shell pipelines do not carry on with an unfinished
model. A second signal stops at once (the last complete checkpoint is still used on resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignrl import distributed as dist
from alignrl.errors import AlignRLError
from alignrl.models import atomic_dir, is_peft, unwrap, write_pretrained

MARKER = "alignrl_checkpoint.json"
STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
FORMAT = 1
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # OUTPUT_DIR/checkpoint-STEP
DCP_DIR = "distributed"  # inside checkpoint-STEP/ of a multi-process run: model + optimiser shards (DCP)


class TrainingStopped(Exception):
    """Raised by the loop after saving a checkpoint because SIGINT/SIGTERM was received."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path} "
            "(continue with resume=auto)"
        )


# ---------------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states, as types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by rng_state()."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------------- data stream


class ReplayStream(Iterator):
    """A restorable iterator over `factory()` (which must be deterministic, e.g. seeded from the config).

    State is the number of items drawn; load_state_dict rebuilds the iterator and skips that many items, so
    a resumed run sees exactly the batches the uninterrupted run would have seen (skipping is cheap for
    index/batch streams)."""

    def __init__(self, factory: Callable[[], Iterator[Any]]):
        self.factory = factory
        self.it = factory()
        self.consumed = 0

    def __next__(self) -> Any:
        item = next(self.it)
        self.consumed += 1
        return item

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.it = self.factory()
        for _ in range(int(state["consumed"])):
            next(self.it)
        self.consumed = int(state["consumed"])


# ---------------------------------------------------------------------------------------------------- save / load


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step}"


def _rng_file(r: int) -> str:
    return f"rng-rank{r}.pt"


def has_sharded_state(path: str | Path) -> bool:
    """True for a checkpoint written by a multi-process run (its state is in distributed/)."""
    return (Path(path) / DCP_DIR).is_dir()


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    config_yaml: str | None = None,
    modules: dict[str, nn.Module] | None = None,
    meta: dict[str, Any] | None = None,
    *,
    sharded: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write OUTPUT_DIR/checkpoint-STEP atomically: temp dir, files, marker last, fsync, rename, fsync parent.
    Every rank calls; rank 0 writes all but the shards (multi-process runs need storage every rank can reach).
    `model` is the trained model, or the policy as wrapped by `loop.wrap_policy` (the HF files hold its full
    weights, gathered from FSDP shards); `state` (rank 0's) goes to trainer_state.pt and `meta` (the algorithm)
    to the marker. `sharded` (multi-process runs): `model`, `optimizer` and `modules` go to distributed/ as DCP
    shards that every rank writes, each rank's RNG states to rng-rankR.pt, the world size to the marker; else
    `modules` (extra networks, e.g. a value head) go to module-NAME.safetensors and a LoRA model's trainable
    parameters to trainable.safetensors."""
    from safetensors.torch import save_file, save_model

    final = checkpoint_dir(out_dir, step)
    main = dist.is_main()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(final)) if main else None
        tmp = Path(dist.broadcast_object(str(tmp)))
        if sharded:
            save_sharded(tmp / DCP_DIR, model, optimizer, modules)
            torch.save(rng_state(), tmp / _rng_file(dist.rank()))
        full = dist.full_state_dict(model) if dist.is_fsdp(model) else None  # every rank takes part
        if main:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary directory
            lm = dist.inner(model)
            write_pretrained(lm, tokenizer, tmp, full)
            if not sharded:  # (sharded: the exact trainable weights and the modules are in distributed/)
                if is_peft(lm):
                    params = lm.named_parameters()
                    trainable = {n: p.detach().cpu().contiguous() for n, p in params if p.requires_grad}
                    save_file(trainable, str(tmp / TRAINABLE_FILE))
                for name, module in (modules or {}).items():
                    save_model(module, str(tmp / f"module-{name}.safetensors"))
            torch.save({"format": FORMAT, "step": step, **state}, tmp / STATE_FILE)
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
        dist.barrier()  # every rank's shards are on disk before the marker lists them
        if main:
            write_marker(tmp, step, {**(meta or {}), "world_size": dist.world_size()} if sharded else meta)
    dist.barrier()  # renamed before any rank goes on (and possibly rotates or resumes)
    return final


def write_marker(tmp: Path, step: int, meta: dict[str, Any] | None = None) -> None:
    """The completion marker, written last: every file's size (what older versions check) and SHA-256, the
    step and `meta` (the algorithm)."""
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    marker = {
        "format": FORMAT,
        "step": step,
        **(meta or {}),
        "files": {str(p.relative_to(tmp)): p.stat().st_size for p in paths},
        "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in paths},
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_marker(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def is_complete(path: str | Path) -> bool:
    """True when `path` has a valid completion marker and every file it lists, at the recorded size (cheap; the
    checksums are checked by `corrupt_file` before a checkpoint is loaded)."""
    path = Path(path)
    try:
        marker = read_marker(path)
        return marker["format"] == FORMAT and all(
            (path / name).is_file() and (path / name).stat().st_size == size for name, size in marker["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def corrupt_file(path: str | Path) -> str | None:
    """The first file of a complete checkpoint whose SHA-256 differs from its marker's (markers written before
    checksums have none to check), else None."""
    path = Path(path)
    for name, digest in read_marker(path).get("sha256", {}).items():
        if _sha256(path / name) != digest:
            return name
    return None


def checkpoint_step(path: str | Path) -> int:
    return int(read_marker(path)["step"])


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out_dir`, oldest first; half-written or foreign directories are skipped."""
    out = Path(out_dir)
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = CHECKPOINT_DIR.match(p.name)
            if m and p.is_dir() and is_complete(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, out_dir: str | Path, algorithm: str | None = None) -> Path | None:
    """`None` -> fresh run; `auto` -> the latest complete, intact checkpoint in out_dir (fresh if none; a
    checkpoint whose checksums fail is set aside as checkpoint-N.corrupt with a message and the previous one is
    used); else that checkpoint directory, which must be intact. With `algorithm`, another trainer's checkpoint is
    refused."""
    if not resume:
        return None
    if resume == "auto":
        for _, path in reversed(list_checkpoints(out_dir)):
            bad = corrupt_file(path)
            if bad is None:
                _check_algorithm(path, algorithm)
                return path
            aside = _set_aside(path)
            print(
                f"alignrl: resume: {path / bad} does not match its checksum; moved the checkpoint to {aside.name} "
                "and trying the previous one",
                file=sys.stderr,
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise AlignRLError(f"resume: {resume} is not a directory (use auto or a checkpoint-N directory)")
    if not is_complete(path):
        raise AlignRLError(f"resume: {resume} is not a complete alignrl checkpoint (no valid {MARKER})")
    bad = corrupt_file(path)
    if bad is not None:
        raise AlignRLError(f"resume: {path / bad} does not match its checksum (the checkpoint is corrupt)")
    _check_algorithm(path, algorithm)
    return path


def _check_algorithm(path: Path, algorithm: str | None) -> None:
    saved = read_marker(path).get("algorithm")
    if algorithm is not None and saved is not None and saved != algorithm:
        raise AlignRLError(f"resume: {path} is a {saved} checkpoint, not {algorithm}")


def _set_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt")
    if aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{os.getpid()}")
    os.replace(path, aside)
    return aside


def rotate(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep=0: keep all) and leftover temp directories."""
    out = Path(out_dir)
    if keep > 0:
        for _, p in list_checkpoints(out)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".checkpoint-*.tmp-*"):  # half-written by a killed process
        shutil.rmtree(p, ignore_errors=True)


def discard_after(out_dir: str | Path, step: int, allowed: bool = True) -> list[Path]:
    """Delete checkpoint-N directories with N > step (complete or not), so that a run resuming at `step` in
    out_dir never later picks up what an earlier run saved after it. With `allowed` false (an explicit resume
    path without overwrite_output_dir) a complete later checkpoint is an error instead: the user did not ask to
    lose it."""
    out = Path(out_dir)
    later = []
    if out.is_dir():
        later = [
            p for p in sorted(out.iterdir()) if (m := CHECKPOINT_DIR.match(p.name)) and p.is_dir() and int(m[1]) > step
        ]
    kept = [p for p in later if is_complete(p)]
    if kept and not allowed:
        raise AlignRLError(
            f"resume: {out} holds {kept[-1].name}, saved after step {step}; resuming from step {step} here would "
            "replace it: set overwrite_output_dir=true, or resume into another output_dir"
        )
    for p in later:
        shutil.rmtree(p, ignore_errors=True)
    if later:
        print(f"alignrl: removed {len(later)} checkpoint(s) saved after step {step} in {out}", file=sys.stderr)
    return later


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    device: torch.device | str = "cpu",
    modules: dict[str, nn.Module] | None = None,
    *,
    sharded: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into `model` and `modules` and return the rest of the state
    (trainer_state.pt), read with torch.load(weights_only=True): no pickled code is ever executed. `sharded`:
    `model` (the wrapped policy), `optimizer` and `modules` from distributed/, resharded onto this run's world
    size, and "rng" replaced by this rank's own RNG states; else the weights from the safetensors files."""
    path = Path(path)
    if not is_complete(path):
        raise AlignRLError(f"resume: {path} is not a complete checkpoint")
    if sharded:
        if not has_sharded_state(path):
            raise AlignRLError(f"resume: {path} was written by a single-process run; resume it with one process")
        load_sharded(path / DCP_DIR, model, optimizer, modules)
    else:
        try:
            _load_weights(path, model, modules)
        except AlignRLError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt file the checksums did not cover (format 1): one line
            raise AlignRLError(f"resume: cannot read the weights in {path}: {type(e).__name__}: {e}") from None
    state = _read(path / STATE_FILE, device)
    own = path / _rng_file(dist.rank())
    if sharded and own.is_file():
        state["rng"] = _read(own)
    return state


def _read(file: Path, device: torch.device | str | None = None) -> Any:
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file: one line
        raise AlignRLError(f"resume: cannot read {file}: {type(e).__name__}: {e}") from None


def _load_weights(path: Path, model: nn.Module, modules: dict[str, nn.Module] | None) -> None:
    from safetensors.torch import load_file, load_model

    for name, module in (modules or {}).items():
        file = path / f"module-{name}.safetensors"
        if not file.is_file():
            raise AlignRLError(f"resume: {path} has no weights for {name!r} (another trainer's checkpoint?)")
        try:
            load_model(module, str(file), strict=True, device=str(next(module.parameters()).device))
        except (RuntimeError, StopIteration) as e:
            raise AlignRLError(f"resume: {file} does not match {name!r}: {str(e).splitlines()[0]}") from None
    if is_peft(getattr(model, "module", model)):
        saved = load_file(str(path / TRAINABLE_FILE))
        params = dict(model.named_parameters())
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
        if missing or any(n not in params for n in saved):
            bad = missing[0] if missing else next(n for n in saved if n not in params)
            raise AlignRLError(f"resume: {path} does not match this model's trainable parameters ({bad})")
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    else:
        _load_hf_weights(path, unwrap(model))


def _load_hf_weights(path: Path, model: nn.Module) -> None:
    """Copy every safetensors shard of an HF directory into `model` (tied duplicates may be absent)."""
    from safetensors.torch import load_file

    shards = sorted(p for p in path.glob("model*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(load_file(str(shard)))
    result = model.load_state_dict(sd, strict=False)
    loaded_ptrs = {p.data_ptr() for n, p in model.state_dict(keep_vars=True).items() if n in sd}
    params = model.state_dict(keep_vars=True)
    missing = [k for k in result.missing_keys if params[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise AlignRLError(f"resume: {path} does not match this model (parameter {bad})")


def _optim_owner(model: nn.Module, modules: dict[str, nn.Module] | None) -> nn.Module:
    """A module holding every parameter the optimiser may update: the policy and the extra modules (PPO's one
    optimiser also steps the critic), so each optimiser entry gets a fully-qualified name."""
    return nn.ModuleList([model, *modules.values()]) if modules else model


def _dcp_state(model: nn.Module, optimizer, modules: dict[str, nn.Module] | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(_optim_owner(model, modules), optimizer)
    for name, m in (modules or {}).items():
        state[f"module/{name}"] = get_model_state_dict(m)
    return state


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    modules: dict[str, nn.Module] | None = None,
) -> None:
    """Model, optimiser (and extra modules', e.g. a value head's) state with torch.distributed.checkpoint: every
    rank writes its own shards into `path` (storage all ranks can reach); all ranks call. Loads onto any world
    size."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, optimizer, modules), checkpoint_id=str(path))


def load_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    modules: dict[str, nn.Module] | None = None,
) -> None:
    """Load what `save_sharded` wrote into the (wrapped) model, optimiser and modules, resharding as needed; all
    ranks call."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, optimizer, modules)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(_optim_owner(model, modules), optimizer, state["optim"])
    for name, m in (modules or {}).items():
        set_model_state_dict(m, state[f"module/{name}"])


# ---------------------------------------------------------------------------------------------------- signals


class _StopFlag:
    signum: int | None = None


STOP = _StopFlag()


def stop_requested() -> int | None:
    """The signal number received inside stop_on_signals(), or None."""
    return STOP.signum


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM only sets a flag (the loop saves and stops at the end of the
    step); a second one runs the previous handler (KeyboardInterrupt / terminate). A signal the parent set to be
    ignored stays ignored (a background job of a script or `nohup` inherits an ignored SIGINT). No-op outside the
    main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums if signal.getsignal(s) is not signal.SIG_IGN}

    def handler(signum, frame):
        if STOP.signum is None:
            STOP.signum = signum
            print(
                f"alignrl: {signal.Signals(signum).name} received; saving a checkpoint at the end of this step "
                "(send again to stop now)",
                file=sys.stderr,
                flush=True,
            )
            return
        prev = previous[signum]
        signal.signal(signum, prev)
        if callable(prev):
            prev(signum, frame)
        else:
            signal.raise_signal(signum)

    STOP.signum = None
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev)
        STOP.signum = None
