"""Reward models: a scalar `score` head read at the last non-pad token (AutoModelForSequenceClassification with
num_labels=1), the one scoring path shared by reward-model training and by RL, which uses a saved reward-model
directory as a reward function (`reward_funcs: [path/to/rm]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from alignrl.data import ONE_PASS_TOKENS, encode_completion, pad_batch, split_by_tokens
from alignrl.errors import AlignRLError
from alignrl.logprobs import position_ids_from_mask
from alignrl.models import (
    DTYPES,
    check_model_dir,
    load_tokenizer,
    model_load_errors,
    resolve_device,
    resolve_model_path,
    unwrap,
)


def load_reward_model(
    path: str,
    pad_token_id: int | None,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    *,
    trained_head: bool = False,
    option: str = "model",
) -> PreTrainedModel:
    """A local model as a 1-label sequence classifier. From a causal LM directory the trunk is loaded and the
    `score` head is freshly initialised (for training); with `trained_head` (scoring) that is an error, since an
    untrained head gives random rewards."""
    path = resolve_model_path(path, option)
    check_model_dir(path, option)
    with model_load_errors(path, option):
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=DTYPES[dtype], local_files_only=True, output_loading_info=True
            )
        except ValueError as e:  # an architecture without a sequence-classification class
            raise AlignRLError(f"{option}: {path} cannot be loaded as a reward model ({e})") from None
    fresh = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
    if trained_head and fresh:
        raise AlignRLError(
            f"{option}: {path} has no trained reward head ({fresh[0]} would be random): it looks like a causal LM, "
            f"not a reward model; train one with `alignrl train rm model={path} ...`"
        )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # what plain transformers uses to find the last token
    return model.to(device)


def rm_add_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Append EOS to scored sequences unless EOS is the pad token (transformers' pooling would skip it then)."""
    return tokenizer.eos_token_id is not None and tokenizer.eos_token_id != tokenizer.pad_token_id


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r[b] = score(h[b, last]) with `last` the rightmost attended position; positions count real tokens only,
    so left- and right-padded batches give the same scores (and match transformers on right padding)."""
    lm = unwrap(model)
    head = getattr(lm, "score", None)
    positions = position_ids_from_mask(attention_mask)
    if not isinstance(head, nn.Linear):  # other heads: the model's own pooling (by pad_token_id)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        return out.logits[:, 0].float()
    trunk = getattr(lm, lm.base_model_prefix)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (idx * attention_mask.long()).argmax(-1)
    pooled = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]
    return head(pooled)[:, 0].float()


class RewardModelScorer:
    """A saved reward model as a reward function with TRL's signature: scores prompt + completion in batches of
    similar lengths within `batch_tokens` padded tokens (raised to fit the longest sequence) under
    torch.inference_mode, tokenized exactly as in reward-model training."""

    def __init__(
        self,
        path: str,
        device: str = "auto",
        dtype: str = "float32",
        batch_tokens: int = ONE_PASS_TOKENS,  # inference only: no activations kept
        max_length: int | None = None,
    ):
        self.path = path
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(path, "reward_funcs")
        self.model = load_reward_model(
            path, self.tokenizer.pad_token_id, dtype, self.device, trained_head=True, option="reward_funcs"
        ).eval()
        self.model.requires_grad_(False)
        self.batch_tokens = batch_tokens
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.add_eos = rm_add_eos(self.tokenizer)
        self.__name__ = self.name_for(path)

    @staticmethod
    def name_for(path: str) -> str:
        """Metric name: the directory name, or its parent's for a trainer's `final` directory."""
        p = Path(path).resolve()
        return p.parent.name if p.name == "final" else p.name

    def encode(self, prompt: Any, completion: Any, where: str = "reward model input") -> list[int]:
        p, c = encode_completion(prompt, completion, self.tokenizer, where, "completion", self.add_eos)
        return (p + c)[-self.max_length :]  # keep the end: the score is read at the last token

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        lengths = [len(s) for s in seqs]
        out = [0.0] * len(seqs)
        for chunk in split_by_tokens(lengths, max([self.batch_tokens, *lengths])):
            ids, mask = pad_batch([seqs[i] for i in chunk], self.tokenizer.pad_token_id, self.device)
            for i, v in zip(chunk, reward_scores(self.model, ids, mask).tolist()):
                out[i] = v
        return out

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **kwargs):
        return self.score_ids([self.encode(p, c) for p, c in zip(prompts, completions)])
