"""Datasets: JSONL files or local `datasets` directories with TRL's column conventions, validated up front."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from alignrl.errors import AlignRLError


@dataclass
class Rows:
    """Rows of a dataset plus where each came from, so errors can name the file and line."""

    path: str
    rows: list[dict[str, Any]]
    lines: list[int] = field(default_factory=list)  # 1-based line per row (JSONL) or row index + 1

    def where(self, i: int) -> str:
        kind = "line" if self.path.endswith((".jsonl", ".json")) else "row"
        return f"{self.path} {kind} {self.lines[i] if self.lines else i + 1}"

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: Sequence[int]) -> Rows:
        return Rows(
            self.path, [self.rows[i] for i in idx], [self.lines[i] for i in idx] if self.lines else []
        )


def load_rows(path: str, split: str = "train") -> Rows:
    """Read a JSONL file (one JSON object per line) or a directory saved with `datasets.save_to_disk`."""
    if not path:
        raise AlignRLError("train_file: no dataset given (set train_file=PATH)")
    p = Path(path)
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - any failure here is a bad dataset directory
            raise AlignRLError(
                f"{path}: not a saved `datasets` directory ({type(e).__name__}: {e})"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise AlignRLError(f"{path}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        rows = [dict(r) for r in ds]
        return Rows(path, rows, list(range(1, len(rows) + 1)))
    if not p.is_file():
        raise AlignRLError(f"{path}: no such file or directory")
    rows, lines = [], []
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                raise AlignRLError(f"{path} line {n}: not UTF-8 ({bad})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AlignRLError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise AlignRLError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
            lines.append(n)
    if not rows:
        raise AlignRLError(f"{path}: no rows")
    return Rows(path, rows, lines)


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as JSONL."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def require_columns(data: Rows, columns: Sequence[str]) -> None:
    """Every row must have each column, non-null."""
    for i, row in enumerate(data.rows):
        for c in columns:
            if row.get(c) is None:
                raise AlignRLError(f"{data.where(i)}: missing column {c!r}")


def _check_messages(messages: Any, where: str, column: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise AlignRLError(f"{where}: column {column!r} must be a string or a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise AlignRLError(f"{where}: column {column!r}: each message needs 'role' and 'content'")


def render_prompt(prompt: Any, tokenizer: PreTrainedTokenizerBase, where: str = "prompt") -> str:
    """A plain-text prompt as is; a message list through the tokenizer's chat template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    _check_messages(prompt, where, "prompt")
    if not getattr(tokenizer, "chat_template", None):
        raise AlignRLError(f"{where}: chat-style prompt but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of text, no special tokens added (templates carry their own)."""
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a completion/assistant token we train on


def tokenize_sft(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str) -> SFTExample:
    """prompt/completion rows: loss on completion + EOS; messages rows: loss on assistant turns only."""
    eos = tokenizer.eos_token_id
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        _check_messages(msgs, where, "messages")
        if not getattr(tokenizer, "chat_template", None):
            raise AlignRLError(f"{where}: messages rows need a tokenizer with a chat template")
        ids: list[int] = []
        mask: list[int] = []
        for i, m in enumerate(msgs):
            # render prefixes so that each assistant turn's tokens are exactly the added suffix
            full = encode(tokenizer, tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False))
            if m["role"] == "assistant":
                before = (
                    encode(
                        tokenizer,
                        tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True),
                    )
                    if i
                    else []
                )
                if full[: len(before)] != before or len(before) < len(ids):
                    raise AlignRLError(f"{where}: chat template is not prefix-consistent; cannot mask turns")
                # train the turn up to its end-of-turn token; what the template adds after it (ChatML's "\n")
                # is never generated by the model
                added = full[len(before) :]
                k = added.index(eos) + 1 if eos in added else len(added)
                mask += [0] * (len(before) - len(ids)) + [1] * k + [0] * (len(added) - k)
            else:
                mask += [0] * (len(full) - len(ids))
            ids = full
        return SFTExample(ids, mask)
    for c in ("prompt", "completion"):
        if row.get(c) is None:
            raise AlignRLError(f"{where}: missing column {c!r} (SFT rows need prompt+completion or messages)")
    if not isinstance(row["completion"], str):
        raise AlignRLError(f"{where}: column 'completion' must be a string")
    p = encode(tokenizer, render_prompt(row["prompt"], tokenizer, where))
    c = encode(tokenizer, row["completion"]) + ([eos] if eos is not None else [])
    return SFTExample(p + c, [0] * len(p) + [1] * len(c))


# Default token budget of one forward/backward (micro_batch_tokens unset): padded tokens, prompt included. Work of
# up to ONE_PASS_TOKENS in all runs as one pass (a pass has a fixed cost that small work notices); larger work is
# split into passes of at most MICRO_BATCH_TOKENS. On CPU, 1k-token passes of long batches were faster than
# whole-batch or 2k-token passes (shorter rows trim their padding, activations stay in cache) at a third to half
# the activation memory (bench/micro_batch.py, BENCHMARKS.md). Rows longer than MICRO_BATCH_TOKENS / MIN_PASS_ROWS
# go MIN_PASS_ROWS to a pass instead: a pass's fixed cost (autocast's weight casts, accumulating the gradients, the
# ops' dispatch) made passes of one or two ~530-token rows up to 2x slower in bf16 than passes of four to eight.
# All of it is lowered for models whose activations per token are large (many layers, a large vocabulary): a pass
# holds about ACTIVATION_BYTES of activations on CPU, an eighth of the device's memory on a GPU
# (trainers.loop.default_pass_tokens).
MICRO_BATCH_TOKENS = 1024
ONE_PASS_TOKENS = 2048
MIN_PASS_ROWS = 8
ACTIVATION_BYTES = 1 << 29


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu", left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into [B, L] ids and 0/1 attention mask, padding with `pad_id` on the right (or left)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
            mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def split_by_tokens(
    lengths: Sequence[int], budget: int, max_items: int = 0, rows_per_item: int = 1, one_pass: int = 0
) -> list[list[int]]:
    """Indices sorted by length (ties in order), cut into micro-batches of at most `max_items` items (0: any) whose
    padded size rows_per_item × items × longest stays ≤ `budget` tokens (0: any); all in one micro-batch when their
    whole padded size is ≤ `one_pass` tokens (and within max_items)."""
    whole = rows_per_item * len(lengths) * max(lengths, default=0)
    if whole <= one_pass and (not max_items or len(lengths) <= max_items):
        budget = 0
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        width = rows_per_item * lengths[i]  # ascending: the newest item is the widest of its micro-batch
        if budget and width > budget:
            raise AlignRLError(f"micro_batch_tokens: {budget} is less than one item of {width} tokens; raise it")
        if not out or (max_items and len(out[-1]) >= max_items) or (budget and width * (len(out[-1]) + 1) > budget):
            out.append([i])
        else:
            out[-1].append(i)
    return out


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, mega: int = 50
) -> list[list[int]]:
    """Shuffle, then sort within windows of `mega` batches by length so batches need little padding."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * mega
    batches = []
    for s in range(0, len(idx), window):
        chunk = sorted(idx[s : s + window], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pack(examples: Sequence[SFTExample], block: int) -> list[SFTExample]:
    """Concatenate examples into blocks of `block` tokens (attention crosses example boundaries, as in TRL's
    'wrapped' packing); no padding is wasted."""
    ids: list[int] = []
    mask: list[int] = []
    for e in examples:
        ids += e.input_ids
        mask += e.loss_mask
    return [SFTExample(ids[s : s + block], mask[s : s + block]) for s in range(0, len(ids) - 1, block)]


def infinite_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless stream of shuffled index batches (reshuffled every epoch)."""
    if n == 0:
        raise AlignRLError("dataset is empty")
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[s : s + batch_size] if n >= batch_size else order


def split_eval(data: Rows, fraction: float, seed: int) -> tuple[Rows, Rows | None]:
    """Hold out a seeded fraction of rows for evaluation."""
    if fraction <= 0:
        return data, None
    if not 0 < fraction < 1:
        raise AlignRLError(f"eval_fraction: must be in [0, 1), got {fraction}")
    idx = list(range(len(data)))
    random.Random(seed).shuffle(idx)
    k = max(1, int(len(idx) * fraction))
    return data.subset(sorted(idx[k:])), data.subset(sorted(idx[:k]))


# ----------------------------------------------------------------------------- preference pairs (DPO, reward models)

BAD_ROW_REASONS = ("missing column", "identical chosen and rejected", "empty completion", "longer than max_length")


class BadRowError(AlignRLError):
    """A preference row that cannot be used; `reason` is one of BAD_ROW_REASONS (or "invalid value")."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PreferenceExample:
    """A tokenized preference pair: prompt tokens, chosen and rejected completion tokens (EOS included)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None  # optional Bradley–Terry margin (the `margin` column)
    ref_chosen_logp: float | None = None  # reference log-probs, cached once before DPO training
    ref_rejected_logp: float | None = None

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (prompt + completion)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def encode_completion(
    prompt: Any,
    completion: Any,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    column: str = "completion",
    add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as the policy sees them when it samples: a text completion follows the
    rendered prompt and ends with EOS; a message-list completion is the chat template's continuation of the
    prompt messages (its own end-of-turn tokens included)."""
    if isinstance(completion, str):
        p = encode(tokenizer, render_prompt(prompt, tokenizer, where))
        c = encode(tokenizer, completion)
        eos = tokenizer.eos_token_id
        return p, c + ([eos] if add_eos and eos is not None else [])
    _check_messages(completion, where, column)
    if isinstance(prompt, str):
        raise AlignRLError(f"{where}: column {column!r} is a message list, so 'prompt' must be a message list too")
    _check_messages(prompt, where, "prompt")
    if not getattr(tokenizer, "chat_template", None):
        raise AlignRLError(f"{where}: chat-style rows but the tokenizer has no chat template")
    before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(before):
        raise AlignRLError(f"{where}: chat template is not prefix-consistent; cannot split prompt and {column}")
    return encode(tokenizer, before), encode(tokenizer, full[len(before) :])


def _is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    if isinstance(completion, list):
        return all(not str(m.get("content") or "").strip() for m in completion if isinstance(m, dict))
    return False


def tokenize_preference(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str, max_length: int, add_eos: bool = True
) -> PreferenceExample:
    """Validate and tokenize one {"prompt", "chosen", "rejected"[, "margin"]} row; raises BadRowError."""
    for c in ("prompt", "chosen", "rejected"):
        if row.get(c) is None:
            raise BadRowError(f"{where}: missing column {c!r} (preference rows need prompt, chosen, rejected)",
                              "missing column")  # fmt: skip
    for c in ("chosen", "rejected"):
        if not isinstance(row[c], (str, list)):
            raise BadRowError(f"{where}: column {c!r} must be a string or a list of messages", "invalid value")
        if _is_empty(row[c]):
            raise BadRowError(f"{where}: column {c!r} is an empty completion", "empty completion")
    if row["chosen"] == row["rejected"]:
        raise BadRowError(f"{where}: chosen and rejected are identical", "identical chosen and rejected")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise BadRowError(f"{where}: column 'margin' must be a number, got {margin!r}", "invalid value")
    try:
        p, c = encode_completion(row["prompt"], row["chosen"], tokenizer, where, "chosen", add_eos)
        _, r = encode_completion(row["prompt"], row["rejected"], tokenizer, where, "rejected", add_eos)
    except BadRowError:
        raise
    except AlignRLError as e:
        raise BadRowError(str(e), "invalid value") from None
    ex = PreferenceExample(p, c, r, None if margin is None else float(margin))
    if ex.length > max_length:
        raise BadRowError(
            f"{where}: {ex.length} tokens (prompt + longer completion), longer than max_length={max_length}",
            "longer than max_length",
        )
    return ex


def load_preference_examples(
    data: Rows,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_bad_row: str = "error",
    add_eos: bool = True,
) -> tuple[list[PreferenceExample], dict[str, int]]:
    """Tokenize every preference row. A bad row raises a one-line error (on_bad_row="error") or is skipped,
    counted by reason and reported in one warning line (on_bad_row="skip"). Returns (examples, skip counts)."""
    import logging

    examples: list[PreferenceExample] = []
    skipped: dict[str, int] = {}
    first = ""
    for i, row in enumerate(data.rows):
        try:
            examples.append(tokenize_preference(row, tokenizer, data.where(i), max_length, add_eos))
        except BadRowError as e:
            if on_bad_row != "skip":
                raise AlignRLError(f"{e} (set on_bad_row=skip to skip such rows)") from None
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            first = first or str(e)
    if skipped:
        counts = ", ".join(f"{k}: {v}" for k, v in skipped.items())
        logging.getLogger("alignrl").warning(
            "alignrl: skipped %d of %d rows of %s (%s); first: %s",
            sum(skipped.values()), len(data), data.path, counts, first,
        )  # fmt: skip
    if not examples:
        raise AlignRLError(f"{data.path}: no usable preference rows ({sum(skipped.values())} skipped)")
    return examples, skipped
