# `make demo` and `make test` create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo generate report test lint bench clean lock

# Tests run on the versions pinned in $(LOCK) (every package of the test environment;
# refresh with `make lock`, then run the suite and commit the file). The package's own
# ranges in pyproject.toml stay open for users.
LOCK := .ci/constraints.txt
TORCH_VERSION := 2.13.0

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,plot,weights,serve]'
	touch $@

# Parity tests (tests/test_hf_*.py) need torch + transformers: torch only from a local
# CPU wheel (--no-index: never a multi-GB CUDA download); without it those tests skip.
# The GPU compile tests (tests/test_triton_compile.py) need the triton package (CPU-only
# use: it compiles for sm_90/sm_80 without a GPU); without it they skip. The TPU compile
# tests (tests/test_tpu_compile.py) need libtpu (the tpu extra, ~200 MB; compile-only TPU
# devices, no TPU needed); without it they skip.
$(VENV)/.hf: $(VENV)/.installed
	( $(PY) -m pip install -q --no-index --no-deps torch==$(TORCH_VERSION) && \
	  $(PY) -m pip install -q -c $(LOCK) -e '.[hf]' ) || \
	  echo "torch $(TORCH_VERSION) CPU is not available locally: the transformers parity tests will skip"
	$(PY) -m pip install -q -c $(LOCK) -e '.[gpu-compile]' || \
	  echo "triton is not installable: the GPU compile tests will skip"
	$(PY) -m pip install -q -c $(LOCK) -e '.[tpu]' || \
	  echo "libtpu is not installable: the TPU compile tests will skip"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/serve.py --compare

generate: $(VENV)/.installed
	$(PY) examples/generate.py

report: $(VENV)/.installed
	$(PY) examples/memory_report.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

TESTED := jax jaxlib flax numpy transformers torch triton libtpu

test: lint $(VENV)/.hf
	@$(PY) -c 'import importlib.metadata as m, sys; \
	  v = lambda n: m.version(n) if any(True for _ in m.distributions(name=n)) else "absent"; \
	  print("testing with", ", ".join(f"{n} {v(n)}" for n in sys.argv[1:]))' $(TESTED)
	$(PY) -m pytest -n auto --dist loadfile

bench: $(VENV)/.installed
	$(PY) benchmarks/memory.py --json memory.jsonl
	$(PY) benchmarks/allocator_overhead.py --json overhead.jsonl
	$(PY) benchmarks/serving.py --json serving.jsonl

lock:
	bash .ci/lock.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
