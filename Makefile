# The README's two commands: `make bench` (set up, run the benchmark on the best available device) and
# `make test` (set up, run the test suite). Both create .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed

.PHONY: setup build bench test clean cuda-build-check bench-regress mutants

$(DEPS): requirements-dev.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	touch $(DEPS)

setup: $(DEPS)

# editable install; builds the C++ (and, with a CUDA torch + nvcc, CUDA) extension when a compiler exists
build: $(DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

bench: build
	$(PY) -m bench --out bench/out $(BENCH_ARGS)

test: build
	$(PY) -m pytest -q $(TEST_ARGS)

# CPU performance-regression suite (pytest-benchmark), separate from the unit tests
bench-regress: build
	$(PY) -m pytest bench/benchmarks --benchmark-only --benchmark-autosave $(TEST_ARGS)

# Mutation check of the kernel tests (tests/mutation/mutants.py): each listed Triton and C++ mutant, applied alone
# to a scratch copy of the tree, must make tests/monarch_kernels fail. Slow (a rebuild per C++ mutant); not in CI.
mutants: build
	$(PY) tests/mutation/run.py $(MUTANT_ARGS)

clean:
	rm -rf build *.egg-info monarch_kernels/_C*.so bench/out

# Build the full CUDA extension against the local CUDA torch wheel (compile/link check, no GPU needed;
# about 80 s to install torch 2.14.1+cu130 into .venv-cuda and a few minutes to build).
cuda-build-check:
	$(PYTHON) -m venv .venv-cuda
	.venv-cuda/bin/python -m pip install torch==2.14.1 numpy setuptools wheel ninja
	rm -rf build/cuda-check && mkdir -p build/cuda-check
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} \
	  .venv-cuda/bin/python setup.py build_ext --build-lib build/cuda-check --build-temp build/cuda-check/tmp
	@echo "CUDA extension built: $$(ls build/cuda-check/monarch_kernels/_C*.so)"
