"""Multi-process training under torchrun: process group, data sharding, global reductions, DDP/FSDP2 wrapping,
full weights for generation and saving. Every helper is a no-op in a single process. Checkpoints (sharded with
torch.distributed.checkpoint under torchrun) and final/ are written by `alignrl.checkpoint` and `loop.finish`.

Conventions every trainer follows (see docs/distributed.md):
- batch sizes in configs are GLOBAL; each rank takes a disjoint contiguous shard (`shard`), GRPO groups stay whole;
- losses are normalised by GLOBAL counts (`all_reduce`) and multiplied by `grad_scale()`, because DDP and FSDP
  average gradients over ranks: the resulting update equals the single-process update on the global batch;
- log-probs are computed through `PolicyLogProbs` (other model calls through `ForwardFn`), the module DDP /
  fully_shard wrap, so that gradient synchronisation (DDP) and parameter unsharding (FSDP) happen; the optimiser
  is built right after wrapping, before any forward; generation runs inside `full_params(...)`;
- only rank 0 writes files (`is_main`); metrics are reduced over ranks before logging (`reduce_metrics`).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from alignrl.errors import AlignRLError
from alignrl.logprobs import token_logprobs
from alignrl.models import is_peft, resolve_device

Mode = Literal["none", "ddp", "fsdp"]
T = TypeVar("T")


# ---------------------------------------------------------------- process group and rank helpers


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_dist() -> bool:
    """True inside an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Rank 0: the only rank that writes metrics, samples, checkpoint metadata and final/."""
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init(mode: str, device: str = "auto") -> torch.device:
    """Join the torchrun process group (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and return
    this rank's device: cuda:LOCAL_RANK with backend nccl on GPUs, cpu with gloo otherwise. One process: no group."""
    n = env_world_size()
    if n > 1 and mode == "none":
        raise AlignRLError(
            f"distributed: launched with {n} processes (torchrun) but distributed=none; set distributed=ddp or fsdp"
        )
    dev = resolve_device(device)
    if n == 1:
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def shutdown() -> None:
    """Leave the process group at the end of a torchrun job, after the trainer returned: its DDP/FSDP wrappers
    are collected while the group still exists, and every rank has finished before any rank destroys it
    (destroying it under a live DDP wrapper, or while a peer still used it, hung a gloo rank ~1 run in 8)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- data sharding and seeds


def shard_bounds(n: int, group: int = 1) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items made of whole groups of `group` items;
    shares differ by at most one group, earlier ranks take the extra ones."""
    if n % group:
        raise AlignRLError(f"internal: {n} items do not split into groups of {group}")
    groups, r, w = n // group, rank(), world_size()
    base, extra = divmod(groups, w)
    start = r * base + min(r, extra)
    stop = start + base + (1 if r < extra else 0)
    return start * group, stop * group


def local_part(batch: Sequence[T], group: int = 1) -> tuple[list[T], float]:
    """This rank's share of a global batch and its weight: (share, 1.0), or, when the share is empty (fewer
    groups than ranks), (the first group, 0.0) so that the rank still runs the same forwards/backwards as the
    others (DDP and FSDP need every rank in every collective); multiply its loss by the weight."""
    part = shard(batch, group)
    return (part, 1.0) if part else (list(batch[:group]), 0.0)


def shard(items: Sequence[T], group: int = 1) -> list[T]:
    """This rank's disjoint contiguous share of `items` (whole groups of `group` items); all of it in one process."""
    a, b = shard_bounds(len(items), group)
    return list(items[a:b])


def rank_seed(seed: int) -> int:
    """A per-rank seed: different on every rank, reproducible for a given (seed, rank); `seed` itself on rank 0."""
    return seed + 1_000_003 * rank()


def seed_rank_rng(seed: int) -> None:
    """Seed torch's RNG (sampling) per rank; python/numpy RNGs stay common so data order agrees on all ranks."""
    torch.manual_seed(rank_seed(seed))
    if torch.cuda.is_available():
        torch.cuda.manual_seed(rank_seed(seed))


# ---------------------------------------------------------------- global reductions


def all_reduce(x: T, op: Literal["sum", "max", "min"] = "sum") -> T:
    """Sum (or max/min) of a number or tensor over ranks; returned as the same kind (float/int/tensor)."""
    if not is_dist():
        return x
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if isinstance(x, torch.Tensor):
        t = x.detach().to(_comm_device(), copy=True)
        dist.all_reduce(t, ops[op])
        return t.to(x.device)  # type: ignore[return-value]
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, ops[op])
    return type(x)(t.item())  # type: ignore[call-arg, return-value]


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's dim 0 over ranks in rank order (shards may have different lengths)."""
    if not is_dist():
        return t
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def all_gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate python lists over ranks in rank order (e.g. completions for samples.jsonl)."""
    if not is_dist():
        return items
    out: list[list[Any]] = [[] for _ in range(world_size())]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def broadcast_object(obj: T) -> T:
    """Rank 0's python object on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_metrics(
    metrics: dict[str, float],
    *,
    sum_keys: Sequence[str] = (),
    max_keys: Sequence[str] = (),
    min_keys: Sequence[str] = (),
) -> dict[str, float]:
    """Combine per-rank metrics for logging: the mean over ranks, except keys summed / maxed / mined.
    Every rank must call this with the same keys (three collectives in all)."""
    if not is_dist():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    out = dict(metrics)
    groups = {
        "sum": [k for k in keys if k in sum_keys],
        "max": [k for k in keys if k in max_keys or k.startswith("time/") or k == "step_time"],
        "min": [k for k in keys if k in min_keys],
    }
    groups["mean"] = [k for k in keys if not any(k in g for g in groups.values())]
    for op, ks in groups.items():
        t = torch.tensor([float(metrics[k]) for k in ks], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, dist.ReduceOp.SUM if op in ("sum", "mean") else getattr(dist.ReduceOp, op.upper()))
        if op == "mean":
            t = t / world_size()
        out.update({k: float(v) for k, v in zip(ks, t.tolist())})
    return out


def grad_scale() -> float:
    """Factor on a loss normalised by GLOBAL counts: DDP/FSDP average gradients over ranks, so multiplying by the
    world size makes the synchronised gradient equal to the single-process gradient of the global batch."""
    return float(world_size())


# ---------------------------------------------------------------- the wrapped policy


class ForwardFn(nn.Module):
    """The module DDP or fully_shard wrap: forward(*args) = fn(inner model, *args).

    Running the model's trunk and heads inside this forward is what lets DDP register gradient hooks and FSDP
    unshard parameters (the shared paths call the trunk and head directly, not the model's own forward)."""

    def __init__(self, lm: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.lm = lm
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.lm, *args, **kwargs)


class PolicyLogProbs(ForwardFn):
    """forward = the one log-prob path (`token_logprobs`) on the inner model; `token_logprobs(policy, ...)` given
    this wrapper (DDP- or FSDP-wrapped) calls through it."""

    def __init__(self, lm: nn.Module):
        super().__init__(lm, token_logprobs)


def call(model: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(model, *args) through the wrapper when `model` is a (DDP-wrapped) ForwardFn of fn, else directly."""
    if isinstance(getattr(model, "module", model), ForwardFn):
        return model(*args, **kwargs)
    return fn(model, *args, **kwargs)


def inner(policy: nn.Module) -> nn.Module:
    """The model inside a (possibly DDP-wrapped) ForwardFn: the HF (or peft) model, for generation and saving."""
    p = getattr(policy, "module", policy)
    return p.lm if isinstance(p, ForwardFn) else p


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks HF marks as unsplittable (`_no_split_modules`, e.g. LlamaDecoderLayer)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_model(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 (fully_shard each decoder layer, then the root: embeddings, final norm, heads) of the module
    whose forward the trainer calls (a PolicyLogProbs, or e.g. a reward model). One process: `model` unchanged."""
    if not is_dist() or mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if any(is_peft(m) for m in model.modules()):
            raise AlignRLError("distributed=fsdp with LoRA (lora_r > 0) is not supported; use distributed=ddp")
        mesh = init_device_mesh(device.type, (world_size(),))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise AlignRLError(f"distributed: must be one of none, ddp, fsdp; got {mode!r}")


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model: nn.Module) -> bool:
    """True when FSDP shards the model's parameters over the ranks (its full weights need `full_state_dict`)."""
    return is_dist() and bool(_fsdp_modules(model))


def full_state_dict(policy: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The inner model's full (unsharded) state dict on rank 0 on CPU (other ranks get {}), or with `everywhere`
    on every rank on its device; every rank must call."""
    model = inner(policy)
    if not _fsdp_modules(policy):
        if everywhere:
            return {k: v.detach() for k, v in model.state_dict().items()}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_main() else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    sd = get_model_state_dict(policy, options=options)
    if not isinstance(getattr(policy, "module", policy), ForwardFn):
        return sd
    return {k.removeprefix("lm."): v for k, v in sd.items()}


@contextlib.contextmanager
def full_params(policy: nn.Module) -> Iterator[nn.Module]:
    """Yield the inner model with full parameters on every rank (for the sampling loop); FSDP: all-gather every
    shard once and keep them gathered until the block ends (no collectives inside, so ranks may stop generating
    at different steps), then reshard. DDP / one process: nothing to do."""
    mods = _fsdp_modules(policy)
    if not mods:
        yield inner(policy)
        return
    state = mods[0]._get_fsdp_state()  # type: ignore[operator]
    state._lazy_init()  # make `policy` the root before any inner module's forward runs
    groups = [g for m in mods for g in m._get_fsdp_state()._fsdp_param_groups]  # type: ignore[operator]
    saved = [g.post_forward_mesh_info for g in groups]
    try:
        for g in groups:
            g.post_forward_mesh_info = None  # no reshard after each layer's forward
        for m in mods:
            m.unshard()  # type: ignore[operator]
        yield inner(policy)
    finally:
        for g, info in zip(groups, saved):
            g.post_forward_mesh_info = info
        for m in mods:
            m.reshard()  # type: ignore[operator]


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip gradient synchronisation for all but the last micro-batch of an accumulated batch (DDP no_sync /
    FSDP set_requires_gradient_sync); gradients stay correct, communication happens once per update."""
    if enabled or not is_dist():
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    mods = _fsdp_modules(model)
    for m in mods:
        m.set_requires_gradient_sync(False, recurse=False)  # type: ignore[operator]
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True, recurse=False)  # type: ignore[operator]
