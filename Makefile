# Quick start: `make demo` and `make test`. Both create .venv on first use and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo compare test test-fast lint bench bench-gpu install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,robust]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dr.demo --output output/demo --readme README.md --docs-dir docs

# every competing method on the digits, 3 seeds (not part of demo): docs/compare.md
compare: $(STAMP)
	$(PY) -m dr.compare --output output/compare --docs docs/compare.md

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
	$(PY) benchmarks/loader_throughput.py --remote
	$(PY) benchmarks/mixing_throughput.py
	$(PY) benchmarks/validate_throughput.py
	$(PY) benchmarks/train_epoch_cost.py --data digits photos

# on a machine with a GPU: every GPU figure in one run (~8 min), written to benchmarks/results/<device-name>.{json,md}
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py --output benchmarks/results

clean:
	rm -rf output .pytest_cache
