"""CUDA kernels (the ``cuda`` backend) against the float64 reference; skipped without a GPU build."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import reference as ref
from conftest import rel_err

if mk.available_backends()["cuda"] != "available":
    pytest.skip("cuda backend unavailable: " + mk.available_backends()["cuda"], allow_module_level=True)

from monarch_kernels.ext import Primitives as C  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# fused (q % l == 0) and two-kernel shapes, ragged, rank c = 48 (GPT-2 style), c = 1, c > 64
SHAPES = [((4, 192, 192), (4, 768, 192)), ((4, 192, 768), (4, 192, 192)), ((32, 32, 32), (32, 32, 32)),
          ((4, 5, 8), (4, 6, 5)), ((2, 160, 40), (2, 90, 160))]


@pytest.fixture(autouse=True)
def poisoned_allocations():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # fresh allocations start as NaN
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s1,s2", SHAPES)
@pytest.mark.parametrize("T", [1, 333])
def test_monarch_ops(s1, s2, dtype, T):
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in, n_out = sh.n_in - 1, sh.n_out - 1
    mkr = lambda *s, sc=1.0: (torch.randn(*s) * sc).cuda().to(dtype)
    x, g, b = mkr(T, n_in), mkr(T, n_out), mkr(n_out)
    w1, w2 = mkr(*s1, sc=sh.p ** -0.5), mkr(*s2, sc=sh.r ** -0.5)
    d = lambda t: t.double()
    assert rel_err(C.monarch_fwd(x, w1, w2, b, n_out, "gelu"),
                   ref.monarch_fwd(d(x), d(w1), d(w2), d(b), n_out, "gelu")) < TOL[dtype]
    assert rel_err(C.monarch_bwd_input(g, w1, w2, n_in), ref.monarch_bwd_input(d(g), d(w1), d(w2), n_in)) < TOL[dtype]
    for a, e in zip(C.monarch_bwd_weight(x, g, w1, w2), ref.monarch_bwd_weight(d(x), d(g), d(w1), d(w2))):
        assert rel_err(a, e) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blockdiag_ops(dtype):
    x, g = torch.randn(300, 250).cuda().to(dtype), torch.randn(300, 190).cuda().to(dtype)
    w, b = (torch.randn(4, 48, 64) / 8).cuda().to(dtype), torch.randn(190).cuda().to(dtype)
    d = lambda t: t.double()
    assert rel_err(C.blockdiag_fwd(x, w, b, 190, "relu"), ref.blockdiag_fwd(d(x), d(w), d(b), 190, "relu")) < TOL[dtype]
    assert rel_err(C.blockdiag_wgrad(x, g, 4, 48, 64), ref.blockdiag_wgrad(d(x), d(g), 4, 48, 64)) < TOL[dtype]


def test_strided_input():
    big = torch.randn(64, 2 * 768, device="cuda", dtype=torch.bfloat16)
    x = big[:, ::2]
    w1 = (torch.randn(4, 192, 192, device="cuda") / 14).bfloat16()
    w2 = (torch.randn(4, 768, 192, device="cuda") / 14).bfloat16()
    out = C.monarch_fwd(x, w1, w2, None, 3072, "none")
    assert rel_err(out, ref.monarch_fwd(x.double(), w1.double(), w2.double(), None, 3072)) < TOL[torch.bfloat16]
