# Two commands from a fresh clone: `make demo` (install, then check the fused kernels against the
# reference on a built-in random big-lama) and `make test`. `make bench` runs the CPU benchmarks.
PYTHON ?= python3

.PHONY: install demo test bench

install:
	$(PYTHON) -c "import torch, triton" 2>/dev/null || $(PYTHON) -m pip install torch==2.14.1 triton==3.8.0
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) -m lama_fast verify

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m pytest benchmarks/ --benchmark-only
