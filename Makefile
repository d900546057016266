# The README's two commands: `make bench` (set up, run the benchmark on the best available device) and
# `make test` (set up, run the test suite). Both create .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed

.PHONY: setup build bench test clean

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

clean:
	rm -rf build *.egg-info monarch_kernels/_C*.so bench/out
