# Contrastive pretraining pipeline. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Known-good set (README.md, install; constraints.txt pins the same): torch's regular (CUDA) builds run
# on CPU-only machines too.
TORCH_PINS := torch==2.14.1 torchvision==0.29.2
DEEPSPEED_PIN := deepspeed==0.19.8
SHARDS_DIR ?= shards
# With no GPU, DeepSpeed runs on the CPU accelerator with gloo.
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint golden demo demo-clap shards bench-shards bench-data bench-gpu clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with the pinned set (torch, torchvision, deepspeed, the project + dev extras)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt $(TORCH_PINS)
	# deepspeed's build imports torch: without --no-build-isolation it pulls a second torch.
	$(PIP) install -q -c constraints.txt --no-build-isolation $(DEEPSPEED_PIN)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) check
	@touch $@

# pytest-xdist: TEST_WORKERS test processes, each test file whole on one of them (module fixtures share trained
# runs). On 2 cores, 2 overlap one file's process start-ups and waits with another's work; TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
# --durations=15: every run ends with its 15 slowest tests (setups included), what to look at when the suite grows
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test: install ## run the test suite (CPU only; multi-rank tests use gloo; TEST_WORKERS=2 processes)
	$(PYTEST) tests

test-fast: install ## the tests not marked slow
	$(PYTEST) -m "not slow" tests

lint: install ## ruff, and the import-linter layer contracts of pyproject.toml
	$(VENV)/bin/ruff check pipeline tests
	$(VENV)/bin/lint-imports

shards: install ## build the embedded shapes and tones sets (train + val) into shards/ (SHARDS_DIR=DIR for another place)
	$(PY) -m pipeline shards build --source shapes --split train --output $(SHARDS_DIR)/shapes/train
	$(PY) -m pipeline shards build --source shapes --split val --output $(SHARDS_DIR)/shapes/val
	$(PY) -m pipeline shards build --source tones --split train --output $(SHARDS_DIR)/tones/train
	$(PY) -m pipeline shards build --source tones --split val --output $(SHARDS_DIR)/tones/val

# GOLDEN_UPDATE=1 (here or in the environment) rewrites the stored file; without it a difference fails the target
golden: install ## the golden curve: train the reference tiny CLIP (2 ranks, 40 steps), diff it against tests/assets/golden/
	$(PY) -m tests.golden $(if $(filter-out 0,$(GOLDEN_UPDATE)),--update,)

demo: install ## train the tiny CLIP on the embedded shapes set with 2 local ranks, evaluate, print results
	$(PY) -m pipeline demo --config configs/demo-clip.yaml

demo-clap: install ## the same with the tiny CLAP on the embedded tones set
	$(PY) -m pipeline demo --config configs/demo-clap.yaml

bench-shards: install ## shard building samples/s vs a plain webdataset loop (1 and 2 workers)
	$(PY) -m pipeline bench shards

bench-data: install ## loader samples/s vs open_clip's webdataset pipeline and the decode ceiling
	$(PY) -m pipeline bench data

bench-gpu: install ## ViT-B/32 amp_bf16 samples/s, MFU, memory vs open_clip's trainer and a hand-written step (needs a GPU)
	$(PY) -m pipeline bench gpu

clean: ## remove built shards, runs and caches (keeps .venv)
	rm -rf runs .bench .pytest_cache
	find $(SHARDS_DIR) -mindepth 1 ! -name README.md -exec rm -rf {} +
