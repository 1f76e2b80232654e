# Everything a fresh machine needs is installed by these targets; nothing is done by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check gpu_host kernel_gateway jupyter_ext tests bench
	$(BIN)/ruff format --check gpu_host kernel_gateway jupyter_ext tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/gpupool up

bench: install
	$(BIN)/python bench/host_start.py

clean:
	rm -rf $(VENV) .gpupool .mypy_cache .ruff_cache .pytest_cache
