# taxiway: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: all setup deps demo test test-fast test-python bench lint fmt clean

all: test

deps:
	@bash scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml apps/gamehall/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PIP) install -q -e '.[test]' -e apps/gamehall
	@touch $@

# Byte-compile once: the environment may set PYTHONDONTWRITEBYTECODE, and a
# warm `taxiway run` then pays ~50 ms to compile the CLI on every start.
setup: deps $(VENV)/.installed
	@$(PY) -m compileall -q -j 0 src apps/gamehall/src >/dev/null

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(PY) scripts/check-collected.py
	$(PY) -m pytest -q --durations=15

# The suite without the tests marked slow (micro-VMs under TCG, stack builds).
test-fast: setup
	@$(PY) scripts/check-collected.py
	$(PY) -m pytest -q -m 'not slow'

# The fast suite on another interpreter, e.g. make test-python PYTHON_OTHER=python3.13
PYTHON_OTHER ?= python3.13
test-python:
	@$(MAKE) --no-print-directory test-fast PYTHON=$(PYTHON_OTHER) VENV=.venv-$(notdir $(PYTHON_OTHER))

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src apps tests bench

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff format src apps tests bench

clean:
	rm -rf $(VENV) .venv-python3.* build *.egg-info src/*.egg-info .pytest_cache
