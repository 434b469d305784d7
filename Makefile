# `make demo` and `make test` create the environment (.venv, from requirements.lock) when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

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

.PHONY: env demo test test-all bench clean

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: env
	$(BIN)/unlearn run configs/demo.yaml

test: env
	$(BIN)/ruff check unlearning flows tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: env
	$(BIN)/python bench/bench_unlearn.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_merge.py
	$(BIN)/python bench/bench_pipeline.py


clean:
	rm -rf runs .cache .pytest_cache mlflow.db
