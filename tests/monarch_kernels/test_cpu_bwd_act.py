"""``monarch_kernels_ext::monarch_bwd_act``: the C++ first-order backward of ``act(M x + bias)`` in one pass (the
pre-activation from one stage-2 GEMM per row tile, no separate forward) against the float64 reference, on both
schedules, every split of the token reduction, truncated widths, poisoned outputs; its checks, its refusal to be
differentiated, and the autograd paths that use it (eager ``MonarchLinear``-style calls and the C++ Autograd key).
Also the fp16 pre-activation rounding of the C++ epilogues, forward and backward."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import activations
from monarch_kernels import reference as ref
from conftest import rel_err

if mk.available_backends()["cpu"] != "available":
    pytest.skip("cpu extension not built: " + mk.available_backends()["cpu"], allow_module_level=True)

from monarch_kernels.ext import Primitives as C  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
SHAPES = [((4, 12, 12), (4, 48, 12)), ((5, 5, 7), (5, 6, 5)), ((4, 2, 2), (4, 5, 2))]


pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def expected(x, g, w1, w2, bias, n_in, act):
    """float64 (dx, dw1, dw2, db): g' = g · act'(pre) from the reference forward, then the reference backward."""
    d = [None if t is None else t.double() for t in (x, g, w1, w2, bias)]
    pre = ref.monarch_fwd(d[0], d[2], d[3], d[4], g.shape[1], "none")
    gp = activations.backward(act, pre, d[1])
    return (*ref.monarch_bwd(d[0], gp, d[2], d[3], n_in), gp.sum(0))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("T", [5, 97, 300])  # block-parallel schedule, then row tiles split over 1 or 3 chunks
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s1,s2", SHAPES)
def test_matches_float64(s1, s2, dtype, T, threads):
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in, n_out = max(1, sh.n_in - 1), max(1, sh.n_out - sh.s // 2 - 1)  # truncated widths
    x = torch.randn(T, n_in).to(dtype)
    g = torch.randn(T + 2, n_out).to(dtype)[2:]  # a view at an offset
    w1, w2 = torch.randn(s1).to(dtype), torch.randn(s2).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for act, bias in (("gelu", torch.randn(n_out).to(dtype)), ("gelu_tanh", None),
                          ("relu", torch.randn(n_out).to(dtype))):
            if act == "relu" and dtype == torch.bfloat16:
                continue  # a pre-activation rounded across 0 flips relu' (tested in fp32/fp64)
            got = C.monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, act, True)
            for a, e, name in zip(got, expected(x, g, w1, w2, bias, n_in, act), ("dx", "dw1", "dw2", "db")):
                assert a.dtype == dtype and a.shape == e.shape, name
                assert rel_err(a, e) < TOL[dtype], (name, act)
    finally:
        torch.set_num_threads(previous)


def test_bad_arguments_name_the_argument():
    x, g = torch.randn(3, 24), torch.randn(3, 32)
    w1, w2 = torch.randn(4, 8, 6), torch.randn(4, 8, 8)
    op = torch.ops.monarch_kernels_ext.monarch_bwd_act
    with pytest.raises(ValueError, match="bias has shape"):
        op(x, g, w1, w2, torch.randn(31), 24, 2)
    with pytest.raises(ValueError, match="act=7"):
        op(x, g, w1, w2, None, 24, 7)
    with pytest.raises(ValueError, match="n_in=25"):
        op(x, g, w1, w2, None, 25, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        op(x, g[:2], w1, w2, None, 24, 2)
    with pytest.raises(TypeError, match="dtype"):
        op(x, g.double(), w1, w2, None, 24, 2)


def test_refuses_to_be_differentiated():
    x, g = torch.randn(3, 24, requires_grad=True), torch.randn(3, 32)
    w1, w2 = torch.randn(4, 8, 6), torch.randn(4, 8, 8)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.monarch_kernels_ext.monarch_bwd_act(x, g, w1, w2, None, 24, 2)
    with torch.no_grad():  # fine where nothing records it
        torch.ops.monarch_kernels_ext.monarch_bwd_act(x, g, w1, w2, None, 24, 2)


def test_opcheck():
    for T, bias in ((4, torch.randn(30)), (0, None), (9, None)):
        args = (torch.randn(T, 23), torch.randn(T, 30), torch.randn(4, 8, 6), torch.randn(4, 8, 8), bias, 23, 1)
        torch.library.opcheck(torch.ops.monarch_kernels_ext.monarch_bwd_act.default, args)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_eager_training_uses_one_pass(act, monkeypatch):
    """A tracked eager call on the cpu backend: its first-order backward is one monarch_bwd_act call, no forward
    (through the backend's monarch_bwd_epilogue)."""
    x = torch.randn(2, 50, 24, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 8, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 8, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64, requires_grad=True)
    out = mk.monarch_linear(x, w1, w2, bias, out_features=30, activation=act, backend="cpu")
    calls = []
    for name in ("monarch_bwd_epilogue", "monarch_fwd", "monarch_bwd", "monarch_bwd_weight"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w1, w2, bias), g)
    assert calls == ["monarch_bwd_epilogue"]
    want = expected(x.detach().reshape(100, 24), g.reshape(100, 30), w1.detach(), w2.detach(), bias.detach(), 24, act)
    assert rel_err(got[0], want[0].reshape(2, 50, 24)) < 1e-12
    for a, e in zip(got[1:], want[1:]):
        assert rel_err(a, e) < 1e-12


def test_cpp_autograd_key_uses_it_for_first_order():
    x = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 8, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 8, 8, dtype=torch.float64)
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c: torch.ops.monarch_kernels_ext.monarch_fwd(a, b, w2, c, 32, activations.CODES["gelu_tanh"])
    g = torch.randn(40, 32, dtype=torch.float64)
    dx, dw1, db = torch.autograd.grad(fn(x, w1, bias), (x, w1, bias), g)
    want = expected(x.detach(), g, w1.detach(), w2, bias.detach(), 24, "gelu_tanh")
    for a, e in zip((dx, dw1, db), (want[0], want[1], want[3])):
        assert rel_err(a, e) < 1e-12
    assert torch.autograd.gradgradcheck(fn, (x[:3].detach().requires_grad_(), w1, bias))
    # the first layer of a network: x needs no gradient, the weights do
    dw1, db = torch.autograd.grad(fn(x.detach(), w1, bias), (w1, bias), g)
    assert rel_err(dw1, want[1]) < 1e-12 and rel_err(db, want[3]) < 1e-12


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_fp16_pre_activation_overflow_like_torch(act):
    """The C++ epilogues activate the pre-activation rounded to fp16, as act(F.linear(...)) does: -65536 is -inf
    there (gelu(-inf) = NaN), not a finite fp32 value; the one-pass backward differentiates that same value."""
    nb, width = 4, 16
    x = torch.ones(3, nb * width, dtype=torch.float16)
    w1 = torch.ones(nb, width, width, dtype=torch.float16)
    w2 = torch.full((nb, width, width), -256.0, dtype=torch.float16)
    w2[:, ::2] = 1.0
    pre = ref.monarch_fwd(x, w1, w2, None, nb * width)
    assert torch.isneginf(pre).any()
    want = activations.apply(act, pre)
    out = mk.monarch_linear(x, w1, w2, activation=act, backend="cpu")
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[want.isfinite()], want[want.isfinite()])
    wb = torch.full((1, 4, 64), 1.0, dtype=torch.float16)
    wb[:, 1::2] = -1024.0
    want = activations.apply(act, ref.blockdiag_fwd(x, wb, None, 4))
    out = mk.blockdiag_linear(x, wb, activation=act, backend="cpu")
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[want.isfinite()], want[want.isfinite()])
    g = torch.ones(3, nb * width, dtype=torch.float16)
    dx, dw1, dw2, db = C.monarch_bwd_epilogue(x, g, w1, w2, None, nb * width, act, True)
    gp = activations.backward(act, pre, g)
    assert torch.equal(db.isnan(), gp.float().sum(0).isnan())
