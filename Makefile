# The README's two commands: `make bench` (set up, run the benchmark on the best available device) and
# `make test` (set up, run the test suite). Both create .venv on a fresh machine, in one of three ways:
#  - the system python already has a CUDA torch (a lent GPU machine): the venv sees the system site-packages
#    and installs everything but torch and triton, so the CUDA torch and the triton it pins are used as they are;
#  - an NVIDIA GPU but no CUDA torch: the CUDA build torch==$(CUDA_TORCH) and the triton it pins;
#  - otherwise (CPU): requirements-dev.txt as it is, with the CPU torch and triton pinned there.
PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
DEPS       := $(VENV)/.deps-installed
CUDA_TORCH ?= 2.14.1
HAVE_CUDA_TORCH := $(shell $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null && echo 1)
HAVE_GPU        := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1)
NO_TORCH_REQS   := $(VENV)/requirements-without-torch.txt

.PHONY: setup build bench test clean cuda-build-check bench-regress mutants

$(DEPS): requirements-dev.txt requirements-nodeps.txt
ifeq ($(HAVE_CUDA_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	grep -v -E '^(torch|triton)==' requirements-dev.txt > $(NO_TORCH_REQS)
	$(PY) -m pip install -r $(NO_TORCH_REQS)
else ifeq ($(HAVE_GPU),1)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==$(CUDA_TORCH)
	grep -v -E '^(torch|triton)==' requirements-dev.txt > $(NO_TORCH_REQS)
	$(PY) -m pip install -r $(NO_TORCH_REQS)
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
endif
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	touch $(DEPS)

setup: $(DEPS)

# editable install; builds the C++ (and, with a CUDA torch + nvcc, CUDA) extension when a compiler exists
build: $(DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

bench: build
	$(PY) -m bench --out bench/out $(BENCH_ARGS)

# the suite in TEST_WORKERS processes (pytest-xdist, test by test; the files with expensive shared fixtures
# stay in one worker each, tests/conftest.py); TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
test: build
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(TEST_ARGS)

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
