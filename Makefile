# kvmstate — every target installs what it needs first.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

.PHONY: install lock test test-latest test-unit test-lab test-faults lint bench lab-up lab-down demo clean

# Installs exactly the versions in uv.lock (hashes checked), never what a resolver picks today:
# the versions CI tested are the versions a fresh machine gets. uv itself is bootstrapped with
# pip at the version the lock names. Bytecode is compiled at install, as a regular pip install
# does: the dependencies' by uv (--compile-bytecode; uv does not by default), kvmstate's by
# compileall (an editable install does not). With PYTHONDONTWRITEBYTECODE set, every start
# would otherwise compile again what it imports (a `kvmstate plan` took ~1.3 s instead of
# ~0.4 s in a fresh .venv; a .venv whose bytecode came from imports run without the
# variable missed rich's unicode table, imported on first render: ~3.5 ms a run).
UV_VERSION := $(shell awk '/^name = "uv"$$/ {getline; gsub(/[^0-9.]/, ""); print}' uv.lock)
UV         := $(BIN)/uv
SYNC       := UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --python $(PY) --no-python-downloads \
              --compile-bytecode

$(STAMP): pyproject.toml uv.lock scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(UV) --version 2>/dev/null | grep -qx 'uv $(UV_VERSION)' || \
	  $(PY) -m pip install -q --disable-pip-version-check 'uv==$(UV_VERSION)'
	$(SYNC) -q --extra dev --extra lab
	$(PY) -m compileall -q kvmstate
	touch $(STAMP)

install: $(STAMP)

# Refresh uv.lock on purpose: the newest versions pyproject.toml's ranges allow. Review the
# diff, run `make test`, commit both.
lock: $(STAMP)
	$(UV) lock --upgrade --python $(PY) --no-python-downloads

# The same suite against the newest releases a plain `pip install -e .` resolves today (no
# lock), in its own venv: a new release of a dependency that breaks kvmstate shows up here as
# a failing check, before users meet it.
LATEST := .venv-latest
test-latest: $(STAMP)
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(LATEST)/bin/pip install -q --disable-pip-version-check -e '.[dev,lab]'
	$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m compileall -q kvmstate
	$(LATEST)/bin/pytest -q $(PYTEST_ARGS)

# The whole suite: unit, fake-transport and the real lab tests.
test: $(STAMP)
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q -m 'not lab'

test-lab: $(STAMP)
	$(BIN)/pytest -q -m lab

# The fault suite alone (it is part of `make test` too).
test-faults: $(STAMP)
	$(BIN)/pytest -q tests/faults

# lint-imports: the layer contracts in pyproject.toml's [tool.importlinter] (import-linter).
lint: $(STAMP)
	$(BIN)/ruff check kvmstate tests bench
	$(BIN)/ruff format --check kvmstate tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

# Brings the lab up (a fresh one) for B1, B1b, B2, B4, B5 and B6, and takes it down after.
# compileall: kvmstate edited since the install is measured with its bytecode up to date.
bench: $(STAMP)
	$(SYNC) -q --extra dev --extra lab --extra bench
	$(PY) -m compileall -q kvmstate
	$(PY) -m bench --setup-lab; rc=$$?; $(BIN)/kvmstate lab down; exit $$rc

lab-up: $(STAMP)
	$(BIN)/kvmstate lab up

lab-down: $(STAMP)
	$(BIN)/kvmstate lab down

demo: $(STAMP)
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
