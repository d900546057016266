"""Triton backend against the float64 reference: every path (fused, two-kernel), ragged sizes, bias and
activation epilogues, backward (dX, dW), strided inputs, batch 0/1, poisoned outputs.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are small and the tiles large.
"""
import math

import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import reference as ref
from conftest import rel_err

pytest.importorskip("triton")
if mk.available_backends()["triton"] != "available":
    pytest.skip("triton backend unavailable: " + mk.available_backends()["triton"], allow_module_level=True)

from monarch_kernels.triton import _common  # noqa: E402
from monarch_kernels.triton import blockdiag as tbd  # noqa: E402
from monarch_kernels.triton import monarch as tmon  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: an element left unwritten fails the comparison."""
    def empty(*shape, device, dtype):
        return torch.full(shape, math.nan, device=device, dtype=dtype)

    monkeypatch.setattr(_common, "empty", empty)


def _data(s1, s2, T, dtype, ragged=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in = sh.n_in - 1 if ragged and sh.p > 1 else sh.n_in
    n_out = sh.n_out - 1 if ragged and sh.s > 1 else sh.n_out
    mk_ = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return sh, n_in, n_out, mk_(T, n_in), mk_(*s1), mk_(*s2), mk_(n_out), mk_(T, n_out)


def _d(t):
    return t.double()


# (w1, w2): GPT-2-like nb=4 layout (c = 3), its transpose, rank-1 square (c = 1), q % l != 0 (two-kernel only)
SHAPES = [((4, 12, 12), (4, 48, 12)), ((4, 12, 48), (4, 12, 12)), ((5, 5, 7), (5, 6, 5)), ((4, 5, 8), (4, 6, 5))]


def _paths(s1, s2):
    sh = mk.MonarchShape.from_factors(s1, s2)
    return ["fused", "two_kernel"] if tmon.fused_applies(sh) else ["two_kernel"]


@pytest.mark.parametrize("s1,s2", SHAPES)
def test_forward_all_paths_fp32(s1, s2):
    sh, n_in, n_out, x, w1, w2, b, _ = _data(s1, s2, 19, torch.float32)
    expect = ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "gelu")
    for path in _paths(s1, s2):
        out = tmon.forward(x, w1, w2, b, n_out, "gelu", path=path)
        assert out.shape == (19, n_out)
        assert rel_err(out, expect) < TOL[torch.float32], path


@pytest.mark.parametrize("s1,s2", SHAPES[:2] + SHAPES[3:])
def test_backward_all_paths_fp32(s1, s2):
    sh, n_in, n_out, x, w1, w2, _, g = _data(s1, s2, 21, torch.float32)
    dx_ref = ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in)
    dw1_ref, dw2_ref = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    for path in _paths(s1, s2):
        assert rel_err(tmon.backward_input(g, w1, w2, n_in, path=path), dx_ref) < TOL[torch.float32], path
        dw1, dw2 = tmon.backward_weight(x, g, w1, w2, path=path)
        assert rel_err(dw1, dw1_ref) < TOL[torch.float32], path
        assert rel_err(dw2, dw2_ref) < TOL[torch.float32], path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["fused", "two_kernel"])
def test_half_precision(dtype, path):
    s1, s2 = SHAPES[0]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 17, dtype)
    out = tmon.forward(x, w1, w2, b, n_out, "relu", path=path)
    assert out.dtype == dtype
    assert rel_err(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "relu")) < TOL[dtype]
    dx = tmon.backward_input(g, w1, w2, n_in, path=path)
    assert rel_err(dx, ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in)) < TOL[dtype]
    dw1, dw2 = tmon.backward_weight(x, g, w1, w2, path=path)
    r1, r2 = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    assert rel_err(dw1, r1) < TOL[dtype] and rel_err(dw2, r2) < TOL[dtype]


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh"])
def test_blockdiag_epilogues_and_wgrad(act):
    g_ = torch.Generator().manual_seed(3)
    x = torch.randn(23, 30, generator=g_).to(DEVICE)
    w = torch.randn(4, 7, 8, generator=g_).to(DEVICE)
    b = torch.randn(26, generator=g_).to(DEVICE)
    out = tbd.blockdiag_forward(x, w, b, 26, act)
    assert rel_err(out, ref.blockdiag_fwd(_d(x), _d(w), _d(b), 26, act)) < 1e-5
    gy = torch.randn(23, 26, generator=g_).to(DEVICE)
    dw = tbd.blockdiag_weight_grad(x, gy, 4, 7, 8)
    assert rel_err(dw, ref.blockdiag_wgrad(_d(x), _d(gy), 4, 7, 8)) < 1e-5


def test_strided_inputs_and_weights():
    s1, s2 = SHAPES[0]
    sh, n_in, n_out, _, w1, w2, b, _ = _data(s1, s2, 9, torch.float32, ragged=False)
    big = torch.randn(30, 2 * sh.n_in, device=DEVICE)
    x = big[::3, ::2]  # row stride 3·2n, column stride 2
    w1t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # same values, transposed strides
    expect = ref.monarch_fwd(_d(x), _d(w1), _d(w2), None, sh.n_out)
    for path in ("fused", "two_kernel"):
        assert rel_err(tmon.forward(x, w1t, w2, None, sh.n_out, path=path), expect) < 1e-5


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_batches(T):
    s1, s2 = SHAPES[0]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, T, torch.float32)
    for path in ("fused", "two_kernel"):
        out = tmon.forward(x, w1, w2, b, n_out, path=path)
        assert out.shape == (T, n_out)
        dw1, dw2 = tmon.backward_weight(x, g, w1, w2, path=path)
        assert torch.isfinite(dw1).all() and torch.isfinite(dw2).all()
        if T:
            assert rel_err(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out)) < 1e-5
        else:
            assert dw1.abs().sum() == 0 and dw2.abs().sum() == 0


def test_backend_through_ops_api_with_autograd():
    """The dispatcher runs the Triton backend; grads (and grads of grads) match the torch backend."""
    s1, s2 = SHAPES[0]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 11, torch.float32)
    assert mk.resolve_backend("monarch", x, w1, w2, backend="triton") == "triton"
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b)]
        out = mk.monarch_linear(*leaves, out_features=n_out, activation="gelu_tanh", backend=backend)
        grads = torch.autograd.grad((out * g).sum(), leaves, create_graph=True)
        gg = torch.autograd.grad(sum(gr.pow(2).sum() for gr in grads), leaves[:3])
        results[backend] = (out, *grads, *gg)
    for a, c in zip(results["triton"], results["torch"]):
        assert rel_err(a, c) < 1e-4


def test_path_validation():
    sh = mk.MonarchShape.from_factors((4, 5, 8), (4, 6, 5))
    with pytest.raises(ValueError, match="q % l == 0"):
        tmon.choose_path(sh, "fused")
    with pytest.raises(ValueError, match="path must be one of"):
        tmon.choose_path(sh, "magic")
    assert tmon.choose_path(sh, "auto") == "two_kernel"
    square = mk.MonarchShape.from_factors((64, 64, 64), (64, 64, 64))  # rank c = 1
    assert tmon.choose_path(square, "auto", tokens=16) == "fused"  # small batch: weight-bound, fuse
    assert tmon.choose_path(square, "auto", tokens=65536) == "two_kernel"
    gpt2 = mk.MonarchShape.from_factors((4, 192, 192), (4, 768, 192))  # rank c = 48
    assert tmon.choose_path(gpt2, "auto", tokens=65536) == "fused"
