# Two commands from a fresh clone: `make demo` (install, then check the fused kernels against the
# reference on a built-in random big-lama) and `make test`. `make bench` times big-lama end to end at
# 512² and 1024² (`make bench-full` adds 2048²); `make bench-ops` runs the per-op benchmarks.
PYTHON ?= python3

.PHONY: install demo test bench bench-full bench-ops

install:
	$(PYTHON) -c "import torch, triton" 2>/dev/null || $(PYTHON) -m pip install torch==2.14.1 triton==3.8.0
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) -m lama_fast verify

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m lama_fast bench --sizes 512 1024

bench-full: install
	$(PYTHON) -m lama_fast bench --sizes 512 1024 2048

bench-ops: install
	$(PYTHON) -m pytest benchmarks/ --benchmark-only
