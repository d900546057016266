"""``monarch_bwd``: the first-order backward that computes dx, dw1, dw2 in one call (sharing the recomputed
intermediate and dy) equals the two separate primitives, on every CPU backend and schedule; autograd uses it for
a first-order backward that needs both, and the separate (differentiable) ops for create_graph=True."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import reference as ref
from conftest import OpLog, rel_err

SHAPES = [((4, 12, 12), (4, 48, 12)), ((4, 5, 8), (4, 6, 5)), ((4, 40, 36), (5, 33, 32))]


@pytest.mark.parametrize("s1,s2", SHAPES)
def test_reference_fused_equals_separate(s1, s2):
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in = sh.n_in - 3
    x, g = torch.randn(9, n_in, dtype=torch.float64), torch.randn(9, sh.n_out, dtype=torch.float64)
    w1, w2 = torch.randn(s1, dtype=torch.float64), torch.randn(s2, dtype=torch.float64)
    dx, dw1, dw2 = ref.monarch_bwd(x, g, w1, w2, n_in)
    assert rel_err(dx, ref.monarch_bwd_input(g, w1, w2, n_in)) < 1e-13
    for a, e in zip((dw1, dw2), ref.monarch_bwd_weight(x, g, w1, w2)):
        assert rel_err(a, e) < 1e-13


@pytest.mark.skipif(mk.available_backends()["cpu"] != "available", reason="cpu extension not built")
@pytest.mark.parametrize("T", [5, 97, 300])  # block-parallel (composed), row tiles with in-place / packed weights
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s1,s2", SHAPES)
def test_cpu_fused_backward_matches_float64(s1, s2, dtype, T):
    from monarch_kernels.ext import Primitives as C

    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1.5e-2}[dtype]
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in = sh.n_in - 2
    x, g = torch.randn(T, n_in).to(dtype), torch.randn(T + 3, sh.n_out).to(dtype)[3:]  # g: a view at an offset
    w1, w2 = torch.randn(s1).to(dtype), torch.randn(s2).to(dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # outputs start as NaN-filled memory
    try:
        got = C.monarch_bwd(x, g, w1, w2, n_in)
    finally:
        torch.use_deterministic_algorithms(previous)
    d = [t.double() for t in (x, g, w1, w2)]
    expect = ref.monarch_bwd(*d, n_in)
    for a, e in zip(got, expect):
        assert a.dtype == dtype and a.shape == e.shape
        assert rel_err(a, e) < tol


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if mk.available_backends()[b] == "available"])
def test_autograd_uses_the_fused_op_for_first_order_only(backend, monkeypatch):
    w1, w2 = torch.randn(4, 8, 6, dtype=torch.float64), torch.randn(4, 8, 8, dtype=torch.float64)
    w1.requires_grad_()
    x = torch.randn(300, 24, dtype=torch.float64, requires_grad=True)
    for act, fused in (("none", "monarch_bwd"), ("gelu", "monarch_bwd_epilogue")):
        with OpLog():  # the forward through the custom op (as compiled graphs run it)
            out = mk.monarch_linear(x, w1, w2, activation=act, backend=backend)
        with OpLog() as log:
            gx, gw1 = torch.autograd.grad(out.square().sum(), (x, w1))
        ran = {n for n in log.names if n.startswith("monarch_kernels.")}
        assert ran == {f"monarch_kernels.{fused}.default"}  # one call; with gelu no forward for the pre-activation
    # the same gradients through the separate, differentiable ops (create_graph=True)
    out = mk.monarch_linear(x, w1, w2, activation="gelu", backend=backend)
    with OpLog() as log:
        hx, hw1 = torch.autograd.grad(out.square().sum(), (x, w1), create_graph=True)
    assert "monarch_kernels.monarch_bwd_epilogue.default" not in log.names
    assert "monarch_kernels.monarch_bwd_input.default" in log.names
    assert rel_err(gx, hx.detach()) < 1e-12 and rel_err(gw1, hw1.detach()) < 1e-12
    # an eager forward (no custom op): its first-order backward is one call of the backend's fused epilogue (the
    # activation's derivative included), which the reference hands its saved intermediate
    impl, calls = mk.backends.impl(backend), []
    fused = impl.monarch_bwd_epilogue

    def counted(x, g, w1, w2, bias, n_in, activation, want_dx, z=None, want_dw=True, pre=None):
        calls.append(z)
        assert want_dw and pre is None  # w1 needs its gradient; the reference keeps no pre-activation
        return fused(x, g, w1, w2, bias, n_in, activation, want_dx, z, want_dw, pre)

    monkeypatch.setattr(impl, "monarch_bwd_epilogue", counted)
    out = mk.monarch_linear(x, w1, w2, activation="gelu", backend=backend)
    kx, kw1 = torch.autograd.grad(out.square().sum(), (x, w1))
    assert len(calls) == 1 and (calls[0] is not None) == (backend == "torch")
    assert rel_err(gx, kx) < 1e-12 and rel_err(gw1, kw1) < 1e-12
