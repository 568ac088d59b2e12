# bmp-lightning — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=
# Meta's sam2 (the [sam-oracle] test extra) builds no CUDA op: a plain CPU install, no compiler run
export SAM2_BUILD_CUDA := 0

.DEFAULT_GOAL := help

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# exact torch/torchvision pair first: never let pip resolve torch freely (see README, "Install")
	$(PIP) install -c $(CONSTRAINTS) torch torchvision
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev,sam,sweep]"
	# the [sam-oracle] test extra (Meta's SAM 2 code): its sdist declares torch as a build requirement, so build it
	# against the torch installed above (no isolated build env downloading another torch); SAM2_BUILD_CUDA=0: no compiler
	$(PIP) install -c $(CONSTRAINTS) setuptools
	$(PIP) install -c $(CONSTRAINTS) --no-build-isolation "sam2>=1.1"
	$(PY) -m bmp_lightning.tools.check_env
	touch $@

install: $(VENV)/.installed ## create .venv with the pinned dependencies (CPU or GPU machine)

test: install ## run the fast test suite (no network, no GPU)
	$(PY) -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-full: install ## run every test except the gpu ones, slow included
	$(PY) -m pytest -m "not gpu" -q $(PYTEST_ARGS)

test-gpu: install ## run the gpu-marked tests (on a CUDA machine)
	$(PY) -m pytest -m gpu -q $(PYTEST_ARGS)

gpu-check: install ## the prepared GPU check (<= 5 min on one GPU): bf16 training + MFU, data path, CUDA vs CPU, BMP loop, DDP -> logs/gpu_check.json; says so and exits 0 without a GPU
	$(PY) -m bmp_lightning.tools.gpu_check out=logs/gpu_check.json $(GPU_CHECK_ARGS)

lint: install ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## ruff autofix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-data: install ## data pipelines train/val x ViTPose/MaskPose, samples/s vs MMPose, one-sample profile, the JPEG floor; decoder instances/s
	$(PY) -m bmp_lightning.tools.bench what=data

bench-pose: install ## ViT-B pose throughput: PoseEstimator crops/s on CPU; bf16 training img/s + inference crops/s on CUDA
	$(PY) -m bmp_lightning.tools.bench what=pose

bench-loop: install ## BMP loop latency per image: detector / pose / SAM per iteration, tiny and full-size models (CPU)
	$(PY) -m bmp_lightning.tools.bench what=loop

bench-det: install ## RTMDet-Ins Detector s/img at 640 (L and tiny, random weights) + tiny train step on CPU; L on CUDA
	$(PY) -m bmp_lightning.tools.bench what=det

demo: install ## BMP demo offline: synthetic scenes + smoke-trained pose/detector (trained first if absent) -> logs/demo/smoke
	$(PY) -m bmp_lightning.tools.smoke_demo $(DEMO_ARGS)

smoke: install ## train tiny MaskPose on generated synthetic data, CPU, < 5 min (logs/train/smoke/<time>: W&B offline, CSV, vis/); SMOKE_ARGS=... adds overrides
	$(PY) -m bmp_lightning.train experiment=smoke $(SMOKE_ARGS)

ARGS ?=

train: install ## train: make train ARGS="experiment=maskpose_b trainer=ddp"
	$(PY) -m bmp_lightning.train $(ARGS)

sweep: install ## Hydra multirun: make sweep ARGS="experiment=smoke ablation=mask_alpha"
	$(PY) -m bmp_lightning.train -m $(ARGS)

eval: install ## evaluate a checkpoint: make eval ARGS="experiment=maskpose_b ckpt_path=..."
	$(PY) -m bmp_lightning.eval $(ARGS)

bmp: install ## the BMP loop evaluation job: make bmp ARGS="split=ochuman_val detector=... pose=..."
	$(PY) -m bmp_lightning.bmp $(ARGS)

doctor: install ## every missing input of a run, in one table: make doctor ARGS="experiment=maskpose_b" (exit 1 if any)
	$(PY) -m bmp_lightning.doctor $(ARGS)

clean: ## remove caches and build files (keeps .venv and logs)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-logs: ## remove logs/
	rm -rf logs/*

clean-all: clean clean-logs ## also remove the virtual environment
	rm -rf $(VENV)

.PHONY: train sweep eval bmp doctor help install test test-full test-gpu gpu-check lint format bench-data bench-pose bench-loop bench-det demo smoke clean clean-logs clean-all
