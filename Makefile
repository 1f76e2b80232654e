# Everything a fresh machine needs is installed by these targets; nothing is done by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: install lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@# The GPU-to-CPU tests use PyTorch's CPU build where this machine keeps its wheel; plain
	@# `torch` from PyPI is a CUDA build of several GB, so without that wheel those tests skip.
	$(BIN)/python -m pip install --quiet "torch==2.13.0+cpu" \
		|| echo "PyTorch's CPU build is not available here; the torch tests will skip."
	@# As root, hosts isolate tenants: their kernels need a Python tenants' users can run.
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python -m gpu_host.kernel_python \
		|| echo "No kernel venv: hosts run as root will not isolate tenants (see above)."; fi
	touch $(STAMP)

lint: install
	$(BIN)/ruff check gpu_host kernel_gateway jupyter_ext tests bench
	$(BIN)/ruff format --check gpu_host kernel_gateway jupyter_ext tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/gpupool up

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(BIN)/python bench/host_start.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/idle.py
	$(BIN)/python bench/magic.py
	@# 64 kernels and 1,000 websockets, against jupyter-kernel-gateway in bench/.venv-jkg (made once).
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) bench/.venv-jkg .gpupool .mypy_cache .ruff_cache .pytest_cache
