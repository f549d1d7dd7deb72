"""Shared fixtures: a tiny model directory built through the same code path users take (`init-model`)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from transformers.utils import logging as hf_logging

    from alignrl.models import init_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("tiny") / "model"
    init_model(out, hidden_size=32, num_layers=2, num_heads=2, max_length=64, seed=0)
    return str(out)
