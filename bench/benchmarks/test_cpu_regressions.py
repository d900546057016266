"""pytest-benchmark suite for CPU performance regressions (separate from the unit tests).

Run: ``make bench-regress`` (``pytest bench/benchmarks --benchmark-only``); compare two runs with
``pytest-benchmark compare``. Each case checks its result against the reference once, so a fast wrong
kernel cannot pass.
"""
import pytest
import torch

import monarch_kernels as mk

BACKENDS = [b for b in ("torch", "cpu") if mk.available_backends().get(b) == "available"]
SHAPES = {"gpt2-fc1": (1024, 768, 3072, 4), "square-nb32": (1024, 1024, 1024, 32), "small-T": (8, 2048, 2048, 16)}


def _problem(name, dtype=torch.float32):
    T, n_in, n_out, nb = SHAPES[name]
    sh = mk.monarch_factor_shapes(n_in, n_out, nb)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n_in, generator=g, dtype=dtype)
    w1 = torch.randn(*sh.w1_shape, generator=g, dtype=dtype) * sh.p ** -0.5
    w2 = torch.randn(*sh.w2_shape, generator=g, dtype=dtype) * sh.r ** -0.5
    return x, w1, w2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward(benchmark, backend, shape):
    x, w1, w2 = _problem(shape)
    out = benchmark(mk.monarch_matmul, x, w1, w2, backend=backend)
    ref = mk.monarch_matmul(x.double(), w1.double(), w2.double(), backend="torch")
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["gpt2-fc1", "square-nb32"])
def test_forward_backward(benchmark, backend, shape):
    x, w1, w2 = _problem(shape)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]

    def step():
        for t in leaves:
            t.grad = None
        mk.monarch_matmul(*leaves, backend=backend).sum().backward()

    benchmark(step)
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_dense_baseline(benchmark):
    x, _, _ = _problem("gpt2-fc1")
    W = torch.randn(3072, 768) / 28
    benchmark(torch.nn.functional.linear, x, W)
