# `make demo` and `make test` create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo generate report test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/serve.py --compare

generate: $(VENV)/.installed
	$(PY) examples/generate.py

report: $(VENV)/.installed
	$(PY) examples/memory_report.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/memory.py --json memory.jsonl
	$(PY) benchmarks/allocator_overhead.py --json overhead.jsonl
	$(PY) benchmarks/serving.py --json serving.jsonl

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
