# kvmstate — every target installs what it needs first.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-unit test-lab test-faults lint bench lab-up lab-down demo clean

# Bytecode is compiled at install, as a regular pip install does (an editable one does not,
# and with PYTHONDONTWRITEBYTECODE set every start would compile kvmstate again).
$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,lab]'
	$(PY) -m compileall -q kvmstate
	touch $(STAMP)

install: $(STAMP)

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

lint: $(STAMP)
	$(BIN)/ruff check kvmstate tests bench
	$(BIN)/ruff format --check kvmstate tests bench
	$(BIN)/mypy

# Brings the lab up (a fresh one) for B1, B1b, B2, B4 and B5, and takes it down after.
# compileall: kvmstate edited since the install is measured with its bytecode up to date.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,lab,bench]'
	$(PY) -m compileall -q kvmstate
	$(PY) -m bench --setup-lab; rc=$$?; $(BIN)/kvmstate lab down; exit $$rc

lab-up: $(STAMP)
	$(BIN)/kvmstate lab up

lab-down: $(STAMP)
	$(BIN)/kvmstate lab down

demo: $(STAMP)
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
