# Everything a fresh machine needs is installed by these targets; nothing is done by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
# The Lab front end, rebuilt when its sources are newer than this stamp.
LAB_STAMP := jupyter_ext/labextension/.build-stamp
LAB_NODE_STAMP := labextension/node_modules/.installed-stamp
LAB_SOURCES := $(wildcard labextension/src/*.ts labextension/schema/*.json labextension/style/*) \
	labextension/package.json labextension/package-lock.json labextension/tsconfig.json

.PHONY: install lint test test-quick demo bench clean

install: $(STAMP) $(LAB_STAMP)

$(STAMP): pyproject.toml jupyter-config/server-config/gpupool.json \
		jupyter-config/ipython-config/ipython_kernel_config.json
	@# tests/ui/ drive Debian's chromium through Playwright (no browser download); as root,
	@# install it when missing, else those tests skip.
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y --no-install-recommends chromium \
			|| { apt-get update && apt-get install -y --no-install-recommends chromium; } \
			|| echo "chromium could not be installed; the browser tests will skip."; \
	fi
	@# The database tests (and `pytest --db postgresql`) start a PostgreSQL server of their own
	@# with initdb and pg_ctl; as root, install Debian's server when missing, else they skip.
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
			&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y --no-install-recommends postgresql \
			|| { apt-get update && apt-get install -y --no-install-recommends postgresql; } \
			|| echo "PostgreSQL could not be installed; the PostgreSQL tests will skip."; \
	fi
	@# The replica tests put Debian's nginx in front of three gateways; as root, install it when
	@# missing, else those tests skip.
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && [ "$$(id -u)" = 0 ] \
			&& command -v apt-get >/dev/null; then \
		apt-get install -y --no-install-recommends nginx \
			|| { apt-get update && apt-get install -y --no-install-recommends nginx; } \
			|| echo "nginx could not be installed; the replica tests will skip."; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# The front end builds against the JupyterLab it will run in, so that comes first.
	$(BIN)/python -m pip install --quiet "jupyterlab>=4.2"
	$(MAKE) $(LAB_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@# Where Jupyter looks: the front end (a link, so rebuilds show at once), the file that
	@# enables the server extension, and the IPython kernel config that loads %%gpu in every
	@# local kernel of this venv; a wheel installs all three as shared-data instead.
	mkdir -p $(VENV)/share/jupyter/labextensions/@gpupool $(VENV)/etc/jupyter/jupyter_server_config.d \
		$(VENV)/etc/ipython
	rm -rf $(VENV)/share/jupyter/labextensions/@gpupool/labextension
	test ! -f jupyter_ext/labextension/package.json || ln -s "$(CURDIR)/jupyter_ext/labextension" \
		$(VENV)/share/jupyter/labextensions/@gpupool/labextension
	cp jupyter-config/server-config/gpupool.json $(VENV)/etc/jupyter/jupyter_server_config.d/
	cp jupyter-config/ipython-config/ipython_kernel_config.json $(VENV)/etc/ipython/
	@# The GPU-to-CPU tests use PyTorch's CPU build where this machine keeps its wheel; plain
	@# `torch` from PyPI is a CUDA build of several GB, so without that wheel those tests skip.
	$(BIN)/python -m pip install --quiet "torch==2.13.0+cpu" \
		|| echo "PyTorch's CPU build is not available here; the torch tests will skip."
	@# As root, hosts isolate tenants: their kernels need a Python tenants' users can run.
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python -m gpu_host.kernel_python \
		|| echo "No kernel venv: hosts run as root will not isolate tenants (see above)."; fi
	touch $(STAMP)

# npm ci installs exactly the committed lock file; the build takes Node.js 18 or later.
# Without Node.js the rest installs and works; Lab has no gpupool front end, its tests skip.
$(LAB_NODE_STAMP): labextension/package.json labextension/package-lock.json
	@command -v npm >/dev/null || { echo "No npm: the Lab front end is not built (it needs Node.js 18 or later and npm: apt-get install nodejs npm)."; exit 0; }
	cd labextension && npm ci --no-audit --no-fund --loglevel=error
	touch $(LAB_NODE_STAMP)

$(LAB_STAMP): $(LAB_SOURCES) $(LAB_NODE_STAMP)
	@test -d labextension/node_modules || exit 0
	cd labextension && PYTHON="$(abspath $(BIN)/python)" npm run --silent build
	touch $(LAB_STAMP)

lint: install
	$(BIN)/ruff check gpupool gpu_host kernel_gateway jupyter_ext tests bench
	$(BIN)/ruff format --check gpupool gpu_host kernel_gateway jupyter_ext tests bench
	$(BIN)/mypy

# Test files run in parallel (one file per worker, as files share their servers); most of the
# time is spent waiting on kernels, Lab and the browser, so more workers than cores pays.
TEST_WORKERS ?= 4
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15
# The suite on SQLite, with representative gateway modules again on a real PostgreSQL in the
# same run (tests/test_*_on_postgresql.py); `--db postgresql` runs every module on it.
test: lint
	$(PYTEST)

# For the edit-test loop: the suite without the tests marked slow, on SQLite.
test-quick: install
	$(PYTEST) -m "not slow"

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
	@# Our hybrid Lab against stock jupyter_server and direct ZMQ, and kernel ready in Chromium.
	$(BIN)/python bench/lab.py
	$(BIN)/python bench/share.py
	@# 1, 2, 3 gateway replicas on PostgreSQL behind nginx, against one gateway on SQLite.
	$(BIN)/python bench/replicas.py
	@# 64 kernels and 1,000 websockets, against jupyter-kernel-gateway in bench/.venv-jkg (made once).
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) bench/.venv-jkg labextension/node_modules labextension/lib jupyter_ext/labextension .gpupool .mypy_cache .ruff_cache .pytest_cache
