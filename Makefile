# sapd — make help lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sapd-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Test processes (pytest-xdist, one file per process): one per core, at most 4; TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")
XDIST = $(if $(filter 0 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast lint format bench bench-data bench-assign bench-export bench-train bench-memory bench-coco-eval rehearse gpu-check clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

# torch with pip (its CUDA build, ~5.5 GB); the rest with uv, which installs the ~120 other packages in 14 s
# where pip took 32 s (docs/benchmarks.md). The pins again, so that uv keeps the torch that pip installed.
# Neither compiles bytecode: Python compiles a module when it is first imported and keeps the .pyc, so only
# what is used gets compiled (PYTHONDONTWRITEBYTECODE, which would make every process compile again, is
# not passed on to the commands below).
unexport PYTHONDONTWRITEBYTECODE
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(TORCH_PINS) uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[dev,export]" $(TORCH_PINS)
	@touch $(STAMP)

install: $(STAMP) ## Create .venv (if absent) and install sapd with its dev tools; fast when done
	@echo "sapd installed in $(VENV)"

train: $(STAMP) ## Train the embedded default: synthetic COCO set, small backbone, CPU (~10 min)
	$(PY) -m sapd.train $(ARGS)

test: $(STAMP) ## Run the whole test suite (tests/ and the notebooks)
	$(PY) -m pytest -q $(XDIST) --durations=15 --nbmake tests notebooks $(ARGS)

test-fast: $(STAMP) ## Run the tests that are not marked slow
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(ARGS)

lint: $(STAMP) ## Ruff lint and format check
	$(PY) -m ruff check src tests notebooks benchmarks
	$(PY) -m ruff format --check src tests notebooks benchmarks

format: $(STAMP) ## Ruff autofix and format
	$(PY) -m ruff check --fix src tests benchmarks
	$(PY) -m ruff format src tests benchmarks

bench: $(STAMP) ## Speed of SAPD vs torchvision RetinaNet and FCOS, then of the exported model (benchmarks/results*.*; ARGS=help)
	$(PY) -m benchmarks suite=speed $(ARGS)
	$(PY) -m benchmarks suite=export

bench-data: $(STAMP) ## Images/s of the train loader (synthetic and 800-px images)
	$(PY) -m benchmarks suite=data $(ARGS)

bench-assign: $(STAMP) ## Targets + losses + selection net alone, by instances per image
	$(PY) -m benchmarks suite=assign $(ARGS)

bench-train: $(STAMP) ## s/step of the CPU training recipe: SAPD phase 1 / phase 2 vs FCOS (writes benchmarks/results_train.*)
	$(PY) -m benchmarks suite=train $(ARGS)

bench-memory: $(STAMP) ## Host memory of the COCO loader on a drawn COCO-sized file in /tmp: parsing, and with 4 + 4 workers (writes benchmarks/results_memory.*)
	$(PY) -m benchmarks suite=memory $(ARGS)

bench-coco-eval: $(STAMP) ## Seconds to score 5,000 images x 100 detections with pycocotools, faster-coco-eval and hotcoco; their agreement
	$(PY) -m benchmarks suite=coco_eval $(ARGS)

bench-export: $(STAMP) ## Latency of the exported model: PyTorch vs TorchScript vs ONNX Runtime (writes benchmarks/results_export.*)
	$(PY) -m benchmarks suite=export $(ARGS)

rehearse: $(STAMP) ## experiment=r50 shrunk, 2 CPU processes, a drawn COCO-quirk set, killed and resumed (docs/rehearsal.md; ARGS=form=short)
	$(PY) -m benchmarks suite=rehearse $(ARGS)

gpu-check: $(STAMP) ## On a CUDA machine, ~10 min: test_cuda.py, 2-GPU DDP, short bench and R-50 AMP run (benchmarks/gpu/; ARGS="cuda ddp bench train suite")
	@PY=$(PY) bash benchmarks/gpu_check.sh $(ARGS)

clean: ## Remove caches, outputs and logs (keeps .venv and the data cache)
	rm -rf .pytest_cache .ruff_cache outputs multirun logs wandb
	find . -name __pycache__ -prune -exec rm -rf {} +
