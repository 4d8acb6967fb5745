# Fresh-machine set-up, tests and demo. Every target is idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mcn-setup
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKSPACE ?= workspace/demo

.PHONY: setup system-packages test test-all demo bench clean

setup: $(STAMP)

system-packages:
	@if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null || ! command -v espeak-ng >/dev/null || ! command -v chromium >/dev/null || ! command -v shellcheck >/dev/null; then \
		echo "installing ffmpeg, espeak-ng, chromium and shellcheck with apt-get"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends ffmpeg espeak-ng chromium shellcheck; \
	fi

$(STAMP): pyproject.toml constraints.txt tools/cpu_cuda_stub.py | system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python tools/cpu_cuda_stub.py
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ''

demo: setup
	$(BIN)/mcn demo --config configs/demo.yaml --workspace $(WORKSPACE)

bench: setup
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/train.py

# The GPU suite (benchmarks/gpu_suite.py: one JSON line per figure, < 8 min on one GPU). On a lent GPU
# machine (its own python3 and torch, no venv, no registry): carry .whl and .bench made here by
# tools/gpu_bundle.sh, then `make bench-gpu` (or `sh tools/bench_gpu.sh --device cuda` without make):
# the carried wheels go to /tmp/site. Here, with the venv: `make bench-gpu-cpu`, the CPU smoke run
# (= `make bench-gpu DEVICE=cpu QUICK=1`, ~2 min).
.PHONY: bench-gpu bench-gpu-cpu
DEVICE ?= cuda
QUICK  ?=

bench-gpu:
	@sh tools/bench_gpu.sh --device $(DEVICE) $(if $(QUICK),--quick)

bench-gpu-cpu: setup
	@sh tools/bench_gpu.sh --device cpu --quick

clean:
	rm -rf $(VENV) workspace .pytest_cache
