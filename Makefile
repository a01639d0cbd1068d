# taxiway: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: all setup deps demo test test-fast bench lint fmt clean

all: test

deps:
	@bash scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml apps/gamehall/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PIP) install -q -e '.[test]' -e apps/gamehall
	@touch $@

setup: deps $(VENV)/.installed

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -x -m 'not slow'

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src apps tests bench

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff format src apps tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
