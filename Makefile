# hivewire: `make run` starts the whole mesh, `make test` runs the whole suite.
# Both create .venv on first use; nothing needs to be installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

.PHONY: run test venv relink gen gen-check lint typecheck imports buf-lint buf-breaking buf-baseline pytest fmt bench soak soak-quick clean promtool chromium node

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles llama.cpp: a portable AVX2 build, because a native one enables
	# AMX kernels that crash on VMs advertising AMX without enabling it (docs/model.md).
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
	$(PY) -m pip install --quiet -e '.[dev,local]' --config-settings editable_mode=strict
	touch $(STAMP)

venv: $(STAMP)

# The strict editable install is a link tree: re-link so new modules are importable
# (and visible to mypy, which does not run import hooks).
relink: $(STAMP)
	@$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . \
		--config-settings editable_mode=strict > $(VENV)/relink.log 2>&1 \
		|| { cat $(VENV)/relink.log; exit 1; }

run: relink
	$(BIN)/hivewire up

gen: $(STAMP)
	$(PY) scripts/gen_protos.py

gen-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PY) scripts/check_type_ignores.py services discovery

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: relink
	$(BIN)/mypy services discovery

# Which package may import which: the import-linter contracts in pyproject.toml
# (docs/architecture.md). An import that points up, or a cycle, fails here.
imports: relink
	$(BIN)/lint-imports --no-cache

buf-lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

# Contracts evolve compatibly: proto/ against the merge base with main, or on main against
# the previous commit (scripts/buf_breaking.py says why; BUF_BREAKING_BASE=<rev> overrides).
buf-breaking: $(STAMP)
	$(PY) scripts/buf_breaking.py

# The image buf-breaking compares with where git has no base (refresh it at a release).
buf-baseline: $(STAMP)
	$(VENV)/bin/buf build -o scripts/proto_baseline.binpb

# promtool (checks the deploy/prometheus files and every service's /metrics in the tests)
# comes from Debian's prometheus package: only the static promtool binary is taken out of
# it, so no Prometheus server is installed or started.
PROMTOOL := $(VENV)/tools/promtool

$(PROMTOOL): | $(STAMP)
	@rm -rf $(VENV)/tools/deb && mkdir -p $(VENV)/tools/deb
	@cd $(VENV)/tools/deb && { apt-get download prometheus >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
		|| { echo "promtool: cannot download Debian's prometheus package (apt-get download prometheus)" >&2; exit 1; }
	dpkg -x $(VENV)/tools/deb/prometheus_*.deb $(VENV)/tools/deb/root
	cp $(VENV)/tools/deb/root/usr/bin/promtool $(PROMTOOL)
	rm -rf $(VENV)/tools/deb
	$(PROMTOOL) --version

promtool: $(PROMTOOL)

# Debian's Chromium for the dashboard's browser test (Playwright drives /usr/bin/chromium).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
		|| { echo "chromium: cannot install Debian's chromium package" >&2; exit 1; }; }

# Debian's Node.js and npm, and the locked npm packages of the Node examples (their tests
# use them; `npm ci` again only when a package-lock.json is newer than its install).
NODE_EXAMPLES := examples/node examples/node-events examples/a2a-node
node:
	@{ command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; } || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; } \
		|| { echo "node: cannot install Debian's nodejs and npm packages" >&2; exit 1; }; }
	@for dir in $(NODE_EXAMPLES); do \
		test $$dir/node_modules/.package-lock.json -nt $$dir/package-lock.json && continue; \
		echo "npm ci in $$dir"; \
		(cd $$dir && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error) || exit 1; \
	done

# The suite runs on PYTEST_WORKERS pytest-xdist workers (0: in this process, one test at a
# time); --dist loadfile gives each worker whole test files, so a module-scoped mesh starts
# once. Tests marked "alone" (timing-sensitive under load) run afterwards, one at a time.
# PYTEST_ARGS adds options (e.g. PYTEST_ARGS="--durations=60" or a path).
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=
pytest: relink $(PROMTOOL) chromium node
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not alone" $(PYTEST_ARGS) \
		|| test $$? -eq 5  # 5: PYTEST_ARGS chose none of these
	$(BIN)/pytest -q -m alone $(PYTEST_ARGS) || test $$? -eq 5

test: relink lint typecheck imports buf-lint buf-breaking gen-check pytest

# BENCH_ARGS: e.g. --before before.json (an earlier --json run drawn in the plot).
BENCH_ARGS ?=
bench: relink $(VENV)/.bench-installed
	$(PY) bench/run.py --plot bench-chain.png $(BENCH_ARGS)

# The bench extra (matplotlib: the soak's plot of memory against tasks, make bench's plot).
$(VENV)/.bench-installed: $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[bench]' \
		--config-settings editable_mode=strict
	touch $@

# Memory, descriptors and asyncio tasks of every service under steady load (not in `make test`).
SOAK_ARGS ?=
soak: relink $(VENV)/.bench-installed
	$(PY) bench/soak.py --minutes 10 --plot soak.png --json soak.json $(SOAK_ARGS)

soak-quick: relink $(VENV)/.bench-installed
	$(PY) bench/soak.py --quick $(SOAK_ARGS)

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
