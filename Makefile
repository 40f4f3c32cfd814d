# `make demo` and `make test` create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo generate report test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot,weights]'
	touch $@

# Parity tests (tests/test_hf_*.py) need torch + transformers: torch only from a local
# CPU wheel (--no-index: never a multi-GB CUDA download); without it those tests skip.
$(VENV)/.hf: $(VENV)/.installed
	( $(PY) -m pip install -q --no-index --no-deps torch==2.13.0 && \
	  $(PY) -m pip install -q -e '.[hf]' ) || \
	  echo "torch 2.13.0 CPU is not available locally: the transformers parity tests will skip"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/serve.py --compare

generate: $(VENV)/.installed
	$(PY) examples/generate.py

report: $(VENV)/.installed
	$(PY) examples/memory_report.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint $(VENV)/.hf
	$(PY) -m pytest -n auto --dist loadfile

bench: $(VENV)/.installed
	$(PY) benchmarks/memory.py --json memory.jsonl
	$(PY) benchmarks/allocator_overhead.py --json overhead.jsonl
	$(PY) benchmarks/serving.py --json serving.jsonl

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
