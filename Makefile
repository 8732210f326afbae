# Quick start: `make demo` and `make test`. Both create .venv on first use and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,robust]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dr.demo --output output/demo --readme README.md --docs-dir docs

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bake_overhead.py
	$(PY) benchmarks/reinforce_throughput.py
	$(PY) benchmarks/loader_throughput.py
	$(PY) benchmarks/mixing_throughput.py
	$(PY) benchmarks/validate_throughput.py

clean:
	rm -rf output .pytest_cache
